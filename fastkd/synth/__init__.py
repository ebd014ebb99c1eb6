"""Generate BBH-format training records, with step-by-step rationales, for algorithmic tasks.

Each task has a generator that writes inputs exactly as BIG-Bench Hard does, a reference
solver (it scores 100% on the real BBH items of its task) and a rationale writer at two
granularities: `fine` (one reduction per line) and `coarse` (one summarising sentence).
Every rationale ends with `So the answer is <target>.`. Inputs equal to a BBH test input
(whitespace-normalised) are rejected, and no input repeats within a task.
Records carry source, rationale, target, task (CoT-Collection's fields) plus cot and granularity.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import warnings
from collections import Counter
from pathlib import Path

from fastkd import paths
from fastkd.synth import (boolean_expressions, dyck_languages, navigate, tracking_shuffled_objects,
                          web_of_lies)
from fastkd.synth.common import (GRANULARITIES, SynthError, SynthShortfallWarning, draw_unique,
                                 load_real_items, normalise, resolve_bbh_dir)

# each task: a module (or object) with NAME, parse, solve, sample_input, rationale[, all_inputs]
_MODULES = {m.NAME: m for m in (boolean_expressions, navigate, tracking_shuffled_objects.THREE,
                                tracking_shuffled_objects.FIVE, tracking_shuffled_objects.SEVEN,
                                web_of_lies, dyck_languages)}
TASKS = list(_MODULES)

__all__ = ["TASKS", "generate", "solve", "parse", "rationale", "real_inputs", "read_inputs", "write_jsonl", "SynthError",
           "SynthShortfallWarning", "add_synth_arguments", "run_synth"]


def _module(task: str):
    try:
        return _MODULES[task]
    except KeyError:
        raise SynthError(f"unknown synthetic task {task!r}; choose from {', '.join(TASKS)}") from None


def parse(task: str, text: str):
    """The structured problem behind an input (ValueError when not in BBH's format)."""
    return _module(task).parse(text)


def solve(task: str, text: str) -> str:
    """The BBH target for an input of `task`, computed by the reference solver."""
    return _module(task).solve(text)


def rationale(task: str, text: str, granularity: str = "fine") -> str:
    """The step-by-step rationale for an input, ending with `So the answer is <target>.`"""
    if granularity not in GRANULARITIES:
        raise SynthError(f"granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}")
    return _module(task).rationale(text, granularity)


def real_inputs(task: str, bbh_dir=None) -> set[str]:
    """The whitespace-normalised inputs of the real BBH items of `task`."""
    return {normalise(item["input"]) for item in load_real_items(task, bbh_dir)}


def generate(task: str, n: int, seed: int = 0, granularity: str = "fine", *, bbh_dir=None,
             exclude: set[str] | None = None, answer_only_fraction: float = 0.0) -> list[dict]:
    """n unique records of `task` whose inputs are not BBH test items; deterministic for a seed.

    `exclude` (normalised inputs) replaces the BBH items read from `bbh_dir`; pass an empty set
    to skip the overlap check. A fraction `answer_only_fraction` of the records (chosen by the
    seed) has an empty rationale and cot=False. Fewer than n when fewer unique inputs exist
    (a SynthShortfallWarning says so)."""
    mod = _module(task)
    if granularity not in GRANULARITIES:
        raise SynthError(f"granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}")
    if not 0.0 <= answer_only_fraction <= 1.0:
        raise SynthError(f"answer-only fraction must lie in [0, 1], not {answer_only_fraction}")
    if n < 0:
        raise SynthError(f"the number of records must be >= 0, not {n}")
    banned = real_inputs(task, bbh_dir) if exclude is None else {normalise(x) for x in exclude}
    rng = random.Random(f"fastkd-synth:{task}:{seed}")
    inputs = draw_unique(task, n, rng, mod.sample_input, banned, getattr(mod, "all_inputs", None))
    answer_only = set(rng.sample(range(len(inputs)), round(answer_only_fraction * len(inputs))))
    records = []
    for i, text in enumerate(inputs):
        cot = i not in answer_only
        records.append({"source": text, "rationale": mod.rationale(text, granularity) if cot else "",
                        "target": mod.solve(text), "task": task, "cot": cot, "granularity": granularity,
                        "type": "synthetic"})
    return records


# ----------------------------------------------------------------------------- CLI

def _task_list(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if tasks == ["all"]:
        return list(TASKS)
    for t in tasks:
        _module(t)
    return tasks


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"comma-separated tasks to generate, or 'all'; known: {', '.join(TASKS)}")
    parser.add_argument("--n", type=int, default=2000,
                        help="records per task (fewer, with a warning, when fewer unique non-BBH inputs exist: "
                             "boolean_expressions has 2,122 possible inputs, 250 of them BBH test items)")
    parser.add_argument("--granularity", choices=GRANULARITIES, default="fine",
                        help="fine: one reduction step per line (each innermost sub-expression, each position, "
                             "the holdings after each swap, each person's truthfulness, the stack after each bracket); coarse: a single summarising sentence")
    parser.add_argument("--answer-only-fraction", type=float, default=0.0,
                        help="fraction of records (per task, chosen by the seed) written with an empty rationale and "
                             "\"cot\": false, to train a teacher/student that also has an answer-only mode "
                             "(prompt -> target with no reasoning)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same file")
    parser.add_argument("--out", required=True, help="output JSONL file, one record per line")
    parser.add_argument("--bbh-dir", default=None,
                        help="folder with the real BBH <task>.json files, whose inputs are never generated "
                             f"(default: {paths.BBH_DIR_LOOKUP})")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATH",
                        help="never generate an input found here as well (repeatable): a JSONL/JSON file of "
                             "records (field 'source' or 'input'), a BBH-format <task>.json, or a folder of those; "
                             "use it to keep a held-out synthetic test set out of the training records")
    parser.add_argument("--skip-overlap-check", action="store_true",
                        help="generate even without the BBH files; the output may then contain BBH test "
                             "inputs, so never train a model evaluated on BBH with it")


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write atomically: a temporary file next to the target, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_inputs(path: str | os.PathLike) -> set[str]:
    """The normalised inputs held in a records file (JSONL, or a JSON list), a BBH-format task
    file (`{"examples": [{"input": ...}]}`) or a folder of such files; errors name the file and line."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
        if not files:
            raise SynthError(f"{path}: no .json or .jsonl files to read excluded inputs from")
        return set().union(*(read_inputs(f) for f in files))
    if not path.is_file():
        raise SynthError(f"{path}: no such file (given to --exclude)")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            rows = [(i + 1, json.loads(line)) for i, line in enumerate(text.splitlines()) if line.strip()]
        else:
            data = json.loads(text)
            items = data.get("examples") if isinstance(data, dict) else data
            if not isinstance(items, list):
                raise SynthError(f"{path}: expected a list of records or an object with an 'examples' list")
            rows = [(i, item) for i, item in enumerate(items)]
    except json.JSONDecodeError as err:
        raise SynthError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    out = set()
    for where, row in rows:
        value = row.get("source", row.get("input")) if isinstance(row, dict) else None
        if not isinstance(value, str):
            unit = "line" if path.suffix == ".jsonl" else "record"
            raise SynthError(f"{path}: {unit} {where}: no string field 'source' or 'input'")
        out.add(normalise(value))
    return out


def run_synth(args: argparse.Namespace) -> int:
    tasks = _task_list(args.tasks)
    excluded = set().union(*(read_inputs(p) for p in getattr(args, "exclude", []) or []))
    if args.n < 0:
        raise SynthError(f"--n must be >= 0, not {args.n}")
    bbh_dir = resolve_bbh_dir(args.bbh_dir, tasks)
    if bbh_dir is None and not args.skip_overlap_check:
        raise SynthError(f"no BBH folder found ({paths.bbh_get_hint()}); it is needed so that BBH test inputs "
                         "are never generated; or pass --skip-overlap-check to generate without that check")
    from tqdm import tqdm

    records: list[dict] = []
    rows = []
    for task in tqdm(tasks, desc="synth", unit="task", disable=len(tasks) < 2):
        exclude = set() if bbh_dir is None else None
        if excluded:
            exclude = (exclude if exclude is not None else real_inputs(task, bbh_dir)) | excluded
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SynthShortfallWarning)
            recs = generate(task, args.n, args.seed, args.granularity, bbh_dir=bbh_dir, exclude=exclude,
                            answer_only_fraction=args.answer_only_fraction)
        for w in caught:
            print(f"fastkd data synth: warning: {w.message}", file=sys.stderr)
        records += recs
        targets = Counter(r["target"] for r in recs)
        top = ", ".join(f"{t} {c}" for t, c in targets.most_common(4)) + (" ..." if len(targets) > 4 else "")
        rows.append((task, len(recs), sum(not r["cot"] for r in recs), top))
    out = Path(args.out)
    write_jsonl(out, records)
    width = max(len(r[0]) for r in rows) if rows else 4
    print(f"{'task':<{width}}  records  answer-only  targets")
    for task, count, plain, top in rows:
        print(f"{task:<{width}}  {count:>7}  {plain:>11}  {top}")
    print(f"{'total':<{width}}  {len(records):>7}  {sum(r[2] for r in rows):>11}")
    overlap = "none with BBH (checked)" if bbh_dir is not None else "NOT checked against BBH"
    if excluded:
        overlap += f"; {len(excluded)} inputs of --exclude rejected too"
    print(f"wrote {len(records)} records ({args.granularity} rationales, seed {args.seed}) to {out}; overlap: {overlap}")
    return 0
