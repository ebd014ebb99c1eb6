"""Training step time and peak memory: what `fastkd train` pays per step, against a floor.

Default table (issue 18), at a realistic vocabulary and width (V = 32,000, H = 512 by default):
each variant runs in its own process (so its peak RSS is its own), the same student, batch shapes
and `fastkd.trainer.train_step` (forward, loss, backward, clip, AdamW):
  floor            the step on a batch decoded once before timing (the cache costs nothing)
  offline          `fastkd train`'s data path: every step's batch decoded from the cache by the
                   read-ahead thread (the default), or on the training thread (--prefetch 0)
  loss paths       the same floor with the logits path (gradient written over the logits) and CE alone
Prints median ms/step, the ratio to the floor, and peak RSS in MiB.

  python benchmarks/train_step_table.py                  # CPU, defaults below (a few minutes)
  python benchmarks/train_step_table.py --vocab 32000 --hidden 512 --seq 256 --batch-size 8 --reps 6

--online-table prints the older comparison instead: offline KD (cache) vs online KD (live teacher)
vs the student alone, on tiny models (the teacher ~4x the student):
  python benchmarks/train_step_table.py --online-table --threads 1 --reps 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_records(path: Path, n: int, seed: int = 0) -> Path:
    """Arithmetic chains with a multi-step rationale (sequences of ~100-200 tokens)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        nums = [rng.randint(0, 99) for _ in range(rng.randint(4, 8))]
        steps, total = [], 0
        for x in nums:
            steps.append(f"{total} + {x} is {total + x}.")
            total += x
        lines.append(json.dumps({"source": " + ".join(map(str, nums)) + " is", "rationale": " ".join(steps),
                                 "target": str(total), "task": "sum"}) + "\n")
    path.write_text("".join(lines))
    return path


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_variants(workdir: Path, batch_size: int = 8, top_k: int = 64, student_hidden: int = 128, layers: int = 4):
    """Models, cache and one batch in `workdir`; returns ({variant: step function}, description lines)."""
    import torch

    from fastkd.cache_stage import cache_teacher
    from fastkd.loader import CacheSource, collate
    from fastkd.teacher import load_causal_lm, load_tokenizer
    from fastkd.tiny import save_tiny, train_tokenizer
    from fastkd.train_config import TrainConfig
    from fastkd.trainer import DataSide, StudentWithLoss, add_teacher_signal, batch_inputs

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    records = make_records(work / "records.jsonl", n=4 * batch_size)
    corpus = [json.loads(line)["rationale"] for line in records.read_text().splitlines()]
    tok = train_tokenizer(corpus, vocab_size=1024)
    h = student_hidden
    save_tiny(work / "student", "llama", tokenizer=tok, hidden=h, layers=layers, heads=4, kv_heads=2, seed=1)
    save_tiny(work / "teacher", "qwen2", tokenizer=tok, hidden=2 * h, layers=layers, heads=8, kv_heads=4, seed=2)
    cache = work / "cache"
    if not (cache / "manifest.json").exists():
        cache_teacher(dict(teacher=str(work / "teacher"), data=str(records), out=str(cache), top_k=top_k,
                           max_length=512, batch_size=batch_size, progress=False))

    tok = load_tokenizer(str(work / "student"))
    vocab = len(tok)
    teacher = load_causal_lm(str(work / "teacher"), dtype="float32", device="cpu")
    source = CacheSource(cache, layers=[])
    positions = list(range(batch_size))
    cfg = TrainConfig.make(overrides={"cache": str(cache), "student": str(work / "student"), "progress": False,
                                 "loss_impl": "logits"})
    online_cfg = TrainConfig.make(overrides={"data": str(records), "teacher": str(work / "teacher"),
                                        "student": str(work / "student"), "top_k": top_k, "loss_impl": "logits"})
    torch.manual_seed(0)
    student = load_causal_lm(str(work / "student"), dtype="float32", device="cpu", role="student").train()
    module = StudentWithLoss(student, vocab, cfg)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    online_data = DataSide(None, None, None, None, [], [], 0, teacher)

    def read_batch(with_teacher: bool):
        source._blocks.clear()                       # decode from the compressed block every time
        b = collate([source[p] for p in positions], tok.pad_token_id)
        if not with_teacher:
            b.topk_ids = b.topk_logprobs = b.tail = None
        return b

    def step(b):
        terms = module(**batch_inputs(b, []))
        terms.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    variants = {
        "floor (student fwd+bwd, CE)": lambda: step(read_batch(False)),
        "offline KD (cache)": lambda: step(read_batch(True)),
        "online KD (live teacher)": lambda: step(add_teacher_signal(read_batch(False), online_data, online_cfg, vocab)),
    }
    b = read_batch(True)
    info = [f"device cpu, torch threads {torch.get_num_threads()}, batch {batch_size} x {b.input_ids.shape[1]} tokens "
            f"({b.num_rows} loss rows), top-k {top_k}, vocab {vocab}",
            f"student {params(student) / 1e6:.2f} M params, teacher {params(teacher) / 1e6:.2f} M params "
            f"({params(teacher) / params(student):.1f}x)"]
    return variants, info


