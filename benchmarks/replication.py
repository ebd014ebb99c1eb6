"""The laptop-scale replication of KD vs KD+CoT (not a CI test: about two hours on 2 cores).

    python benchmarks/replication.py --work runs/replication [--seeds 5] [--steps 800]
    python benchmarks/replication.py --work runs/replication --granularity   # coarse vs fine rationales

Main experiment: the teacher (fastkd/assets/teacher, or --teacher) is cached over the same
synthetic records twice (with rationales; answers only); then for every seed, three students
of one shape and one initialisation are trained (SFT on the records, KD from the answer-only
cache, KD+CoT from the rationale cache) and scored on (a) every real BBH item of the tasks and
(b) --synthetic-items fresh generated items per task (seed-disjoint from the training records,
BBH inputs excluded), both in the trained prompt format. Written: results.json, table.md (mean
and standard deviation per method and task, paired differences KD+CoT - KD and KD+CoT - SFT
with 95% confidence intervals over seeds) and scores.png.

Granularity experiment (--granularity): coarse vs fine rationales, KD+CoT, students of about
0.25M and 1M parameters, 3 seeds each.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from fastkd.demo import DEMO_TASKS, EMBEDDED_TEACHER, PROMPT_FORMAT, make_student_init, write_records

STUDENTS = {"0.25M": dict(hidden=64, layers=3, heads=4, kv_heads=4, intermediate=192),
            "0.5M": dict(hidden=96, layers=3, heads=4, kv_heads=4, intermediate=256),
            "1M": dict(hidden=128, layers=4, heads=4, kv_heads=4, intermediate=384)}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def synthetic_bbh_folder(out: Path, tasks: list[str], n: int, seed: int) -> Path:
    """Fresh generated items written in BBH's own file layout, so eval-bbh scores them as-is."""
    from fastkd import synth

    folder = out / "bbh"
    folder.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        items = [{"input": r["source"], "target": r["target"]} for r in synth.generate(task, n, seed=seed)]
        (folder / f"{task}.json").write_text(json.dumps({"canary": "synthetic", "examples": items}))
    return out


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t interval."""
    if len(values) < 2:
        return (values[0] if values else float("nan")), float("nan")
    return statistics.mean(values), T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def evaluate(model: Path, out: Path, name: str, bbh_dir: str | None, fmt: str = "trained") -> dict:
    from fastkd.cli import main as cli

    argv = ["eval-bbh", "--model", str(model), "--prompt-format", fmt, "--tasks", ",".join(DEMO_TASKS),
            "--max-new-tokens", "400", "--batch-size", "64", "--out", str(out), "--name", name]
    if bbh_dir:
        argv += ["--bbh-dir", bbh_dir]
    if cli(argv) != 0:
        raise SystemExit(f"eval-bbh failed for {model}")
    return json.loads((out / "results.json").read_text())


def train_student(work: Path, name: str, init: Path, steps: int, seed: int, **source) -> Path:
    from fastkd.trainer import train

    result = train(dict(student=str(init), max_steps=steps, batch_size=16, lr=3e-3, warmup_steps=steps // 10,
                        schedule="cosine", seed=seed, progress=False, tensorboard=False, max_length=512,
                        out=str(work / name), resume=(work / name / "checkpoint").exists(), **source))
    return result.final_dir


def main_experiment(args) -> dict:
    from fastkd.cache_stage import cache_teacher

    work = Path(args.work)
    records = write_records(work / "records.jsonl", DEMO_TASKS, args.records_per_task, seed=100)
    for name, cot in (("cache-cot", True), ("cache-answers", False)):
        cache_teacher(str(args.teacher), str(records), str(work / name), k=64, cot=cot, batch_size=32, max_length=512)
    synthetic = synthetic_bbh_folder(work / "synthetic-eval", DEMO_TASKS, args.synthetic_items, seed=200)
    scores: dict = {"bbh": {}, "synthetic": {}}
    for seed in range(args.seeds):
        init = make_student_init(args.teacher, work / f"init-{seed}", seed)
        for method, source in (("SFT", dict(data=str(records), kl_weight=0.0)),
                               ("KD", dict(cache=str(work / "cache-answers"))),
                               ("KD+CoT", dict(cache=str(work / "cache-cot")))):
            tag = f"{method.lower().replace('+', '-')}-s{seed}"
            final = train_student(work / "students", tag, init, args.steps, seed, **source)
            for split, bbh_dir in (("bbh", args.bbh_dir), ("synthetic", str(synthetic / "bbh"))):
                res = evaluate(final, work / "eval" / split / tag, tag, bbh_dir, PROMPT_FORMAT[method])
                scores[split].setdefault(method, []).append({t: v["strict"] for t, v in res["tasks"].items()}
                                                            | {"micro": res["summary"]["strict"]["micro"]})
    return scores


def table(scores: dict) -> str:
    lines = []
    for split, by_method in scores.items():
        columns = DEMO_TASKS + ["micro"]
        lines += [f"### {split}", "", "| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for method, runs in by_method.items():
            cells = []
            for c in columns:
                vals = [r[c] for r in runs if c in r]
                cells.append(f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals) if len(vals) > 1 else 0:.1f}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        for a, b in (("KD+CoT", "KD"), ("KD+CoT", "SFT")):
            if a in by_method and b in by_method:
                diffs = [x["micro"] - y["micro"] for x, y in zip(by_method[a], by_method[b])]
                m, h = mean_ci(diffs)
                lines.append(f"\npaired {a} - {b} (micro): {m:+.1f} points, 95% CI [{m - h:+.1f}, {m + h:+.1f}] over {len(diffs)} seeds")
        lines.append("")
    return "\n".join(lines)


def plot(scores: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scores), figsize=(6 * len(scores), 4))
    for ax, (split, by_method) in zip(axes if len(scores) > 1 else [axes], scores.items()):
        names = list(by_method)
        means = [statistics.mean(r["micro"] for r in by_method[m]) for m in names]
        errs = [mean_ci([r["micro"] for r in by_method[m]])[1] for m in names]
        ax.bar(names, means, yerr=[0 if math.isnan(e) else e for e in errs], capsize=4)
        ax.set_title(f"{split}: micro accuracy (95% CI)")
        ax.set_ylabel("% correct")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def granularity_experiment(args) -> dict:
    work = Path(args.work) / "granularity"
    from fastkd.cache_stage import cache_teacher

    out: dict = {}
    for granularity in ("coarse", "fine"):
        records = write_records(work / f"records-{granularity}.jsonl", DEMO_TASKS, args.records_per_task, 100, granularity)
        cache = work / f"cache-{granularity}"
        cache_teacher(str(args.teacher), str(records), str(cache), k=64, cot=True, batch_size=32, max_length=512)
        for size, shape in (("0.25M", STUDENTS["0.25M"]), ("1M", STUDENTS["1M"])):
            for seed in range(3):
                init = make_student_init(args.teacher, work / f"init-{size}-{seed}", seed, shape)
                final = train_student(work / "students", f"{granularity}-{size}-s{seed}", init, args.steps, seed, cache=str(cache))
                res = evaluate(final, work / "eval" / f"{granularity}-{size}-s{seed}", f"{granularity}-{size}", args.bbh_dir)
                out.setdefault(f"{size} {granularity}", []).append({t: v["strict"] for t, v in res["tasks"].items()}
                                                                    | {"micro": res["summary"]["strict"]["micro"]})
    return {"bbh": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/replication")
    ap.add_argument("--teacher", type=Path, default=EMBEDDED_TEACHER)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--records-per-task", type=int, default=2000)
    ap.add_argument("--synthetic-items", type=int, default=2000)
    ap.add_argument("--bbh-dir", default=None)
    ap.add_argument("--granularity", action="store_true", help="run the coarse-vs-fine experiment instead")
    args = ap.parse_args()
    scores = granularity_experiment(args) if args.granularity else main_experiment(args)
    work = Path(args.work) / ("granularity" if args.granularity else "")
    work.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps(scores, indent=2))
    (work / "table.md").write_text(table(scores))
    plot(scores, work / "scores.png")
    print(table(scores))


if __name__ == "__main__":
    main()
