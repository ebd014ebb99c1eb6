"""pytest-benchmark runs of one training step: floor (student alone), offline KD (cache), online KD (live teacher).

    pytest benchmarks/bench_train.py --benchmark-enable

Same student, batch and loss code as benchmarks/train_step_table.py (which prints the ratios).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_step_table import build_variants  # noqa: E402


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    return build_variants(tmp_path_factory.mktemp("bench_train"))[0]


@pytest.mark.parametrize("variant", ["floor (student fwd+bwd, CE)", "offline KD (cache)", "online KD (live teacher)"])
def test_train_step(benchmark, variants, variant):
    benchmark.group = "cpu-train-step"
    benchmark.pedantic(variants[variant], rounds=5, warmup_rounds=1)
