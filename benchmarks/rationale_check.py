"""Where do the students' boolean_expressions rationales go wrong? A check of every step.

    python benchmarks/rationale_check.py runs/replication/eval/bbh

Reads the `items.jsonl` that `fastkd eval-bbh` wrote in each run folder under the given
folder (one folder per model, e.g. `sft-s0`, `kd-cot-s3`), takes its boolean_expressions
generations, and checks the fine rationale's chain `Z = <expr>.` line by line with the task's
reference solver: the first expression must copy the question, and every later one must
parse and keep the value of the one before (a valid reduction never changes the value).
Prints, per model family (seed suffix `-sN` dropped; mean over seeds), the share of items
whose chain is valid throughout, and the accuracy with and without a valid chain.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from fastkd.synth import boolean_expressions as boolean
from fastkd.synth.common import load_real_items

TASK = boolean.NAME
Z_LINE = re.compile(r"Z = (.*?)\.(?=\n| So |$)")


def chain_is_valid(question: str, generation: str) -> bool:
    """True when the chain starts from the question and no step changes the expression's value."""
    chain = [z.strip() for z in Z_LINE.findall(generation)]
    if not chain or chain[0] != " ".join(boolean.tokens(question)):
        return False
    try:
        values = [boolean.solve(expr + " is") for expr in chain]
    except ValueError:   # a step that is not a well-formed expression
        return False
    return len(set(values)) == 1


def check_run(items_file: Path, questions: list[str]) -> dict:
    """Counts for one model: items, valid chains, correct answers among valid and invalid chains."""
    counts = dict(items=0, valid=0, correct_valid=0, correct_invalid=0, with_chain=0)
    with items_file.open() as f:
        for line_no, line in enumerate(f, 1):
            item = json.loads(line)
            if item.get("task") != TASK:
                continue
            try:
                question = questions[item["idx"]]
            except (KeyError, IndexError):
                raise SystemExit(f"{items_file}:{line_no}: idx {item.get('idx')!r} is not a {TASK} item") from None
            valid = chain_is_valid(question, item["generation"])
            counts["items"] += 1
            counts["with_chain"] += bool(Z_LINE.search(item["generation"]))
            counts["valid"] += valid
            counts["correct_valid" if valid else "correct_invalid"] += bool(item["correct"])
    return counts


def family(run_name: str) -> str:
    return re.sub(r"-s\d+$", "", run_name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("eval_dir", type=Path, help="a folder holding one eval-bbh output folder per model")
    ap.add_argument("--bbh-dir", default=None,
                    help="the items the runs were scored on (default: fastkd's BBH lookup; for the replication's "
                         "synthetic split: runs/replication/synthetic-eval)")
    args = ap.parse_args()
    runs = sorted(p.parent for p in args.eval_dir.glob("*/items.jsonl"))
    if not runs:
        raise SystemExit(f"{args.eval_dir}: no */items.jsonl (run eval-bbh first)")
    questions = [item["input"] for item in load_real_items(TASK, args.bbh_dir)]
    by_family: dict[str, list[dict]] = {}
    for run in runs:
        counts = check_run(run / "items.jsonl", questions)
        if counts["with_chain"]:   # answer-only models write no chain: nothing to check
            by_family.setdefault(family(run.name), []).append(counts)

    def pct(num: str, den: str, runs: list[dict]) -> str:
        shares = [100 * r[num] / r[den] for r in runs if r[den]]
        return f"{statistics.mean(shares):.1f}" if shares else "-"

    print(f"{TASK}: rationale chains checked step by step (mean over runs)\n")
    print("| model | runs | items | valid chain % | accuracy, valid chain % | accuracy, invalid chain % |")
    print("|---|---|---|---|---|---|")
    for name, group in by_family.items():
        for r in group:
            r["invalid"] = r["items"] - r["valid"]
        print(f"| {name} | {len(group)} | {group[0]['items']} | {pct('valid', 'items', group)} | "
              f"{pct('correct_valid', 'valid', group)} | {pct('correct_invalid', 'invalid', group)} |")


if __name__ == "__main__":
    main()
