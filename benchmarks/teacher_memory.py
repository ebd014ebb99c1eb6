"""cache-teacher's memory against the sequence length: peak resident memory of one teacher signal (top-k 64,
every position a loss position) for T = 1k / 4k / 16k tokens, chunked output head vs the full-logits path.

    python benchmarks/teacher_memory.py [--lengths 1024,4096,16384] [--full-lengths 1024,4096] [--vocab 151936]

The teacher is a random tiny Llama (hidden 64, 2 layers) whose output has V = 151,936 (Qwen2's vocabulary;
the signal's vocabulary is the model's output size). Each measurement runs in a fresh process on one thread:
peak = ru_maxrss after the call minus the resident memory just before it (model loaded, input built, one
16-token warm-up call done). "full logits" is the path before the chunked head: the model's own [1, T, V]
logits, the loss rows copied out, one log-softmax over all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(folder: Path, vocab: int, max_positions: int) -> None:
    """The tiny Llama teacher, saved once (each measuring process loads it with from_pretrained)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=0, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def full_logits_signal(model, ids, attn, loss, k: int):
    """The pre-chunking path: [B, T, V] logits from the model, then log-softmax over every loss row at once."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1][loss[:, 1:].bool()]
        values, top = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
        return top, values, (1.0 - values.double().exp().sum(dim=1)).clamp(min=0.0).float()


def measure(folder: str, path: str, length: int, k: int = 64) -> dict:
    """One measurement, in this (fresh) process."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastkd.teacher import teacher_signal

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    run = (lambda *b: full_logits_signal(model, *b, k)) if path == "full" else (
        lambda *b: teacher_signal(model, *b, k=k))
    warm = torch.randint(1, vocab, (1, 16))
    run(warm, torch.ones_like(warm), torch.ones_like(warm))
    ids = torch.randint(1, vocab, (1, length), generator=torch.Generator().manual_seed(1))
    ones = torch.ones_like(ids)
    before = rss_bytes()
    run(ids, ones, ones)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"path": path, "T": length, "peak_bytes": peak, "per_position": peak / length}


def child(folder: Path, path: str, length: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, "--child", str(folder), path, str(length)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--full-lengths", default="1024,4096")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], int(args.child[2]))))
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    full = {int(x) for x in args.full_lengths.split(",") if x}
    with tempfile.TemporaryDirectory() as work:
        build(Path(work), args.vocab, max(lengths))
        rows = [(t, child(Path(work), "chunked", t), child(Path(work), "full", t) if t in full else None)
                for t in lengths]
    mib = 2**20
    print(f"V = {args.vocab:,}, top-k 64, every position a loss position, one sequence, CPU, 1 thread")
    print("| T | chunked head: peak MiB | bytes / position | full logits: peak MiB | bytes / position |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for t, chunked, whole in rows:
        tail = (f"{whole['peak_bytes'] / mib:,.0f} | {whole['per_position']:,.0f}" if whole else "not run | -")
        print(f"| {t:,} | {chunked['peak_bytes'] / mib:,.0f} | {chunked['per_position']:,.0f} | {tail} |")


if __name__ == "__main__":
    main()
