"""BBH loading, task groups, prompts and scoring; the Codex reproduction (no model needed)."""

import argparse
import json
from pathlib import Path

import pytest

from fastkd import bbh, bbh_results, evaluate, paths
from fastkd.errors import UserError

BBH_DIR = paths.resolve_bbh_dir(None, ["navigate"]) or Path("<no BBH data found>")
needs_bbh = pytest.mark.skipif(not (BBH_DIR / "bbh" / "navigate.json").is_file(),
                               reason="BBH data not found (../shared/bbh, see shared/README.md, or $FASTKD_BBH_DIR)")


def run_cli(*argv) -> int:
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    return evaluate.run(parser.parse_args([str(a) for a in argv]))


# ----------------------------------------------------------------------------- the Codex reproduction

@needs_bbh
def test_codex_reference_outputs_reproduce_every_reported_accuracy(tmp_path):
    ref = BBH_DIR / "reference"
    reported = json.loads((ref / "codex_cot_reported_metrics.json").read_text())
    assert run_cli("--predictions", ref / "codex_cot_outputs.jsonl", "--out", tmp_path / "run", "--no-plot") == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert sorted(results["tasks"]) == sorted(reported) and len(reported) == 27
    for task, want in reported.items():
        got = results["tasks"][task]
        # same count of correct items (exact), and the same percentage up to float rounding order
        assert round(got["strict"] * got["n"] / 100) == round(want["accuracy"] * got["n"] / 100), task
        assert got["strict"] == pytest.approx(want["accuracy"], abs=1e-9), task
    summary = results["summary"]["strict"]
    assert round(summary["micro"], 2) == 73.97 and round(summary["macro"], 2) == 73.71
    assert results["summary"]["n_items"] == 6511
    # independent check of micro from the per-item file
    rows = [json.loads(line) for line in (tmp_path / "run" / "items.jsonl").read_text().splitlines()]
    assert len(rows) == 6511
    assert sum(r["correct"] for r in rows) / len(rows) * 100 == pytest.approx(summary["micro"], abs=1e-9)


# ----------------------------------------------------------------------------- strict scorer edge cases

@pytest.mark.parametrize("generation, answer", [
    ("Step one. So the answer is (Q).", "(Q)"),                       # an answer (Q)
    ("It is plausible", "It is plausible"),                           # no phrase: the whole stripped generation
    ("  (B).  \n", "(B)"),                                            # no phrase, whitespace and one period
    ("So the answer is (A). Wait. So the answer is (C).", "(C)"),     # the last occurrence counts
    ("So the answer is yes. \n\n", "yes"),                            # trailing spaces and newlines
    ("So the answer is -17.", "-17"),                                 # negative number
    ("So the answer is ] ] }", "] ] }"),                              # dyck without a final period
    ("So the answer is ] ] }.", "] ] }"),
    ("So the answer is 3.5..", "3.5."),                               # only ONE trailing period removed
    ("so the answer is (A).", "so the answer is (A)"),                # the phrase is case-sensitive
])
def test_extract_answer_edge_cases(generation, answer):
    assert bbh.extract_answer(generation) == answer


