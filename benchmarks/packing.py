"""--packing against today's length-grouped padded batches: padding share and loss positions per CPU-second.

Two length mixes, each one epoch over the same sequences per method:
  records     the replication's records (`fastkd data synth`, seed 100, the four demo tasks; --per-task of
              them), tokenised by the embedded teacher's tokenizer as `fastkd train --data` does (max 512)
  log-normal  random sequences whose lengths follow a log-normal with a 20x spread (the 95th percentile 20 times
              the 5th; median --median tokens), 70% of each sequence in the loss
Each sequence carries cache-like teacher rows (random top-k log-probs + exact tail) at its loss positions, so
a step is a KD step: the demo's student (0.55M-parameter Llama, sdpa attention), forward + loss (CE + KL) +
backward + AdamW, float32 on CPU. Methods, same sequences per epoch:
  grouped      today's default: --batch-size sequences per step, windows of 32 batches sorted by length
  ungrouped    --group-batches 1 (what the demo and the replication train with)
  packed       --packing: rows of --max-length tokens (512 as the replication trains, and 384, just above its
               longest record; 1024 for the log-normal mix), R rows per step (R chosen so a step holds about as
               many real tokens as a grouped step of --batch-size sequences)
Batches are collated before timing (in training the read-ahead thread builds them). Padding share: padded
slots / all slots of the collated batches over the epoch (exact, from the plan). Attention scores: the entries
of the score matrices over the epoch, computed over whole rows with a mask (eager, sdpa: what runs here) and
inside each sequence only (a varlen kernel: flash attention), relative to grouped's masked count. Time: CPU
seconds of this process at one thread (waiting for a shared core is not counted), the methods' epochs
interleaved in slices; the table gives the median over rounds and the ratio to `grouped` of the same rounds.

    python benchmarks/packing.py --threads 1                       # 9 minutes on a loaded 2-core machine
    python benchmarks/packing.py --threads 1 --mixes lognormal --lognormal 300 --rounds 2 --hidden 384   # 7 minutes
(the second: a wider student, in which attention weighs less against the layers' matrix products)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402


class Sequences:
    """An in-memory source (lengths, one-sequence shards, items) of sequences with teacher rows."""

    def __init__(self, items):
        self.items = items
        self.lengths = np.array([len(s.input_ids) for s in items], dtype=np.int64)
        self.shards = list(np.arange(len(items), dtype=np.int64).reshape(-1, 1))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[int(i)]


def with_teacher(rng, index, ids, mask, vocab: int, k: int):
    """A cached sequence: teacher rows (sorted top-k log-probs of a random distribution, exact tail) at mask[1:]."""
    from fastkd.cache_tools import CachedSequence

    n = int(np.asarray(mask)[1:].sum())
    logits = rng.standard_normal((n, vocab)) * 3.0
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    top = np.argsort(-logp, axis=1)[:, :k]
    values = np.take_along_axis(logp, top, axis=1)
    tail = np.clip(1.0 - np.exp(values).sum(axis=1), 0.0, 1.0)
    return CachedSequence(record_index=index, task="t", input_ids=np.asarray(ids, np.int32),
                          loss_mask=np.asarray(mask, np.uint8), topk_ids=top.astype(np.int64),
                          topk_logprobs=values.astype(np.float32), tail=tail.astype(np.float32))


def replication_records(per_task: int, tokenizer, k: int, work: Path) -> Sequences:
    from fastkd import synth
    from fastkd.demo import DEMO_TASKS
    from fastkd.train_data import RecordSource

    records = []
    for task in DEMO_TASKS:
        records += synth.generate(task, per_task, seed=100)
    synth.write_jsonl(work / "records.jsonl", records)
    source = RecordSource(work / "records.jsonl", tokenizer, max_length=512)
    rng = np.random.default_rng(0)
    return Sequences([with_teacher(rng, i, s.input_ids, s.loss_mask, len(tokenizer), k)
                      for i, s in enumerate(source.sequences)])


def lognormal_mix(n: int, median: int, longest: int, vocab: int, k: int) -> Sequences:
    """Lengths exp(N(log median, sigma)) with sigma so that p95 / p5 = 20; the last 70% of each in the loss."""
    rng = np.random.default_rng(1)
    sigma = np.log(20.0) / (2 * 1.6449)
    lengths = np.clip(np.exp(rng.normal(np.log(median), sigma, size=n)).round().astype(int), 8, longest)
    items = []
    for i, length in enumerate(lengths):
        mask = np.zeros(length, np.uint8)
        mask[int(0.3 * length):] = 1
        items.append(with_teacher(rng, i, rng.integers(4, vocab, length), mask, vocab, k))
    return Sequences(items)


def batches(source: Sequences, method: str, batch_size: int, row_length: int, rows: int) -> list:
    from fastkd.loader import PlanMaker, collate
    from fastkd.packing import collate_packed

    if method.startswith("packed"):
        plan = PlanMaker(source.lengths, source.shards, rows, seed=0, row_length=row_length)(0)
        return [collate_packed([[source[p] for p in row] for row in b], 0) for b in plan]
    plan = PlanMaker(source.lengths, source.shards, batch_size, 0, group_batches=32 if method == "grouped" else 1)(0)
    return [collate([source[p] for p in b], 0) for b in plan]


def kd_step(student_dir: Path, tokenizer):
    """A fresh student (the same initialisation every time) and its KD step: forward, loss, backward, AdamW."""
    from fastkd.student import StudentWithLoss, batch_inputs, load_student
    from fastkd.train_config import TrainConfig

    config = TrainConfig.make(overrides=dict(cache="unused", student=str(student_dir), progress=False))
    module = StudentWithLoss(load_student(config, torch.device("cpu")), len(tokenizer), config)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)

    def step(batch) -> None:
        module(**batch_inputs(batch, [])).total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def epoch_seconds(methods: dict, student_dir: Path, tokenizer, slices: int = 8) -> dict:
    """One epoch per method, interleaved slice by slice (so a change of machine load hits every method alike);
    CPU seconds of this process (at one thread, the time waiting for the core is not counted)."""
    steps = {m: kd_step(student_dir, tokenizer) for m in methods}
    spent = dict.fromkeys(methods, 0.0)
    for part in range(slices):
        for m, items in methods.items():
            chunk = np.array_split(np.arange(len(items)), slices)[part]
            start = time.process_time()
            for i in chunk:
                steps[m](items[i])
            spent[m] += time.process_time() - start
    return spent


def measure(name: str, source: Sequences, args, row_lengths: list[int], student_dir: Path, tokenizer) -> list[str]:
    """The table's lines for one length mix: each method's steps, padding share, loss positions per CPU-second."""
    shapes = {"grouped": (f"{args.batch_size} sequences", 0, 0), "ungrouped": (f"{args.batch_size} sequences", 0, 0)}
    for length in row_lengths:   # rows per step: about the real tokens of a grouped step
        rows = max(1, round(args.batch_size * float(source.lengths.mean()) / length))
        shapes[f"packed {length}"] = (f"{rows} rows of <= {length} tokens", length, rows)
    methods = {m: batches(source, m, args.batch_size, length, rows) for m, (_, length, rows) in shapes.items()}
    loss_rows = {m: sum(b.num_rows for b in items) for m, items in methods.items()}
    assert len(set(loss_rows.values())) == 1, loss_rows           # every method trains on the same loss positions
    times = {m: [] for m in methods}
    for _ in range(args.rounds):
        for m, seconds in epoch_seconds(methods, student_dir, tokenizer).items():
            times[m].append(seconds)
    out = []
    base_scores = attention_scores(methods["grouped"])[0]
    for m, items in methods.items():
        padding = 1 - sum(b.num_tokens for b in items) / sum(b.input_ids.numel() for b in items)
        rate = loss_rows[m] / statistics.median(times[m])
        dense, inside = (x / base_scores for x in attention_scores(items))
        ratio = statistics.median(g / t for g, t in zip(times["grouped"], times[m]))   # round by round
        out.append(f"| {name} | {m.split()[0]} ({shapes[m][0]}) | {len(items)} | {padding:.1%} | {dense:.2f} / "
                   f"{inside:.2f} | {rate:,.0f} | {ratio:.2f}x |")
    return out


def attention_scores(items: list) -> tuple[float, float]:
    """Attention score entries per layer and head over an epoch: as computed with a mask over whole rows (eager,
    sdpa), and inside each sequence only (what a varlen kernel such as flash attention computes)."""
    dense = sum(b.input_ids.shape[0] * b.input_ids.shape[1] ** 2 for b in items)
    inside = sum(n * n for b in items for n in ([s[2] for s in b.segments] if b.segments
                                                   else b.attention_mask.sum(1).tolist()))
    return float(dense), float(inside)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-task", type=int, default=150, help="replication records per task (4 tasks)")
    ap.add_argument("--lognormal", type=int, default=600, help="sequences of the log-normal mix")
    ap.add_argument("--median", type=int, default=128, help="median length of the log-normal mix")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per grouped step (the replication's 16)")
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mixes", default="records,lognormal", help="which length mixes (comma list)")
    ap.add_argument("--hidden", type=int, default=None, help="a wider student than the demo's (hidden 96): width, "
                                                             "with 3 layers, 4 heads, MLP 3x the width")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fastkd.paths import EMBEDDED_TEACHER
    from fastkd.tiny import STUDENT_SHAPE, load_saved_tokenizer, make_student_init

    tokenizer = load_saved_tokenizer(EMBEDDED_TEACHER)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shape = dict(STUDENT_SHAPE, hidden=args.hidden, intermediate=3 * args.hidden) if args.hidden else None
        student = make_student_init(EMBEDDED_TEACHER, work / "student", seed=0, shape=shape)
        chosen = args.mixes.split(",")
        mixes = [("replication records", replication_records(args.per_task, tokenizer, args.top_k, work), [512, 384])
                 ] if "records" in chosen else []
        if "lognormal" in chosen:
            mixes.append(("log-normal, 20x spread", lognormal_mix(args.lognormal, args.median, 1024, len(tokenizer),
                                                                  args.top_k), [1024]))
        lines = ["| length mix | batches | steps | padding share | attention scores: masked / varlen | "
                 "loss positions per CPU-second | vs grouped |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, source, row_lengths in mixes:
            lengths = source.lengths
            print(f"{name}: {len(lengths)} sequences, lengths {lengths.min()}..{lengths.max()} (median "
                  f"{int(np.median(lengths))}, mean {lengths.mean():.0f}, p95/p5 "
                  f"{np.percentile(lengths, 95) / np.percentile(lengths, 5):.1f})", flush=True)
            lines += measure(name, source, args, row_lengths, student, tokenizer)
    width = f"hidden {args.hidden}" if args.hidden else "the demo's 0.55M-parameter Llama, hidden 96"
    print(f"\n{args.rounds} rounds, median; {args.threads} thread(s); student: {width}, 3 layers, sdpa; KD (CE + KL, "
          f"top-{args.top_k} + tail), float32 CPU; attention scores: entries computed per layer and head, relative to "
          f"grouped\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
