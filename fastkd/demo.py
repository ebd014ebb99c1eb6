"""The whole loop on the embedded default, in minutes on a laptop CPU.

1. generate BBH-format training records with step-by-step rationales (`fastkd data synth`);
2. cache the embedded teacher over them twice: with rationales (KD+CoT) and answers only (KD);
3. train three identical students from one initialisation: SFT on the records (CE only),
   KD from the answer-only cache, KD+CoT from the rationale cache;
4. score the teacher and the students on the REAL BIG-Bench Hard items of those tasks, in the
   prompt format they were trained on, and print the comparison (also written as a plot).

One seed and a few hundred steps: a smoke test of the method, not a measurement of it; the
measured replication (5 seeds, confidence intervals) is `benchmarks/replication.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from fastkd.errors import UserError
from fastkd.paths import BBH_DIR_LOOKUP, EMBEDDED_TEACHER, resolve_model
from fastkd.tiny import STUDENT_SHAPE, make_student_init  # noqa: F401 - the benchmarks build their students with these

DEMO_TASKS = ["boolean_expressions", "navigate", "web_of_lies", "tracking_shuffled_objects_three_objects"]


@dataclass(frozen=True)
class DemoSize:
    """How much work one demo run does."""

    records_per_task: int = field(metadata={"help": "synthetic training records per task"})
    steps: int = field(metadata={"help": "optimizer steps per student (its training time grows in proportion)"})
    eval_items_per_task: int = field(metadata={"help": "real BBH items scored per task (the first ones)"})
    max_new_tokens: int = field(metadata={"help": "generation budget per BBH item"})


FULL = DemoSize(records_per_task=1000, steps=800, eval_items_per_task=100, max_new_tokens=400)
QUICK = DemoSize(records_per_task=150, steps=160, eval_items_per_task=20, max_new_tokens=400)
# the prompt each model answers in: its training template (KD learned from answers only)
PROMPT_FORMAT = {"SFT": "trained", "KD": "trained-direct", "KD+CoT": "trained"}
# the synthetic test split: generated items no teacher or student trains on (build_teacher.py,
# benchmarks/replication.py), scored beside the real BBH items
# (2,000 per task; boolean_expressions has only 1,872 inputs outside BBH, so 250 of them)
HELD_OUT_SEED, HELD_OUT_PER_TASK = 200, 2000
HELD_OUT_SMALL_TASKS = {"boolean_expressions": 250}


def held_out_size(task: str, n: int | None = None) -> int:
    """Items of `task` in the held-out split (at most the default size: a prefix of the split)."""
    default = HELD_OUT_SMALL_TASKS.get(task, HELD_OUT_PER_TASK)
    return default if n is None else min(n, default)


def write_held_out(folder: Path, tasks: list[str], n: int | None = None, seed: int = HELD_OUT_SEED) -> dict[str, list[str]]:
    """Generated test items (BBH inputs rejected) written in BBH's own layout, `<folder>/<task>.json`,
    so `eval-bbh --bbh-dir folder` scores them as is; returns their inputs per task. `n` caps the
    count per task; the default split is what build_teacher.py keeps out of the teacher's records."""
    from fastkd import synth

    folder.mkdir(parents=True, exist_ok=True)
    inputs = {}
    for task in tasks:
        items = [{"input": r["source"], "target": r["target"]} for r in synth.generate(task, held_out_size(task, n), seed=seed)]
        tmp = folder / f".{task}.json.tmp"
        tmp.write_text(json.dumps({"canary": "fastkd synthetic held-out items", "examples": items}))
        os.replace(tmp, folder / f"{task}.json")
        inputs[task] = [item["input"] for item in items]
    return inputs


def write_records(path: Path, tasks: list[str], n: int, seed: int, granularity: str = "fine",
                  held_out: dict[str, list[str]] | None = None) -> Path:
    """Synthetic records (BBH test inputs, and any `held_out` inputs per task, rejected) as JSONL,
    written atomically (a run reading the file meanwhile keeps the complete old one)."""
    from fastkd import synth

    records = []
    for task in tasks:
        exclude = None
        if held_out is not None:
            exclude = synth.real_inputs(task) | {synth.normalise(x) for x in held_out.get(task, [])}
        records += synth.generate(task, n, seed=seed, granularity=granularity, exclude=exclude)
    synth.write_jsonl(path, records)
    return path