@pytest.mark.parametrize("generation, target, strict, lenient", [
    ("So the answer is (Q).", "(Q)", True, True),
    ("So the answer is Yes.", "yes", False, True),                    # sports_understanding: lower-case target
    ("So the answer is yes.", "yes", True, True),
    ("So the answer is NO", "no", False, True),
    ("So the answer is no.", "yes", False, False),
    ("So the answer is -3.", "-3", True, True),
    ("So the answer is 3.", "-3", False, False),                      # the sign matters
    ("The answer is -3", "-3", False, True),                          # format failure: no "So"
    ("So the answer is 5 + 3 = 8.", "8", False, True),
    ("So the answer is 1,024.", "1024", False, True),
    ("So the answer is ] ]", "] ]", True, True),                     # dyck, no final period
    ("So the answer is ]  ].", "] ]", False, True),                  # spacing only
    ("So the answer is (A) or (B).", "(A)", False, False),           # a hedge earns nothing
    ("So the answer is A.", "(A)", False, True),                      # bare letter
    ("So the answer is (B) Monsters, Inc.", "(B)", False, True),
    ("(C)", "(C)", True, True),                                       # answer-only output
    ("C", "(C)", False, True),
    ("A man walks into a bar.", "(A)", False, False),                 # an article is not a letter
    ("First, 3 + 5 = 8. Then we add 2 and 7 more apples", "8", False, False),  # reasoning, no answer
    ("Valid", "valid", False, True),
    ("So the answer is valid.", "invalid", False, False),             # valid is not invalid
    ("So the answer is invalid.", "invalid", True, True),
    ("True and False is False. So the answer is False.", "False", True, True),
    ("So the answer is not valid.", "valid", False, False),          # a negated label is not the label
    ("So the answer is Not True.", "True", False, False),
    ("So the answer is No, he does not.", "No", False, True),         # a later negation is not the label's
    ("So the answer is \u221212.", "12", False, False),               # typographic minus keeps the sign
    ("So the answer is \u221212.", "-12", False, True),
    ("The answer isn't (A).", "(A)", False, False),                   # "isn't" is not "is"
    ("So the answer is (b).", "(B)", False, True),                    # lower-case choice letter
])
def test_strict_and_lenient(generation, target, strict, lenient):
    s = bbh.score(generation, target)
    assert (s.correct, s.lenient_correct) == (strict, lenient)


def test_lenient_never_below_strict_on_random_strings():
    import random

    rng = random.Random(0)
    pieces = ["So the answer is ", "(A)", "(B)", "yes", "No", ".", " ", "\n", "-4", "12", "] ]", "valid", "answer is"]
    for _ in range(2000):
        gen = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
        target = rng.choice(["(A)", "(B)", "yes", "No", "-4", "12", "] ]", "valid"])
        s = bbh.score(gen, target)
        assert s.correct == (bbh.extract_answer(gen) == target)
        assert s.lenient_correct or not s.correct


def test_stop_string_is_not_a_bare_q():
    text = "The options are (P) and (Q). So the answer is (Q).\n\nQ: next question"
    assert bbh.cut_at_stop(text) == "The options are (P) and (Q). So the answer is (Q)."
    assert bbh.cut_at_stop("Q and Q: still here") == "Q and Q: still here"


def _summarise(per: dict) -> dict:
    """bbh_results.results_from_rows of the item rows behind {task: {"strict": [...], "lenient": [...]}}."""
    return bbh_results.results_from_rows([{"task": t, "correct": s, "lenient_correct": le}
                                          for t, v in per.items() for s, le in zip(v["strict"], v["lenient"])])


def test_summarise_averages_by_hand():
    per = {"snarks": {"strict": [True, False], "lenient": [True, True]},
           "navigate": {"strict": [True, True, True, False], "lenient": [True, True, True, False]}}
    res = _summarise(per)
    s = res["summary"]["strict"]
    assert res["tasks"]["snarks"]["strict"] == 50.0 and res["tasks"]["navigate"]["strict"] == 75.0
    assert s["micro"] == pytest.approx(400 / 6) and s["macro"] == pytest.approx(62.5)
    assert s["nlp"] == 50.0 and s["algorithmic"] == 75.0
    assert res["summary"]["lenient"]["nlp"] == 100.0
    only_nlp = _summarise({"snarks": per["snarks"]})
    assert only_nlp["summary"]["strict"]["algorithmic"] is None


# ----------------------------------------------------------------------------- tasks and data

def test_task_groups():
    assert len(bbh.NLP_TASKS) == 12 and len(bbh.ALGORITHMIC_TASKS) == 15 and len(bbh.ALL_TASKS) == 27
    assert not set(bbh.NLP_TASKS) & set(bbh.ALGORITHMIC_TASKS)
    assert bbh.select_tasks("nlp") == sorted(bbh.NLP_TASKS)
    assert bbh.select_tasks("algorithmic") == sorted(bbh.ALGORITHMIC_TASKS)
    assert bbh.select_tasks("snarks, navigate,snarks") == ["snarks", "navigate"]
    with pytest.raises(bbh.BBHError, match="word_sorting") as err:
        bbh.select_tasks("snarks,sarcasm")
    assert "sarcasm" in str(err.value)


