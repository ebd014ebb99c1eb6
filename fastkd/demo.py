"""The whole loop on the embedded default, in minutes on a CPU: synthetic BBH-format records with rationales, the
teacher cached with rationales (KD+CoT) and answers only (KD), three students of one initialisation (SFT, KD, KD+CoT)
trained and scored on the real BBH items of those tasks. One seed: a smoke test of the method; the measured
replication (5 seeds, confidence intervals) is benchmarks/replication.py."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from fastkd.config import SEED, StageConfig, option
from fastkd.paths import BBH_DIR_LOOKUP, resolve_model
from fastkd.tiny import make_student_init

DEMO_TASKS = ["boolean_expressions", "navigate", "web_of_lies", "tracking_shuffled_objects_three_objects"]


# how much work one run does: the full demo and --quick's
SIZES = {"full": dict(records_per_task=1000, steps=800, eval_items_per_task=100, max_new_tokens=400),
         "quick": dict(records_per_task=150, steps=160, eval_items_per_task=20, max_new_tokens=400)}


def _size(name: str, what: str):
    full, quick = SIZES["full"][name], SIZES["quick"][name]
    return option(None, f"{what} (default: {full}, with --quick {quick})", minimum=1, metavar="N")


@dataclass
class DemoConfig(StageConfig):
    """Every option of `fastkd demo`; a size field left unset takes --quick's or the full run's value."""

    out: str = option("runs/demo", "work folder: records, caches, students, BBH runs, summary.json")
    quick: bool = option(False, "a smaller run (about 3 minutes): fewer records, steps and BBH items")
    teacher: str = option("embedded", "teacher: a model folder or hub id; 'embedded' is the 2.3M-parameter teacher "
                                      "shipped with fastkd")
    seed: int = SEED("records, student initialisation and data order")
    bbh_dir: str | None = option(None, f"BIG-Bench Hard folder (default: {BBH_DIR_LOOKUP})")
    threads: int = option(0, "torch CPU threads (0: torch's default, one per core, the fastest on an idle machine; 1 "
                             "is faster when the cores are busy)", minimum=0)
    records_per_task: int | None = _size("records_per_task", "synthetic training records per task")
    steps: int | None = _size("steps", "optimizer steps per student (its training time grows in proportion)")
    eval_items_per_task: int | None = _size("eval_items_per_task", "real BBH items scored per task (the first ones)")
    max_new_tokens: int | None = _size("max_new_tokens", "generation budget per BBH item")

    def validate(self) -> "DemoConfig":
        for name, value in SIZES["quick" if self.quick else "full"].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        return self


# the prompt each model answers in: its training template (KD learned from answers only)
PROMPT_FORMAT = {"SFT": "trained", "KD": "trained-direct", "KD+CoT": "trained"}
# the synthetic test split no teacher or student trains on (benchmarks/), scored beside the real BBH items:
# 2,000 per task; boolean_expressions has only 1,872 inputs outside BBH, so 250 of them
HELD_OUT_SEED, HELD_OUT_PER_TASK = 200, 2000
HELD_OUT_SMALL_TASKS = {"boolean_expressions": 250}


def write_held_out(folder: Path, tasks: list[str], n: int | None = None,
                   seed: int = HELD_OUT_SEED) -> dict[str, list[str]]:
    """Generated test items (BBH inputs rejected, at most `n` per task) as `<folder>/<task>.json`, which `eval-bbh
    --bbh-dir folder` scores as is; returns their inputs. build_teacher.py keeps the default split out of training."""
    from fastkd import synth
    from fastkd.cache_tools.format import atomic_write_bytes

    folder.mkdir(parents=True, exist_ok=True)
    inputs = {}
    for task in tasks:
        size = HELD_OUT_SMALL_TASKS.get(task, HELD_OUT_PER_TASK)   # at most the default size: a prefix of the split
        items = [{"input": r["source"], "target": r["target"]}
                 for r in synth.generate(task, size if n is None else min(n, size), seed=seed)]
        atomic_write_bytes(folder / f"{task}.json",
                           json.dumps({"canary": "fastkd synthetic held-out items", "examples": items}).encode())
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


def student_runs(work: Path, records: Path, init: Path, config: DemoConfig) -> dict[str, dict]:
    """The three students' training configs, identical but for the signal they learn from."""
    common = dict(student=str(init), max_steps=config.steps, batch_size=16, lr=3e-3, schedule="cosine",
                  warmup_steps=max(config.steps // 10, 1), seed=config.seed, group_batches=1, log_every=10,
                  eval_sequences=min(32, config.records_per_task * len(DEMO_TASKS) // 4), progress=True,
                  tensorboard=False, max_length=512,
                  overwrite=True)   # the demo's folder is its own: a second run retrains its students (caches reused)
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


def demo(config: DemoConfig) -> dict:
    """The whole loop; returns the summary it also writes to <out>/summary.json."""
    from fastkd.cache_stage import cache_teacher
    from fastkd.trainer import train

    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    teacher_dir = Path(resolve_model(config.teacher, "--teacher"))
    work = Path(config.out)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings = {}

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)

    print(f"[1/4] records: {config.records_per_task} per task for {', '.join(DEMO_TASKS)}")
    records = write_records(work / "records.jsonl", DEMO_TASKS, config.records_per_task, config.seed)
    reuse_caches(work, {"records_per_task": config.records_per_task, "seed": config.seed, "teacher": str(teacher_dir)})
    lap("records")
    print("[2/4] caching the teacher (with rationales, then answers only)")
    for name, cot in (("cache-cot", True), ("cache-answers", False)):
        cache_teacher(dict(teacher=str(teacher_dir), data=str(records), out=str(work / name), top_k=64, cot=cot,
                           batch_size=16, max_length=512, sequences_per_shard=128))
    lap("cache")
    print("[3/4] training three students: SFT, KD, KD+CoT")
    init = make_student_init(teacher_dir, work / "student-init", config.seed)
    trained = {}
    for name, run_config in student_runs(work, records, init, config).items():
        print(f"  -- {name}")
        trained[name] = train(run_config)
        print(trained[name].summary())
    lap("train")
    print(f"[4/4] scoring on real BIG-Bench Hard items ({config.eval_items_per_task} per task)")
    scored = [("teacher-CoT", teacher_dir, "trained"), ("teacher-direct", teacher_dir, "trained-direct")]
    runs = score_models(work, scored + [(n, r.final_dir, PROMPT_FORMAT[n]) for n, r in trained.items()], config)
    lap("eval")
    summary = {"work": str(work), "seconds": timings,
               "students": {n: {"before": r.before, "after": r.after} for n, r in trained.items()}, "runs": list(runs)}
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print("\nheld-out KL to the teacher / CE, before -> after training:")

    def change(r, key: str) -> str:   # SFT has no teacher, so no KL
        return f"{r.before[key]:.3f} -> {r.after[key]:.3f}" if key in r.before and key in r.after else "-"

    for n, r in trained.items():
        print(f"  {n:<8} KL {change(r, 'kl'):<16} CE {change(r, 'ce')}")
    print(f"\nwall time: {sum(timings.values()):.0f} s {timings}; outputs in {work}")
    return summary


def score_models(work: Path, models: list[tuple[str, Path, str]], config: DemoConfig) -> dict[str, dict]:
    """eval-bbh on the demo's tasks for each (name, model, prompt format) into <work>/bbh/; prints the table
    against the first student and draws <work>/comparison.png; returns {run folder: results}."""
    from fastkd.bbh_results import plot_scores
    from fastkd.evaluate import EvalConfig, compare_runs, evaluate_bbh, summary_line

    runs = {}
    for name, model, fmt in models:
        run = EvalConfig.make(overrides=dict(
            model=str(model), prompt_format=fmt, tasks=",".join(DEMO_TASKS), limit=config.eval_items_per_task,
            max_new_tokens=config.max_new_tokens, batch_size=32, out=str(work / "bbh" / name.lower().replace("+", "-")),
            name=name, bbh_dir=config.bbh_dir, overwrite=True))   # the demo's folder: a rerun rescores
        runs[run.out] = evaluate_bbh(run)
        print(summary_line(runs[run.out], run.out))
    results = list(runs.values())
    print("\nBBH accuracy (strict), against SFT:")
    print(compare_runs(results[2:] + results[:2]))
    plot_scores(results, work / "comparison.png", "real BBH items, trained prompt format")
    return runs


add_arguments = DemoConfig.add_flags


def run(args: argparse.Namespace) -> int:
    demo(DemoConfig.from_args(args))
    return 0
