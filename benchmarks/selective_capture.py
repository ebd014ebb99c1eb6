"""Selective capture: cache bytes vs the student's held-out KL when the teacher is stored at only a
share of the loss positions (`fastkd cache-teacher --capture-share F`).

    python benchmarks/selective_capture.py --work runs/selective-capture --threads 1 [--seeds 3] [--steps 300]

Issue 15, item 3 (a published method keeps the teacher at the highest-entropy ~20% of tokens and
reports 80% less storage at no quality loss). On the replication's four tasks:

1. Training records: `fastkd data synth` records, seed 100, --per-task per task (BBH inputs and the
   scored held-out items excluded, as benchmarks/replication.py does). Held-out records: generated
   items of the same tasks that are neither BBH items nor training records (seed 300).
2. The embedded teacher cached over the training records with rationales, top-64, default codec, once
   per arm: all positions (100%), the highest-entropy 50% and 20% of each sequence's loss positions,
   and a random 20% (control: is entropy the right choice?). Bytes = every file of the cache
   (tokens, index, headers, digests, manifest) per loss position, and the logits payload alone.
   The held-out records are cached at 100%: the yardstick.
3. Per seed, one student initialisation, one KD+CoT student per arm (same shape, steps, data order),
   loss CE + KL where the teacher is stored, CE alone elsewhere (kl_weight 1: no re-weighting).
4. Held-out KL(teacher || student) over top-64 + tail and held-out CE, per response token, from the
   trainer's final evaluation on the held-out cache; mean +- sd over seeds, and the paired difference
   to the 100% arm with its 95% t interval.
Written: results.json and table.md in --work. Every stage is resumable (rerun the same command).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cross_tokenizer import heldout_records  # noqa: E402
from replication import T_975, write_records_once  # noqa: E402

from fastkd.demo import DEMO_TASKS, write_held_out  # noqa: E402
from fastkd.paths import EMBEDDED_TEACHER  # noqa: E402
from fastkd.tiny import STUDENT_SHAPE, make_student_init  # noqa: E402

ARMS = {"100%": (1.0, "entropy"), "50% entropy": (0.5, "entropy"), "20% entropy": (0.2, "entropy"),
        "20% random": (0.2, "random")}


def cache_arm(teacher: Path, records: Path, out: Path, share: float, by: str) -> dict:
    """Cache (or resume) one arm; its bytes per loss position from the sealed manifest."""
    from fastkd.cache_stage import cache_teacher
    from fastkd.cache_tools import CacheReader

    cache_teacher(dict(teacher=str(teacher), data=str(records), out=str(out), top_k=64, cot=True, batch_size=32,
                       max_length=512, progress=False, capture_share=share, capture_by=by))
    counts = CacheReader(out).manifest["counts"]
    positions = max(int(counts["loss_positions"]), 1)
    payload = counts["payload_bytes"]
    return {"positions": positions, "all_files_B": counts["bytes"] / positions,
            "logits_B": (payload.get("topk", 0) + payload.get("counts", 0) + payload.get("rows", 0)) / positions,
            "tokens_B": payload.get("tokens", 0) / positions, "rows_B": payload.get("rows", 0) / positions}


def train_arm(work: Path, name: str, init: Path, cache: Path, heldout_cache: Path, steps: int, seed: int) -> dict:
    """One student (reused when finished, resumed when killed); its final held-out CE and KL."""
    from fastkd.trainer import train

    out = work / name
    metrics = out / "metrics.jsonl"
    if not (out / "final" / "config.json").exists():
        train(dict(student=str(init), cache=str(cache), eval_cache=str(heldout_cache), max_steps=steps, batch_size=16,
                   lr=3e-3, warmup_steps=steps // 10, schedule="cosine", seed=seed, progress=False, tensorboard=False,
                   max_length=512, group_batches=1, out=str(out), resume=(out / "checkpoint").exists(),
                   overwrite=not (out / "checkpoint").exists()))
    last = [json.loads(line) for line in metrics.read_text().splitlines() if '"eval_kl"' in line][-1]
    if last["step"] != steps:
        raise SystemExit(f"{out}: trained for {last['step']} steps, this run asks for {steps}; use another --work")
    return {"kl": last["eval_kl"], "ce": last["eval_ce"]}


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def paired(a: list[float], b: list[float]) -> str:
    d = [x - y for x, y in zip(a, b)]
    m = statistics.mean(d)
    if len(d) < 2:
        return f"{m:+.4f}"
    half = T_975[len(d) - 1] * statistics.stdev(d) / len(d) ** 0.5
    return f"{m:+.4f} [{m - half:+.4f}, {m + half:+.4f}]"


def table(result: dict) -> str:
    base = result["students"]["100%"]
    lines = ["| arm | teacher rows kept | all files B/position | logits B/position | held-out KL (nats/token) | "
             "KL − 100% [95% CI] | held-out CE | CE − 100% [95% CI] |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for arm, runs in result["students"].items():
        c = result["caches"][arm]
        kl, ce = [r["kl"] for r in runs], [r["ce"] for r in runs]
        diff_kl = "-" if arm == "100%" else paired(kl, [r["kl"] for r in base])
        diff_ce = "-" if arm == "100%" else paired(ce, [r["ce"] for r in base])
        lines.append(f"| {arm} | {c['kept_share']:.1%} | {c['all_files_B']:.1f} | {c['logits_B']:.1f} | {mean_sd(kl)} | "
                     f"{diff_kl} | {mean_sd(ce)} | {diff_ce} |")
    return "\n".join(lines)


def kept_share(cache: Path) -> float:
    """Share of loss positions whose stored row holds the teacher (read back, not taken from the settings)."""
    from fastkd.cache_tools import CacheReader

    kept = total = 0
    for seq in CacheReader(cache):
        kept += int((seq.topk_ids >= 0).any(axis=1).sum())
        total += len(seq.tail)
    return kept / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="runs/selective-capture")
    ap.add_argument("--teacher", type=Path, default=EMBEDDED_TEACHER)
    ap.add_argument("--per-task", type=int, default=250, help="training records per task")
    ap.add_argument("--heldout-per-task", type=int, default=40, help="held-out records per task for the KL")
    ap.add_argument("--synthetic-items", type=int, default=500, help="held-out scored items excluded from training, as in replication.py")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per student (batch 16)")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma list of: " + ", ".join(ARMS))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or "100%" not in arms:
        raise SystemExit(f"--arms: unknown {unknown}; the 100% arm is the baseline and must be included")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    held_out = write_held_out(work / "synthetic-eval", DEMO_TASKS, args.synthetic_items)
    records = write_records_once(work / "records.jsonl", args.per_task, held_out)
    heldout = heldout_records(work, records, args.heldout_per_task)
    heldout_cache = work / "cache-heldout"
    cache_arm(args.teacher, heldout, heldout_cache, 1.0, "entropy")
    caches = {}
    for arm in arms:
        share, by = ARMS[arm]
        path = work / f"cache-{arm.replace('%', 'pc').replace(' ', '-')}"
        caches[arm] = dict(cache_arm(args.teacher, records, path, share, by), path=str(path), kept_share=kept_share(path))
        c = caches[arm]
        print(f"cache {arm}: {c['all_files_B']:.1f} B/position all files, logits {c['logits_B']:.1f} (rows bits "
              f"{c['rows_B']:.2f}), tokens {c['tokens_B']:.2f}, kept {c['kept_share']:.1%}", flush=True)
    seconds_cache = time.perf_counter() - t0
    students: dict = {arm: [] for arm in arms}
    for seed in range(args.seeds):
        init = make_student_init(args.teacher, work / f"init-{seed}", seed, STUDENT_SHAPE)
        for arm in arms:
            tag = f"{arm.replace('%', 'pc').replace(' ', '-')}-s{seed}"
            students[arm].append(train_arm(work / "students", tag, init, Path(caches[arm]["path"]), heldout_cache,
                                           args.steps, seed))
            print(f"seed {seed} {arm}: held-out KL {students[arm][-1]['kl']:.4f}, CE {students[arm][-1]['ce']:.4f}", flush=True)
    result = {"caches": caches, "students": students, "args": {k: str(v) for k, v in vars(args).items()},
              "seconds": {"records + caches": round(seconds_cache), "total": round(time.perf_counter() - t0)}}
    (work / "results.json").write_text(json.dumps(result, indent=2))
    text = table(result)
    (work / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
