"""The laptop-scale replication of KD vs KD+CoT (not a CI test: about 1 h 45 min on 2 cores).

    python benchmarks/replication.py --work runs/replication [--seeds 5] [--steps 800] [--threads 1]
    python benchmarks/replication.py --work runs/replication --granularity   # coarse vs fine rationales
    python benchmarks/replication.py --work runs/replication-2000 --steps 2000 --methods KD,KD+CoT

At 800 steps the 0.55M students break half their chains and KD+CoT ends level with KD; at
2,000 steps KD+CoT leads on every seed (docs/replication.md has both runs).

The two experiments are separate processes; with `--threads 1` each, both run side by side on a
2-core machine (tiny models use a second thread poorly).

Main experiment: held-out synthetic items are drawn first (--synthetic-items per task, BBH
inputs excluded); the training records exclude both BBH and those items. The teacher
(fastkd/assets/teacher, or --teacher) is cached over the records twice (with rationales;
answers only); then for every seed, three students of one shape and one initialisation are
trained (SFT on the records, KD from the answer-only cache, KD+CoT from the rationale cache)
and scored on (a) every real BBH item of the tasks and (b) the held-out synthetic items, each
in the prompt format it was trained on. The teacher is scored the same way, in both formats.
Written: results.json, table.md (mean and standard deviation per method and task, paired
differences with 95% confidence intervals over seeds) and scores.png.

Granularity experiment (--granularity), after "Unveiling the Key Factors for Distilling CoT
Reasoning": students of about 0.25M and 1M parameters fine-tuned (SFT) on coarse or on fine
rationales of the same inputs, 3 seeds each, scored on the real BBH items. SFT, not KD, because
the embedded teacher was trained on fine rationales only: its distribution over a coarse
rationale's tokens would not be a teacher of coarse reasoning.

Every stage is resumable: rerun the same command after a kill and finished students and
scores are reused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

from fastkd.demo import DEMO_TASKS, PROMPT_FORMAT, write_held_out, write_records
from fastkd.paths import EMBEDDED_TEACHER
from fastkd.tiny import STUDENT_SHAPE, make_student_init

STUDENTS = {"0.25M": dict(hidden=64, layers=3, heads=4, kv_heads=4, intermediate=192),
            "0.5M": STUDENT_SHAPE,   # the demo's student
            "1M": dict(hidden=128, layers=4, heads=4, kv_heads=4, intermediate=384)}
METHODS = ("SFT", "KD", "KD+CoT")
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t interval."""
    if len(values) < 2:
        return (values[0] if values else float("nan")), float("nan")
    return statistics.mean(values), T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def methods_list(text: str) -> list[str]:
    """`--methods KD,KD+CoT` -> ["KD", "KD+CoT"], in the table's order; unknown names are an error."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = sorted(set(names) - set(METHODS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or text!r}; choose from {', '.join(METHODS)}")
    return [m for m in METHODS if m in names]


def scored_already(results_file: Path, items_per_task: dict[str, int]) -> bool:
    """True when an earlier eval-bbh run scored exactly these items' counts (a rerun with another
    --synthetic-items or --limit must score again, not reuse the old figures)."""
    if not results_file.exists():
        return False
    scored = json.loads(results_file.read_text()).get("tasks", {})
    return {task: v.get("n") for task, v in scored.items()} == items_per_task


def evaluate(model: Path, out: Path, name: str, bbh_dir: str | None, fmt: str = "trained", limit: int = 0) -> dict:
    """Strict accuracy per task and micro, from `eval-bbh` (reused when `out` already holds the same items)."""
    from fastkd.evaluate import EvalConfig, evaluate_bbh
    from fastkd.synth.common import load_real_items

    counts = {task: len(load_real_items(task, bbh_dir)) for task in DEMO_TASKS}
    if limit:
        counts = {task: min(n, limit) for task, n in counts.items()}
    if not scored_already(out / "results.json", counts):
        evaluate_bbh(EvalConfig.make(overrides=dict(
            model=str(model), prompt_format=fmt, tasks=",".join(DEMO_TASKS), max_new_tokens=400, batch_size=64,
            out=str(out), name=name, bbh_dir=bbh_dir, limit=limit or None, overwrite=True)))
    res = json.loads((out / "results.json").read_text())
    return {t: v["strict"] for t, v in res["tasks"].items()} | {"micro": res["summary"]["strict"]["micro"]}


def train_student(work: Path, name: str, init: Path, steps: int, seed: int, **source) -> Path:
    """One student run (reused when finished; resumed from its checkpoint when killed)."""
    from fastkd.trainer import train

    out = work / name
    if (out / "final" / "config.json").exists():
        trained_steps = json.loads((out / "final" / "fastkd_train.json").read_text())["config"]["max_steps"]
        if trained_steps != steps:
            raise SystemExit(f"{out}: this student was trained for {trained_steps} steps, this run asks for {steps}; "
                             f"use another --work folder (or delete {out})")
        return out / "final"
    result = train(dict(student=str(init), max_steps=steps, batch_size=16, lr=3e-3, warmup_steps=steps // 10,
                        schedule="cosine", seed=seed, progress=False, tensorboard=False, max_length=512,
                        group_batches=1, out=str(out), resume=(out / "checkpoint").exists(),
                        overwrite=not (out / "checkpoint").exists(), **source))
    return result.final_dir


def write_records_once(path: Path, per_task: int, held_out: dict[str, list[str]]) -> Path:
    """The students' records; a work folder whose caches and students came from other records
    (another --records-per-task or --synthetic-items: the records exclude the scored items) is
    refused, and its records file is left as it was."""
    fresh = write_records(path.with_name(".records.new.jsonl"), DEMO_TASKS, per_task, seed=100, held_out=held_out)
    if path.exists() and path.read_bytes() != fresh.read_bytes():
        fresh.unlink()
        raise SystemExit(f"{path}: this work folder was made with other records (was --records-per-task or "
                         f"--synthetic-items changed?); its caches and students belong to them: use another --work")
    os.replace(fresh, path)
    return path


def main_experiment(args) -> dict:
    from fastkd.cache_stage import cache_teacher

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    clock = {}
    t0 = time.perf_counter()
    synthetic = work / "synthetic-eval"
    held_out = write_held_out(synthetic, DEMO_TASKS, args.synthetic_items)
    records = write_records_once(work / "records.jsonl", args.records_per_task, held_out)
    for name, cot in (("cache-cot", True), ("cache-answers", False)):
        cache_teacher(dict(teacher=str(args.teacher), data=str(records), out=str(work / name), top_k=64, cot=cot,
                           batch_size=32, max_length=512,
                           progress=False))   # resumes, or returns at once when complete
    clock["records + caches"] = time.perf_counter() - t0
    splits = (("bbh", args.bbh_dir), ("synthetic", str(synthetic)))
    scores: dict = {"bbh": {}, "synthetic": {}}
    t0 = time.perf_counter()
    for method, fmt in (("teacher CoT", "trained"), ("teacher direct", "trained-direct")):
        for split, bbh_dir in splits:
            tag = method.replace(" ", "-")
            scores[split].setdefault(method, []).append(evaluate(args.teacher, work / "eval" / split / tag, tag, bbh_dir, fmt, args.limit))
    clock["teacher eval"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for seed in (args.seeds_only or range(args.seeds)):
        init = make_student_init(args.teacher, work / f"init-{seed}", seed, STUDENTS[args.student])
        sources = {"SFT": dict(data=str(records), kl_weight=0.0), "KD": dict(cache=str(work / "cache-answers")),
                   "KD+CoT": dict(cache=str(work / "cache-cot"))}
        for method in args.methods:
            source = sources[method]
            tag = f"{method.lower().replace('+', '-')}-s{seed}"
            final = train_student(work / "students", tag, init, args.steps, seed, **source)
            for split, bbh_dir in splits:
                scores[split].setdefault(method, []).append(
                    evaluate(final, work / "eval" / split / tag, tag, bbh_dir, PROMPT_FORMAT[method], args.limit))
            print(f"seed {seed} {method}: BBH micro {scores['bbh'][method][-1]['micro']:.1f}, "
                  f"synthetic micro {scores['synthetic'][method][-1]['micro']:.1f}", flush=True)
    clock["students: train + eval"] = time.perf_counter() - t0
    return {"scores": scores, "seconds": {k: round(v) for k, v in clock.items()}, "args": vars(args)}


MAIN_PAIRS = (("KD+CoT", "KD"), ("KD+CoT", "SFT"), ("KD", "SFT"), ("teacher CoT", "teacher direct"))
GRANULARITY_PAIRS = (("SFT 0.25M fine", "SFT 0.25M coarse"), ("SFT 1M fine", "SFT 1M coarse"))


def table(scores: dict, pairs=MAIN_PAIRS) -> str:
    """Markdown: mean ± standard deviation over seeds per method and task; paired differences."""
    lines = []
    for split, by_method in scores.items():
        columns = [c for c in DEMO_TASKS + ["micro"] if any(c in r for runs in by_method.values() for r in runs)]
        lines += [f"### {split}", "", "| method | runs | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
        for method, runs in by_method.items():
            cells = []
            for c in columns:
                vals = [r[c] for r in runs if c in r]
                cells.append(f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}" if len(vals) > 1
                             else f"{vals[0]:.1f}")
            lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")
        lines.append("")
        diffs_rows = []
        for a, b in pairs:
            if a in by_method and b in by_method:
                row = []
                for c in columns:
                    m, h = mean_ci([x[c] - y[c] for x, y in zip(by_method[a], by_method[b])])
                    row.append(f"{m:+.1f}" if math.isnan(h) else f"{m:+.1f} [{m - h:+.1f}, {m + h:+.1f}]")
                diffs_rows.append(f"| {a} − {b} | " + " | ".join(row) + " |")
        if diffs_rows:
            lines += ["paired difference, mean [95% CI] over seeds (points):", "",
                      "| pair | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|", *diffs_rows, ""]
    return "\n".join(lines)


def plot(scores: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scores), figsize=(6 * len(scores), 4), squeeze=False)
    for ax, (split, by_method) in zip(axes[0], scores.items()):
        names = list(by_method)
        means = [statistics.mean(r["micro"] for r in by_method[m]) for m in names]
        errs = [mean_ci([r["micro"] for r in by_method[m]])[1] for m in names]
        ax.bar(names, means, yerr=[0 if math.isnan(e) else e for e in errs], capsize=4)
        ax.set_title(f"{split}: micro accuracy (95% CI over seeds)")
        ax.set_ylabel("% correct (strict)")
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def granularity_experiment(args) -> dict:
    work = Path(args.work) / "granularity"
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    t0 = time.perf_counter()
    for granularity in ("coarse", "fine"):
        # the same inputs (same seed) at both granularities
        records = write_records(work / f"records-{granularity}.jsonl", DEMO_TASKS, args.records_per_task, 100, granularity)
        for size in ("0.25M", "1M"):
            for seed in range(3):
                init = make_student_init(args.teacher, work / f"init-{size}-{seed}", seed, STUDENTS[size])
                tag = f"{granularity}-{size}-s{seed}"
                final = train_student(work / "students", tag, init, args.steps, seed, data=str(records), kl_weight=0.0)
                out.setdefault(f"SFT {size} {granularity}", []).append(
                    evaluate(final, work / "eval" / tag, tag, args.bbh_dir, "trained", args.limit))
                print(f"{tag}: BBH micro {out[f'SFT {size} {granularity}'][-1]['micro']:.1f}", flush=True)
    return {"scores": {"bbh": out}, "seconds": {"all": round(time.perf_counter() - t0)}, "args": vars(args)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/replication")
    ap.add_argument("--teacher", type=Path, default=EMBEDDED_TEACHER)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--seeds-only", type=lambda text: [int(x) for x in text.split(",")], default=None,
                    help="train and score only these seeds (e.g. 3,4), to split the work over processes; a "
                         "final run without it reuses every finished student and writes the whole table")
    ap.add_argument("--steps", type=int, default=800,
                    help="optimizer steps per student (batch 16; 2000: where KD+CoT pulls ahead of KD, "
                         "see docs/replication.md)")
    ap.add_argument("--methods", type=methods_list, default=list(METHODS),
                    help="students to train per seed, comma-separated (default: SFT,KD,KD+CoT)")
    ap.add_argument("--student", default="0.5M", choices=list(STUDENTS), help="student shape (main experiment)")
    ap.add_argument("--records-per-task", type=int, default=2000)
    ap.add_argument("--synthetic-items", type=int, default=500,
                    help="held-out generated items per task, a prefix of the split build_teacher.py kept out of the "
                         "embedded teacher's records (at most 2,000 per task, 250 for boolean_expressions); "
                         "the full 2,000 adds about 35 minutes of scoring; the records exclude these items, so a "
                         "new count needs a new --work folder")
    ap.add_argument("--bbh-dir", default=None)
    ap.add_argument("--limit", type=int, default=0, help="score only the first N items per task (0: all; for smoke runs)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--granularity", action="store_true", help="run the coarse-vs-fine experiment instead")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = granularity_experiment(args) if args.granularity else main_experiment(args)
    work = Path(args.work) / ("granularity" if args.granularity else "")
    result["args"] = {k: str(v) for k, v in result["args"].items()}
    pairs = GRANULARITY_PAIRS if args.granularity else MAIN_PAIRS
    if not args.seeds_only:   # a --seeds-only run is a part: the files come from a final run without it
        (work / "results.json").write_text(json.dumps(result, indent=2))
        (work / "table.md").write_text(table(result["scores"], pairs) + f"\nwall time (s): {result['seconds']}\n")
        plot(result["scores"], work / "scores.png")
    print(table(result["scores"], pairs))
    print("wall time (s):", result["seconds"])


if __name__ == "__main__":
    main()
