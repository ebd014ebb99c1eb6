"""The examples in examples/: they answer --help at once and run end to end at a tiny size."""

import json
import runpy
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.parametrize("example, flags", [("conversations.py", ("--loss-turns", "--held-out")),
                                           ("hf_trainer.py", ("--max-steps",))])
def test_an_example_answers_help_without_torch_or_transformers(example, flags):
    code = (
        "import runpy, sys\n"
        "sys.argv = [%r, '--help']\n"
        "try:\n"
        "    runpy.run_path(%r, run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    assert stop.code in (0, None), stop.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    ) % (example, str(ROOT / "examples" / example))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert all(flag in run.stdout for flag in flags), run.stdout


def test_the_conversations_example_runs_cache_train_and_scores(tmp_path, one_thread):
    """A tiny run: conversations with tool turns are cached and trained from, and the student's held-out answer
    cross-entropy falls from its initial value (the teacher's is far below both at the start)."""
    example = runpy.run_path(str(ROOT / "examples" / "conversations.py"))
    out = tmp_path / "run"
    summary = example["main"](["--out", str(out), "--train", "9", "--held-out", "4", "--steps", "8",
                               "--batch-size", "4"])
    scores = summary["answer_scores"]
    assert scores["student after"]["ce"] < scores["student before"]["ce"]
    assert scores["teacher"]["ce"] < scores["student before"]["ce"] / 2
    assert scores["teacher"]["tokens"] > 0 and summary["held_out_kl_ce"]["after"]["kl"] < \
        summary["held_out_kl_ce"]["before"]["kl"]
    records = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert len(records) == 9 and any(m["role"] == "tool" for r in records for m in r["messages"])
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