@needs_bbh
def test_load_tasks_limit_and_env(tmp_path, monkeypatch):
    items, root = bbh.load_tasks(["snarks", "penguins_in_a_table"], limit=5)
    assert Path(root) == BBH_DIR
    assert [it.idx for it in items["snarks"]] == [0, 1, 2, 3, 4]
    raw = json.loads((BBH_DIR / "bbh" / "snarks.json").read_text())["examples"]
    assert items["snarks"][3].input == raw[3]["input"] and items["snarks"][3].target == raw[3]["target"]
    full, _ = bbh.load_tasks(["penguins_in_a_table"])
    assert len(full["penguins_in_a_table"]) == 146
    # the environment variable is a candidate; an explicit folder without the files is an error
    monkeypatch.setenv(paths.BBH_ENV, str(BBH_DIR))
    assert paths.bbh_candidates(None)[0] == BBH_DIR
    with pytest.raises(bbh.BBHError, match=str(tmp_path)):
        bbh.load_tasks(["snarks"], bbh_dir=tmp_path)


def test_missing_data_names_every_place_looked(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.BBH_ENV, str(tmp_path / "env"))
    monkeypatch.setenv(paths.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(paths, "source_checkout", lambda: tmp_path / "checkout")
    with pytest.raises(bbh.BBHError) as err:
        bbh.load_tasks(["snarks"])
    msg = str(err.value)
    for looked in (tmp_path / "env", tmp_path / "home" / "bbh", tmp_path / "shared" / "bbh"):
        assert str(looked) in msg
    assert "BIG-Bench-Hard" in msg and "--bbh-dir" in msg


# ----------------------------------------------------------------------------- prompts

@needs_bbh
def test_cot_prompt_for_every_task_matches_the_file(tiny_tokenizer):
    items, root = bbh.load_tasks(list(bbh.ALL_TASKS), limit=2)
    built = evaluate.build_prompts(items, tiny_tokenizer, "cot", False, root)
    k = 0
    for task in bbh.ALL_TASKS:
        lines = (BBH_DIR / "cot-prompts" / f"{task}.txt").read_text(encoding="utf-8").split("\n")
        assert lines[1] == "-----"
        after = "\n".join(lines[2:])
        for it in items[task]:
            want = after + "\n\nQ: " + it.input + "\nA: Let's think step by step."
            text, ids = built[k]
            k += 1
            assert text == want, task
            assert ids == tiny_tokenizer(want)["input_ids"], task
    assert k == len(built) == 54


@needs_bbh
def test_direct_and_zeroshot_prompts():
    few = bbh.load_cot_prompt(BBH_DIR, "sports_understanding")
    assert few.description + "".join(f"\n\nQ: {q}\nA: {a}" for q, a in few.exemplars) == few.text
    assert len(few.exemplars) == 3
    direct = bbh.build_prompt("direct", "Is X plausible?", few)
    assert direct.startswith(few.description + "\n\nQ: Is the following sentence plausible?")
    assert "Let's think" not in direct and direct.endswith("\n\nQ: Is X plausible?\nA:")
    assert [ln for ln in direct.split("\n") if ln.startswith("A:")] == ["A: yes", "A: no", "A: yes", "A:"]
    assert bbh.build_prompt("zeroshot", "Is X plausible?") == "Q: Is X plausible?\nA: Let's think step by step."


@needs_bbh
def test_trained_and_chat_prompts_go_through_fastkd_data(tiny_tokenizer):
    from fastkd.templates import Template, prompt_ids

    items, root = bbh.load_tasks(["navigate"], limit=2)
    for chat in (False, True):
        built = evaluate.build_prompts(items, tiny_tokenizer, "trained", chat, root)
        for it, (_, ids) in zip(items["navigate"], built):
            assert ids == prompt_ids(tiny_tokenizer, Template(cot=True, chat=chat), it.input)
    text, ids = evaluate.build_prompts(items, tiny_tokenizer, "zeroshot", True, root)[0]
    rendered = tiny_tokenizer.decode(ids)
    assert rendered.startswith("<|user|>Q: ") and rendered.endswith("step by step.<|assistant|>")


# ----------------------------------------------------------------------------- predictions files and --compare

@needs_bbh
def test_predictions_file_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"task": "snarks", "idx": 0, "prediction": "x"}) + "\n")
    with pytest.raises(evaluate.EvalError, match="no prediction for 1 of 2 items"):
        run_cli("--predictions", path, "--limit", "2", "--out", tmp_path / "o")
    path.write_text('{"task": "snarks", "idx": 0, "prediction": "x"}\n{"task": "snarks", "idx": 0, "prediction": "y"}\n')
    with pytest.raises(evaluate.EvalError, match="line 2: duplicate"):
        evaluate.read_predictions(path)
    path.write_text('{"task": "snarks", "idx": "0", "prediction": "x"}\n')
    with pytest.raises(evaluate.EvalError, match="line 1: field 'idx'"):
        evaluate.read_predictions(path)
    path.write_text('{"task": "snarks", "idx": 0, "prediction": "x", "target": "(Z)"}\n')
    with pytest.raises(evaluate.EvalError, match="field 'target'"):
        run_cli("--predictions", path, "--limit", "1", "--out", tmp_path / "o")
    with pytest.raises(evaluate.EvalError, match="navigate"):
        run_cli("--predictions", path, "--tasks", "navigate", "--limit", "1", "--out", tmp_path / "o")
    # an idx that is no item of the task: a 1-based file or another data version (fine beyond --limit)
    path.write_text("".join(json.dumps({"task": "snarks", "idx": i, "prediction": "x"}) + "\n" for i in (0, 1, -1)))
    with pytest.raises(evaluate.EvalError, match="line 3: field 'idx' -1 is not an item of snarks"):
        run_cli("--predictions", path, "--limit", "2", "--out", tmp_path / "o")
    path.write_text("\ufeff" + "".join(json.dumps({"task": "snarks", "idx": i, "prediction": "x"}) + "\n" for i in (0, 1, 5)))
    assert run_cli("--predictions", path, "--limit", "2", "--out", tmp_path / "o") == 0  # BOM, idx 5 past the limit
    (tmp_path / "file").write_text("")
    with pytest.raises(evaluate.EvalError, match="not a folder"):
        run_cli("--predictions", path, "--limit", "2", "--out", tmp_path / "file")
    with pytest.raises(evaluate.EvalError, match="summary"):
        evaluate.load_results(_write(tmp_path / "r.json", {"schema": bbh_results.SCHEMA, "tasks": {}}))
    with pytest.raises(UserError, match="--batch-size must be >= 1, got 0"):
        run_cli("--predictions", path, "--batch-size", "0", "--out", tmp_path / "o")


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def _fake_results(name, scores):
    per = {t: {"strict": [True] * c + [False] * (4 - c), "lenient": [True] * 4} for t, c in scores.items()}
    return {"schema": bbh_results.SCHEMA, "name": name, "config": {"limit": None}, **_summarise(per)}


