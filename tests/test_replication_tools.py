"""The replication script's statistics and the rationale checker, against hand-computed values."""

import argparse
import importlib.util
import math
import random
from pathlib import Path

import pytest

from fastkd.synth import boolean_expressions as boolean

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


replication = load("replication")
rationale_check = load("rationale_check")


def test_mean_ci_is_the_t_interval():
    mean, half = replication.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    mean, half = replication.mean_ci([5.0])
    assert mean == 5.0 and math.isnan(half)


def test_table_pairs_runs_seed_by_seed_and_skips_absent_methods():
    scores = {"bbh": {"KD": [{"micro": 60.0}, {"micro": 70.0}], "KD+CoT": [{"micro": 64.0}, {"micro": 72.0}]}}
    text = replication.table(scores)
    # differences 4 and 2: mean 3, sd sqrt(2), half-width 12.706 * sqrt(2) / sqrt(2)
    assert "| KD+CoT − KD | +3.0 [-9.7, +15.7] |" in text
    assert "65.0 ± 7.1" in text and "SFT" not in text


def test_methods_list_keeps_table_order_and_rejects_unknown_names():
    assert replication.methods_list("KD+CoT, KD") == ["KD", "KD+CoT"]
    with pytest.raises(argparse.ArgumentTypeError, match="foo"):
        replication.methods_list("KD,foo")


def test_the_generators_own_rationales_are_valid_chains():
    rng = random.Random(0)
    for _ in range(50):
        question = boolean.sample_input(rng)
        assert rationale_check.chain_is_valid(question, boolean.rationale(question, "fine"))


def test_a_step_that_changes_the_value_or_breaks_the_expression_is_caught():
    question = "not ( True ) and ( True ) is"   # False
    good = ('Brackets go first.\nZ = not ( True ) and ( True ).\n( True ) = True, so Z = not True and ( True ).\n'
            "not True = False, so Z = False and ( True ).\n( True ) = True, so Z = False and True.\n"
            "False and True = False, so Z = False. So the answer is False.")
    assert rationale_check.chain_is_valid(question, good)
    assert not rationale_check.chain_is_valid(question, good.replace("so Z = False and True", "so Z = True and True"))
    assert not rationale_check.chain_is_valid(question, good.replace("so Z = False and True", "so Z = False and ( True"))
    assert not rationale_check.chain_is_valid(question, good.replace("Z = not ( True ) and", "Z = ( True ) and"))
    assert not rationale_check.chain_is_valid(question, " So the answer is False.")


def test_scores_are_reused_only_for_the_same_items(tmp_path):
    results = tmp_path / "results.json"
    assert not replication.scored_already(results, {"navigate": 500})
    results.write_text('{"tasks": {"navigate": {"n": 500, "strict": 60.0}}}')
    assert replication.scored_already(results, {"navigate": 500})
    assert not replication.scored_already(results, {"navigate": 2000})            # --synthetic-items changed
    assert not replication.scored_already(results, {"navigate": 500, "web_of_lies": 500})


def test_a_finished_student_of_another_length_is_refused_not_reused(tmp_path):
    final = tmp_path / "kd-s0" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (final / "fastkd_train.json").write_text('{"config": {"max_steps": 800}}')
    assert replication.train_student(tmp_path, "kd-s0", tmp_path / "init", 800, 0) == final
    with pytest.raises(SystemExit, match="trained for 800 steps, this run asks for 2000"):
        replication.train_student(tmp_path, "kd-s0", tmp_path / "init", 2000, 0)


@pytest.mark.usefixtures("bbh_dir")
def test_a_work_folder_made_from_other_records_is_refused_and_kept(tmp_path):
    records = tmp_path / "records.jsonl"
    held_out = {"navigate": []}
    replication.write_records_once(records, 3, held_out)
    before = records.read_bytes()
    replication.write_records_once(records, 3, held_out)                  # same settings: reused
    assert records.read_bytes() == before
    with pytest.raises(SystemExit, match="made with other records"):
        replication.write_records_once(records, 4, held_out)
    assert records.read_bytes() == before and not (tmp_path / ".records.new.jsonl").exists()
