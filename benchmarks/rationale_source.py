"""Who wrote the rationales? KD+CoT students distilled from teacher-written vs reference rationales.

    python benchmarks/rationale_source.py --work runs/rationale-source --threads 1 --per-task 250 --steps 500 [--seeds 3]

The question (issue 16, after the companion study of "Effectiveness of Chain-of-Thought in
Distilling Reasoning Capability from LLMs": which teacher wrote the rationales changes the
result): a user with answers only has the teacher write the rationales (`fastkd
generate-rationales`); is a student distilled over those as good as one distilled over the
reference rationales of `fastkd data synth`?

1. Training inputs: `fastkd data synth` records, seed 100, --per-task per task, excluding the
   real BBH inputs and the held-out generated items, exactly as benchmarks/replication.py does.
   Their answer-only form (source, target, task) is `answers.jsonl`.
2. `fastkd generate-rationales` with the teacher (HF backend) samples --n rationales per input and
   keeps those whose final answer (eval-bbh's extraction) is the target; the keep rate per task is
   recorded. Inputs with no kept sample are dropped from BOTH arms, and each arm has exactly one
   record per kept input (the teacher arm: the first kept sample), so the comparison is paired on
   the same inputs and the same number of records.
3. The reference arm: the `fastkd data synth` rationales of the same kept inputs.
4. The teacher is cached over each record set with rationales (`--cot`, top-64, same settings).
5. Per seed, one student initialisation, two KD+CoT students (same shape, steps, data order), one
   per cache; 6. each scored on every real BBH item of the four demo tasks (`--prompt-format
   trained`). 7. results.json and table.md: mean ± sd per arm, the paired difference
   (teacher-written − reference) with its 95% t interval over seeds, keep rates, record counts,
   how often the teacher's kept rationale is the reference one verbatim, and (boolean_expressions)
   how many kept rationales have a wrong step (benchmarks/rationale_check.py's chain check).

Every stage is resumable: rerun the same command after a kill; finished generations, caches,
students and scores are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rationale_check import chain_is_valid  # noqa: E402
from replication import evaluate, table, train_student, write_records_once  # noqa: E402

from fastkd.demo import DEMO_TASKS, write_held_out  # noqa: E402
from fastkd.paths import EMBEDDED_TEACHER  # noqa: E402
from fastkd.tiny import STUDENT_SHAPE, make_student_init  # noqa: E402

ARMS = ("teacher-written", "reference")
PAIRS = (("teacher-written", "reference"),)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl_atomic(path: Path, rows: list[dict]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_log(path: Path) -> list[dict]:
    """The provenance log's sample entries (its first line holds the settings)."""
    return [e for e in read_jsonl(path) if "settings" not in e]


def trained_text(record: dict) -> str:
    """The response a CoT student is trained on (fastkd.templates' template: lead-in and answer sentence
    normalised), whitespace-normalised: two rationales are the same chain when these are equal."""
    from fastkd.templates import Template

    return " ".join(Template(cot=True).response(record["rationale"], record["target"]).split())


def paired_records(reference: list[dict], samples: list[dict]) -> tuple[list[dict], list[dict], dict]:
    """(teacher-written records, reference records, per-task statistics): one record per input that
    has at least one kept sample (the first kept one), the reference rationale of the same input."""
    first_kept: dict[int, dict] = {}
    kept_count: Counter = Counter()
    for e in sorted(samples, key=lambda e: (e["record_index"], e["sample"])):
        if e["kept"]:
            kept_count[e["record_index"]] += 1
            first_kept.setdefault(e["record_index"], e["record"])
    n = 1 + max((e["sample"] for e in samples), default=0)
    teacher, ref = [], []
    stats: dict = {t: Counter() for t in DEMO_TASKS}
    for e in samples:
        s = stats[e["task"]]
        s["samples"] += 1
        s["kept samples"] += int(e["kept"])
        if not e["kept"]:
            s["reason: " + e["reason"].split(":")[0]] += 1
    for index, rec in enumerate(reference):
        s = stats[rec["task"]]
        s["inputs"] += 1
        if index not in first_kept:
            s["inputs dropped (no kept sample)"] += 1
            continue
        t = first_kept[index]
        assert t["source"] == rec["source"] and t["target"] == rec["target"], index
        s["inputs kept"] += 1
        s["inputs with all samples kept"] += int(kept_count[index] == n)
        s["teacher rationale == reference"] += int(trained_text(t) == trained_text(rec))
        if rec["task"] == "boolean_expressions":
            s["kept chain valid"] += int(chain_is_valid(rec["source"], t["rationale"]))
        teacher.append({k: t[k] for k in ("source", "rationale", "target", "task")})
        ref.append({k: rec[k] for k in ("source", "rationale", "target", "task")})
    return teacher, ref, {t: dict(s) for t, s in stats.items()}


def stats_table(stats: dict, n: int) -> str:
    lines = ["| task | inputs | samples | keep rate (samples) | inputs kept (≥1 of n) | records per arm | "
             "teacher rationale = reference verbatim | rejected: wrong answer / no answer |",
             "|---|---|---|---|---|---|---|---|"]
    tot = Counter()
    for task, s in stats.items():
        tot.update(s)
        lines.append(_stats_row(task, s))
    lines.append(_stats_row("all", tot))
    lines.append("")
    bool_stats = stats.get("boolean_expressions", {})
    if bool_stats.get("inputs kept"):
        lines.append(f"boolean_expressions: {bool_stats.get('kept chain valid', 0)} of {bool_stats['inputs kept']} kept "
                     f"teacher rationales have a valid chain (every step keeps the value; benchmarks/rationale_check.py).")
    lines.append(f"(n = {n} samples per input; the teacher arm uses the first kept sample of each input.)")
    return "\n".join(lines)