def test_compare_table_differences(tmp_path):
    base = _fake_results("student", {"snarks": 1, "navigate": 2})
    kd = _fake_results("kd", {"snarks": 3, "navigate": 2})
    for r in (base, kd):
        (tmp_path / r["name"]).mkdir()
        (tmp_path / r["name"] / "results.json").write_text(json.dumps(r))
    assert run_cli("--compare", tmp_path / "student", tmp_path / "kd", "--out", tmp_path / "cmp") == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert rows["task"] == ["student", "kd"]
    assert rows["snarks"] == ["25.00", "75.00 (+50.00)"]
    assert rows["navigate"] == ["50.00", "50.00 (+0.00)"]
    assert rows["**macro**"] == ["37.50", "62.50 (+25.00)"]
    assert rows["**NLP average**"] == ["25.00", "75.00 (+50.00)"]
    assert table.index("snarks") < table.index("navigate")  # natural-language tasks first
    algorithmic_only = [_fake_results(n, {"navigate": c}) for n, c in (("a", 1), ("b", 3))]
    table = evaluate.compare_runs(algorithmic_only)
    assert "NLP average" not in table and "| **algorithmic average** | 25.00 | 75.00 (+50.00) |" in table
    with pytest.raises(evaluate.EvalError, match="no results.json"):
        run_cli("--compare", tmp_path / "nowhere")
