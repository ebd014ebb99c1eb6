"""Training step time: offline KD (teacher cache) vs online KD (live teacher), against the floor.

Same student, same batch, same loss code (fastkd.trainer.StudentWithLoss + AdamW step):
  floor    the student's own forward + backward + optimizer step (CE only, no teacher signal)
  offline  the batch's teacher signal read from the cache (decode + collate included) + the same step with KD
  online   the teacher run live on the batch (fastkd.teacher.teacher_signal) + the same step with KD
The teacher has about 4x the student's parameters. Prints median ms/step and ratios.

  python benchmarks/train_step_table.py                 # CPU, defaults below
  python benchmarks/train_step_table.py --threads 1 --reps 20
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
    from fastkd.train import make_config
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
        cache_teacher(str(work / "teacher"), str(records), str(cache), k=top_k, max_length=512,
                      batch_size=batch_size, progress=False)

    tok = load_tokenizer(str(work / "student"))
    vocab = len(tok)
    teacher = load_causal_lm(str(work / "teacher"), dtype="float32", device="cpu")
    source = CacheSource(cache, layers=[])
    positions = list(range(batch_size))
    cfg = make_config(overrides={"cache": str(cache), "student": str(work / "student"), "progress": False,
                                 "loss_impl": "logits"})
    online_cfg = make_config(overrides={"data": str(records), "teacher": str(work / "teacher"),
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    ap.add_argument("--reps", type=int, default=10, help="timed steps per variant (interleaved), after 2 warm-up rounds")
    ap.add_argument("--top-k", type=int, default=64, help="teacher log-probs per position (cache and online alike)")
    ap.add_argument("--student-hidden", type=int, default=128, help="student width (teacher: 2x width, same depth)")
    ap.add_argument("--layers", type=int, default=4, help="blocks in student and teacher")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--workdir", default=None, help="where to build models and the cache (default: a temp folder)")
    args = ap.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