def online_table(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fastkd-bench-"))
    variants, info = build_variants(work, args.batch_size, args.top_k, args.student_hidden, args.layers)
    times = {name: [] for name in variants}
    for rep in range(args.reps + 2):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            if rep >= 2:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    base = med["floor (student fwd+bwd, CE)"]
    print("\n".join(info))
    print(f"{'variant':32s} {'ms/step (median)':>17s} {'vs floor':>9s}")
    for name in variants:
        print(f"{name:32s} {med[name]:17.1f} {med[name] / base:8.2f}x")
    print(f"online / offline step time: {med['online KD (live teacher)'] / med['offline KD (cache)']:.2f}x")
    return 0



HOT_VARIANTS = {
    "floor (fused, batch in memory)": dict(loss_impl="fused", source="memory"),
    "offline (fused, read-ahead thread: default)": dict(loss_impl="fused", source="cache", prefetch=4),
    "offline (fused, decoded on the training thread)": dict(loss_impl="fused", source="cache", prefetch=0),
    "floor (logits path, batch in memory)": dict(loss_impl="logits", source="memory"),
    "floor (CE only, batch in memory)": dict(loss_impl="logits", source="memory", ce_only=True),
}


def build_hot_cache(work: Path, args) -> Path:
    """A synthetic cache at the table's vocabulary: top-k log-probs of random softmaxes, the default codec."""
    import numpy as np

    from fastkd.cache_tools import CacheWriter

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import random_sequence, synthetic_settings   # the tests' synthetic cache sequences

    root = work / f"cache-v{args.vocab}-k{args.top_k}-t{args.seq}"
    if (root / "manifest.json").exists():
        return root
    settings = synthetic_settings(vocab_size=args.vocab, k=args.top_k, layers=(), widths=())
    settings.pop("codecs")  # the production default codecs
    rng = np.random.default_rng(0)
    with CacheWriter(root, settings, sequences_per_shard=64) as writer:
        for i in range(args.batch_size * 8):
            writer.add(random_sequence(rng, i, settings, length=args.seq, num_loss=args.seq - 16))
    return root


def run_hot_variant(args, name: str) -> dict:
    """One variant in this process: median ms/step over --reps steps after 2 warm-ups, and peak RSS."""
    import resource

    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastkd.loader import CacheSource, PlanMaker, collate, make_loader
    from fastkd.train_config import TrainConfig
    from fastkd.trainer import DataSide, Env, StudentWithLoss, train_step

    spec = HOT_VARIANTS[name]
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                           num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                                           max_position_embeddings=2 * args.seq, tie_word_embeddings=False)).train()
    cfg = TrainConfig.make(overrides={"cache": str(cache), "student": "unused", "progress": False, "loss_impl": spec["loss_impl"]})
    module = StudentWithLoss(student, args.vocab, cfg)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    env = Env(torch.device("cpu"))
    source = CacheSource(cache, layers=[])
    data = DataSide(source, None, None, None, [], [], 0)
    window = torch.zeros(5, dtype=torch.float64)
    if spec["source"] == "memory":
        batch = collate([source[p] for p in range(args.batch_size)], 0)
        if spec.get("ce_only"):
            batch.topk_ids = batch.topk_logprobs = batch.tail = None
        next_micro = lambda: [batch]  # noqa: E731
    else:
        plans = PlanMaker(source.lengths, source.shards, args.batch_size, seed=0)
        stream = iter(make_loader(source, plans, 0, prefetch=spec["prefetch"]))
        next_micro = lambda: next(stream)[2]  # noqa: E731
    times = []
    rows = 0
    setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # model, optimizer, reader: before any step
    for rep in range(args.reps + 2):
        t0 = time.perf_counter()
        micro = next_micro()
        train_step(module, module, optimizer, micro, data, cfg, env, args.vocab, window)
        if rep >= 2:
            times.append(time.perf_counter() - t0)
        rows = micro[0].num_rows
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"name": name, "ms": statistics.median(times) * 1e3, "peak_mib": peak, "step_mib": peak - setup_peak, "rows": rows,
            "tokens": int(np.prod(micro[0].input_ids.shape))}


