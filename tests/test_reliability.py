"""The fault campaign of benchmarks/reliability.py with a few cases per row, fresh seeds each run:
every row at 100%. (The full campaign, `python benchmarks/reliability.py`, writes docs/reliability.md.)"""

import importlib.util
import random
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
spec = importlib.util.spec_from_file_location("reliability", BENCHMARKS / "reliability.py")
reliability = sys.modules["reliability"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(reliability)


def _assert_all_pass(groups):
    rows = [row for group in groups.values() for row in group]
    bad = [f"{r.name}: {r.passed}/{r.total}; {r.failures[:3]}" for r in rows if r.passed != r.total]
    assert not bad, "\n".join(bad)
    assert rows and all(r.total > 0 for r in rows)


def test_fast_rows_of_the_fault_campaign(tmp_path):
    keys = {"block-flips", "headers", "manifest", "hostile", "checkpoints", "tokenizers", "records", "import-path",
            "nan-teacher", "disk-full"}
    _assert_all_pass(reliability.campaign(tmp_path, quick=True, seed=random.randrange(1 << 30), only=keys))


@pytest.mark.slow
def test_kills_and_racing_writers(tmp_path):
    keys = {"kill-cache", "kill-train", "two-writers"}
    _assert_all_pass(reliability.campaign(tmp_path, quick=True, seed=random.randrange(1 << 30), only=keys))