def _stats_row(task: str, s) -> str:
    pct = lambda a, b: f"{100 * a / b:.1f}%" if b else "-"   # noqa: E731
    wrong = sum(v for k, v in s.items() if k.startswith("reason: wrong answer"))
    noans = sum(v for k, v in s.items() if k.startswith("reason: no final answer") or k.startswith("reason: empty"))
    return (f"| {task} | {s.get('inputs', 0)} | {s.get('samples', 0)} | {pct(s.get('kept samples', 0), s.get('samples', 0))} | "
            f"{s.get('inputs kept', 0)} ({pct(s.get('inputs kept', 0), s.get('inputs', 0))}) | {s.get('inputs kept', 0)} | "
            f"{pct(s.get('teacher rationale == reference', 0), s.get('inputs kept', 0))} | {wrong} / {noans} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/rationale-source")
    ap.add_argument("--teacher", type=Path, default=EMBEDDED_TEACHER)
    ap.add_argument("--per-task", type=int, default=250, help="training inputs per task (before dropping)")
    ap.add_argument("--synthetic-items", type=int, default=500,
                    help="held-out generated items per task excluded from the inputs (as replication.py)")
    ap.add_argument("--n", type=int, default=2, help="rationales sampled per input")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--gen-batch-size", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--bbh-dir", default=None)
    ap.add_argument("--limit", type=int, default=0, help="score only the first N BBH items per task (0: all; smoke runs)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--stop-after", choices=["generate", "cache"], default=None, help="probe: stop after this stage")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from fastkd.cache_stage import cache_teacher
    from fastkd.cli import main as cli

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    clock: dict[str, float] = {}
    t0 = time.perf_counter()
    # 1. the inputs (replication.py's exclusions), in reference and answer-only form
    held_out = write_held_out(work / "synthetic-eval", DEMO_TASKS, args.synthetic_items)
    ref_all = write_records_once(work / "records-reference-all.jsonl", args.per_task, held_out)
    reference = read_jsonl(ref_all)
    answers = work / "answers.jsonl"
    fresh = "".join(json.dumps({k: r[k] for k in ("source", "target", "task")}) + "\n" for r in reference)
    if not answers.exists() or answers.read_text() != fresh:
        write_jsonl_atomic(answers, [json.loads(line) for line in fresh.splitlines()])
    clock["inputs"] = time.perf_counter() - t0
    # 2. the teacher writes the rationales
    t0 = time.perf_counter()
    gen_out = work / "records-teacher-all.jsonl"
    gen_argv = ["generate-rationales", "--teacher", str(args.teacher), "--data", str(answers), "--out", str(gen_out),
                "--n", str(args.n), "--temperature", str(args.temperature), "--batch-size", str(args.gen_batch_size),
                "--backend", "hf", "--device", "cpu", "--no-progress"]
    print("fastkd " + " ".join(gen_argv), flush=True)
    if cli(gen_argv) != 0:
        raise SystemExit("generate-rationales failed")
    clock["generate-rationales"] = time.perf_counter() - t0
    samples = read_log(gen_out.with_name(gen_out.name + ".provenance.jsonl"))
    # 3. paired record sets on the kept inputs
    teacher_recs, ref_recs, stats = paired_records(reference, samples)
    files = {"teacher-written": write_jsonl_atomic(work / "records-teacher.jsonl", teacher_recs),
             "reference": write_jsonl_atomic(work / "records-reference.jsonl", ref_recs)}
    print(stats_table(stats, args.n), flush=True)
    if args.stop_after == "generate":
        return
    # 4. one cache per arm, same settings
    t0 = time.perf_counter()
    for arm, records in files.items():
        cache_teacher(dict(teacher=str(args.teacher), data=str(records), out=str(work / f"cache-{arm}"), top_k=64,
                           cot=True, batch_size=32, max_length=512,
                           progress=False))   # resumes, or returns at once when complete
    clock["caches"] = time.perf_counter() - t0
    if args.stop_after == "cache":
        return
    # 5-6. students per seed, scored on the real BBH items
    t0 = time.perf_counter()
    scores: dict = {"bbh": {arm: [] for arm in ARMS}}
    for seed in range(args.seeds):
        init = make_student_init(args.teacher, work / f"init-{seed}", seed, STUDENT_SHAPE)
        for arm in ARMS:
            tag = f"{arm}-s{seed}"
            ts = time.perf_counter()
            final = train_student(work / "students", tag, init, args.steps, seed, cache=str(work / f"cache-{arm}"))
            te = time.perf_counter()
            scores["bbh"][arm].append(evaluate(final, work / "eval" / tag, tag, args.bbh_dir, "trained", args.limit))
            print(f"seed {seed} {arm}: BBH micro {scores['bbh'][arm][-1]['micro']:.1f} "
                  f"(train {te - ts:.0f} s, score {time.perf_counter() - te:.0f} s)", flush=True)
    clock["students: train + eval"] = time.perf_counter() - t0
    # 7. tables
    seconds = {k: round(v) for k, v in clock.items()}
    seconds["total"] = sum(seconds.values())
    result = {"scores": scores, "stats": stats, "records_per_arm": len(teacher_recs), "seconds": seconds,
              "generate_command": "fastkd " + " ".join(gen_argv), "args": {k: str(v) for k, v in vars(args).items()}}
    text = (table(scores, PAIRS) + "\n" + stats_table(stats, args.n) +
            f"\n\nrecords per arm: {len(teacher_recs)}; wall time (s): {seconds}\n")
    (work / "results.json").write_text(json.dumps(result, indent=2))
    (work / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