def hot_table(args) -> int:
    import subprocess

    work = Path(args.workdir or tempfile.mkdtemp(prefix="fastkd-hot-"))
    cache = build_hot_cache(work, args)
    results: dict[str, list[dict]] = {name: [] for name in HOT_VARIANTS}
    base_cmd = [sys.executable, __file__, "--cache", str(cache), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
                "--layers", str(args.layers), "--seq", str(args.seq), "--batch-size", str(args.batch_size),
                "--reps", str(args.reps), "--threads", str(args.threads)]
    for _ in range(args.rounds):  # variants interleaved, each in a fresh process
        for name in HOT_VARIANTS:
            out = subprocess.run(base_cmd + ["--one", name], capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    first = results[next(iter(HOT_VARIANTS))][0]
    print(f"CPU, torch threads {args.threads or 'default'}; student Llama H={args.hidden}, {args.layers} layers, "
          f"V={args.vocab:,}; batch {args.batch_size} x {args.seq} tokens ({first['rows']:,} loss rows), "
          f"top-k {args.top_k}; median of {args.reps} steps x {args.rounds} rounds (one process per variant and round)")
    floor = statistics.median(r["ms"] for r in results[next(iter(HOT_VARIANTS))])
    print("peak MiB: the process's peak RSS; step MiB: how far the steps raised it above the set-up's peak")
    print(f"{'variant':50s} {'ms/step':>9s} {'x floor':>8s} {'peak MiB':>9s} {'step MiB':>9s} {'loss rows/s':>12s}")
    for name, rs in results.items():
        ms = statistics.median(r["ms"] for r in rs)
        peak = max(r["peak_mib"] for r in rs)
        step_mib = max(r["step_mib"] for r in rs)
        print(f"{name:50s} {ms:9.1f} {ms / floor:8.2f} {peak:9.0f} {step_mib:9.0f} {rs[0]['rows'] / ms * 1e3:12,.0f}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    ap.add_argument("--reps", type=int, default=6, help="timed steps per variant and round, after 2 warm-up steps")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over the variants (hot table)")
    ap.add_argument("--top-k", type=int, default=64, help="teacher log-probs per position")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary (hot table)")
    ap.add_argument("--hidden", type=int, default=512, help="student width (hot table)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence (hot table)")
    ap.add_argument("--layers", type=int, default=2, help="student blocks (online table: student and teacher; default 4 there)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--workdir", default=None, help="where to build models and the cache (default: a temp folder)")
    ap.add_argument("--online-table", action="store_true", help="offline vs online KD vs the student alone (tiny models)")
    ap.add_argument("--student-hidden", type=int, default=128, help="online table: student width (teacher: 2x)")
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_hot_variant(args, args.one)))
        return 0
    if args.online_table:
        if "--layers" not in (argv or sys.argv):
            args.layers = 4
        return online_table(args)
    return hot_table(args)


if __name__ == "__main__":
    sys.exit(main())