def student_runs(work: Path, records: Path, init: Path, size: DemoSize, seed: int) -> dict[str, dict]:
    """The three students' training configs, identical but for the signal they learn from."""
    common = dict(student=str(init), max_steps=size.steps, batch_size=16, lr=3e-3, warmup_steps=max(size.steps // 10, 1),
                  schedule="cosine", seed=seed, eval_sequences=min(32, size.records_per_task * len(DEMO_TASKS) // 4), group_batches=1, log_every=10, progress=True, tensorboard=False,
                  max_length=512,
                  overwrite=True)   # the demo's folder is its own: a second run retrains its students (the caches are reused)
    return {
        "SFT": dict(common, data=str(records), kl_weight=0.0, out=str(work / "student-sft")),
        "KD": dict(common, cache=str(work / "cache-answers"), out=str(work / "student-kd")),
        "KD+CoT": dict(common, cache=str(work / "cache-cot"), out=str(work / "student-kd-cot")),
    }


def reuse_caches(work: Path, settings: dict) -> None:
    """The demo's folder is its own: caches made for other records (another size, seed or teacher) are
    removed; caches of the same settings are kept, so a second or interrupted demo resumes them."""
    stamp = work / "demo-caches.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return
    for name in ("cache-cot", "cache-answers"):
        if (work / name).exists():
            print(f"  ({work / name} was made for other settings: rebuilt)")
            shutil.rmtree(work / name)
    stamp.write_text(json.dumps(settings))


def demo_loop(out: str | Path = "runs/demo", quick: bool = False, teacher: str | None = None, seed: int = 0,
             bbh_dir: str | None = None, size: DemoSize | None = None) -> dict:
    from fastkd.cache_stage import cache_teacher
    from fastkd.cli import main as cli
    from fastkd.trainer import train

    size = size or (QUICK if quick else FULL)
    teacher_dir = Path(resolve_model(teacher or "embedded", "--teacher"))
    work = Path(out)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings = {}

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)

    print(f"[1/4] records: {size.records_per_task} per task for {', '.join(DEMO_TASKS)}")
    records = write_records(work / "records.jsonl", DEMO_TASKS, size.records_per_task, seed)
    reuse_caches(work, {"records_per_task": size.records_per_task, "seed": seed, "teacher": str(teacher_dir)})
    lap("records")
    print("[2/4] caching the teacher (with rationales, then answers only)")
    for name, cot in (("cache-cot", True), ("cache-answers", False)):
        cache_teacher(str(teacher_dir), str(records), str(work / name), k=64, cot=cot, batch_size=16, max_length=512,
                      sequences_per_shard=128)
    lap("cache")
    print("[3/4] training three students: SFT, KD, KD+CoT")
    init = make_student_init(teacher_dir, work / "student-init", seed)
    trained = {}
    for name, config in student_runs(work, records, init, size, seed).items():
        print(f"  -- {name}")
        trained[name] = train(config)
        print(trained[name].summary())
    lap("train")
    print(f"[4/4] scoring on real BIG-Bench Hard items ({size.eval_items_per_task} per task)")
    runs = []
    scored = [("teacher-CoT", teacher_dir, "trained"), ("teacher-direct", teacher_dir, "trained-direct")]
    scored += [(n, r.final_dir, PROMPT_FORMAT[n]) for n, r in trained.items()]
    for name, model, fmt in scored:
        run_dir = work / "bbh" / name.lower().replace("+", "-")
        argv = ["eval-bbh", "--model", str(model), "--prompt-format", fmt, "--tasks", ",".join(DEMO_TASKS),
                "--limit", str(size.eval_items_per_task), "--max-new-tokens", str(size.max_new_tokens),
                "--batch-size", "32", "--out", str(run_dir), "--name", name]
        if bbh_dir:
            argv += ["--bbh-dir", bbh_dir]
        if cli(argv) != 0:
            raise UserError(f"eval-bbh failed for {name}")
        runs.append(str(run_dir))
    lap("eval")
    print("\nBBH accuracy (strict), against SFT:")
    cli(["eval-bbh", "--compare", *runs[2:], *runs[:2]])
    plot_comparison(runs, work / "comparison.png")
    summary = {"work": str(work), "seconds": timings, "students": {n: {"before": r.before, "after": r.after} for n, r in trained.items()},
               "runs": runs}
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print("\nheld-out KL to the teacher / CE, before -> after training:")
    def change(r, key: str) -> str:   # SFT has no teacher, so no KL
        return f"{r.before[key]:.3f} -> {r.after[key]:.3f}" if key in r.before and key in r.after else "-"

    for n, r in trained.items():
        print(f"  {n:<8} KL {change(r, 'kl'):<16} CE {change(r, 'ce')}")
    print(f"\nwall time: {sum(timings.values()):.0f} s {timings}; outputs in {work}")
    return summary


def plot_comparison(runs: list[str], path: Path) -> None:
    """One bar group per task, one bar per model (strict accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads((Path(r) / "results.json").read_text()) for r in runs]
    tasks = list(results[0]["tasks"])
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(2.2 * len(tasks) + 2, 4))
    for i, res in enumerate(results):
        ax.bar([t + i * width for t in range(len(tasks))], [res["tasks"][t]["strict"] for t in tasks], width, label=res["name"])
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], [t.replace("_", "\n", 1) for t in tasks], fontsize=8)
    ax.set_ylabel("strict accuracy (%)")
    ax.set_title("real BBH items, trained prompt format")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a smaller run (about 3 minutes): fewer records, steps and BBH items")
    p.add_argument("--out", default="runs/demo", help="work folder: records, caches, students, BBH runs, summary.json")
    p.add_argument("--teacher", default="embedded", help="teacher: a model folder or hub id; 'embedded' is the "
                                                          "2.3M-parameter teacher shipped with fastkd")
    p.add_argument("--seed", type=int, default=0, help="seed for records, student initialisation and data order")
    p.add_argument("--bbh-dir", default=None, help=f"BIG-Bench Hard folder (default: {BBH_DIR_LOOKUP})")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default, one per core, the "
                                                          "fastest on an idle machine; 1 is faster when the cores are busy)")
    for f in fields(DemoSize):  # each size field can be set on its own, over --quick or the full default
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=int, default=None, metavar="N",
                       help=f"{f.metadata['help']} (default: {getattr(FULL, f.name)}, with --quick {getattr(QUICK, f.name)})")


def run(args: argparse.Namespace) -> int:
    size = QUICK if args.quick else FULL
    for f in fields(DemoSize):
        value = getattr(args, f.name, None)
        if value is not None:
            if value < 1:
                raise UserError(f"--{f.name.replace('_', '-')} must be at least 1, not {value}")
            size = replace(size, **{f.name: value})
    if args.threads < 0:
        raise UserError(f"--threads must be 0 (torch's default) or more, not {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    demo_loop(args.out, args.quick, args.teacher, args.seed, args.bbh_dir, size=size)
    return 0
