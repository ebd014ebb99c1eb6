"""Batched greedy generation against unbatched transformers generate, and eval-bbh end to end
on a tiny random model (scores ~0; the check is that every output is written and consistent)."""

import argparse
import json
from collections import defaultdict

from pathlib import Path

import pytest

from fastkd import bbh, bbh_results, evaluate, paths
from fastkd.errors import UserError

torch = pytest.importorskip("torch")

BBH_DIR = paths.resolve_bbh_dir(None, ["navigate"]) or Path("<no BBH data found>")
needs_bbh = pytest.mark.skipif(not (BBH_DIR / "bbh" / "navigate.json").is_file(),
                               reason="BBH data not found (../shared/bbh, see shared/README.md, or $FASTKD_BBH_DIR)")

TEXTS = [
    "Q: not ( True ) and ( True ) is\nA:",
    "Q: Take 1 step. Take 2 steps. Turn around. Always face forward. Do you return to the starting point?\nA: Let's",
    "True",
    "Question: Fidel lies. Jerry says Fidel tells the truth.",
    "Alice, Bob, and Claire are friends. First, Alice and Bob swap balls. Then Claire. So the answer is",
]


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny(tiny_qwen_dir):
    return _load(tiny_qwen_dir)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, tiny_tokenizer):
    """GPT-2 has learned absolute positions: a left-padded row with wrong position ids
    changes its output (RoPE models are blind to a constant shift, so they cannot show it)."""
    from fastkd.tiny import pin_tokenizer_class
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                        initializer_range=0.3, eos_token_id=tiny_tokenizer.eos_token_id,
                        bos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    pin_tokenizer_class(folder)
    return _load(folder)


def reference_greedy(model, tok, ids, n):
    """transformers' own greedy generate on one unpadded prompt."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("which", ["tiny", "tiny_gpt2"])
def test_batched_left_padded_equals_unbatched_greedy(which, request):
    from fastkd.generate import greedy_generate

    tok, model = request.getfixturevalue(which)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # every row needs a different amount of padding
    seen = []
    gens = greedy_generate(model, tok, prompts, max_new_tokens=12, batch_size=3, on_batch=seen.append)
    assert seen == [3, 2]
    for ids, gen in zip(prompts, gens):
        ref = reference_greedy(model, tok, ids, 12)
        eos = tok.eos_token_id
        want = ref[:ref.index(eos)] if eos in ref else ref
        assert gen.token_ids == want
        assert gen.finish == ("eos" if eos in ref else "length")
        assert gen.text == tok.decode(want, skip_special_tokens=True)


def test_stop_string_cuts_each_row_where_it_appears(tiny):
    from fastkd.generate import greedy_generate

    tok, model = tiny
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    free = greedy_generate(model, tok, prompts, max_new_tokens=12, batch_size=5)
    # a stop string taken from inside row 0's own output: row 0 stops there, others are cut only if they contain it
    text0 = free[0].text
    stop = text0[len(text0) // 2: len(text0) // 2 + 3]
    assert stop
    stopped = greedy_generate(model, tok, prompts, max_new_tokens=12, batch_size=5, stop_strings=(stop,))
    for f, s in zip(free, stopped):
        k = f.text.find(stop)
        if k < 0:
            assert s.text == f.text and s.token_ids == f.token_ids
        else:
            assert s.finish == "stop" and s.text == f.text[:k]
            assert s.token_ids == f.token_ids[:len(s.token_ids)] and len(s.token_ids) <= len(f.token_ids)
            assert stop in tok.decode(s.token_ids) and stop not in tok.decode(s.token_ids[:-1])


@needs_bbh
def test_eval_bbh_end_to_end(tiny_qwen_dir, tmp_path):
    out = tmp_path / "run"
    returned = evaluate.evaluate_bbh(evaluate.EvalConfig.make(overrides=dict(
        model=str(tiny_qwen_dir), tasks="sports_understanding,object_counting", limit=3, max_new_tokens=8,
        batch_size=4, out=str(out), progress=False)))
    for name in ("items.jsonl", "results.json", "report.md", "scores.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert [(r["task"], r["idx"]) for r in rows] == [(t, i) for t in ("sports_understanding", "object_counting") for i in range(3)]
    items, _ = bbh.load_tasks(["sports_understanding", "object_counting"], limit=3)
    per = defaultdict(list)
    for r in rows:
        it = items[r["task"]][r["idx"]]
        s = bbh.score(r["generation"], it.target)
        assert (r["target"], r["answer"], r["correct"], r["lenient_correct"]) == (it.target, s.answer, s.correct, s.lenient_correct)
        assert r["finish"] in ("stop", "eos", "length") and r["prompt_tokens"] > 0 and len(r["prompt_sha256"]) == 64
        assert bbh.STOP_STRING not in r["generation"]
        per[r["task"]].append(r)

    results = json.loads((out / "results.json").read_text())
    assert results == returned   # what evaluate_bbh returns is what it wrote
    assert results["schema"] == bbh_results.SCHEMA and results["resolved"]["device"] == "cpu"
    assert set(results["config"]) == set(evaluate.EvalConfig.fields())   # the results.json schema's config
    assert results["config"]["tasks"] == "sports_understanding,object_counting"
    assert set(results["resolved"]) == {"tasks", "bbh_dir", "stop", "device", "dtype"}
    assert results["resolved"]["tasks"] == ["sports_understanding", "object_counting"]
    assert results["resolved"]["dtype"] == "float32" and results["resolved"]["stop"] == bbh.STOP_STRING
    report = (out / "report.md").read_text()
    for task, task_rows in per.items():
        strict = 100 * sum(r["correct"] for r in task_rows) / len(task_rows)
        lenient = 100 * sum(r["lenient_correct"] for r in task_rows) / len(task_rows)
        assert results["tasks"][task]["n"] == 3
        assert results["tasks"][task]["strict"] == pytest.approx(strict)
        assert results["tasks"][task]["lenient"] == pytest.approx(lenient)
        assert f"| {task} | {bbh.task_group(task)} | 3 | {strict:.2f} | {lenient:.2f} |" in report
    micro = 100 * sum(r["correct"] for r in rows) / len(rows)
    assert results["summary"]["strict"]["micro"] == pytest.approx(micro)
    assert f"| micro (6 items) | {micro:.2f} |" in report
    assert sum(results["finish"].values()) == 6 and results["timing"]["items_per_s"] > 0

    # the same generations re-scored as a predictions file give the same results
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"task": r["task"], "idx": r["idx"], "prediction": r["generation"]}) + "\n" for r in rows))
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    again = parser.parse_args(["--predictions", str(preds), "--limit", "3", "--out", str(tmp_path / "again"), "--no-plot"])
    assert evaluate.run(again) == 0
    assert not (tmp_path / "again" / "scores.png").exists()
    rescored = json.loads((tmp_path / "again" / "results.json").read_text())
    assert rescored["tasks"] == results["tasks"] and rescored["summary"] == results["summary"]
    rescored_rows = [json.loads(line) for line in (tmp_path / "again" / "items.jsonl").read_text().splitlines()]
    assert {(r["task"], r["idx"]): r["prompt_sha256"] for r in rescored_rows} == \
        {(r["task"], r["idx"]): r["prompt_sha256"] for r in rows}

    table = evaluate.compare_runs([evaluate.load_results(out), evaluate.load_results(tmp_path / "again")])
    assert "(+0.00)" in table


def test_trained_formats_use_the_training_templates(tiny_tokenizer):
    """`trained` and `trained-direct` prompts are exactly what fastkd.templates built at training time."""
    from fastkd import bbh as bbh_mod
    from fastkd.templates import Template, prompt_ids
    from fastkd.evaluate import build_prompts

    items = {"navigate": [bbh_mod.BBHItem("navigate", 0, "Take 1 step. Turn around.", "No")]}
    for fmt, cot in (("trained", True), ("trained-direct", False)):
        (text, ids), = build_prompts(items, tiny_tokenizer, fmt, False, "")
        assert ids == prompt_ids(tiny_tokenizer, Template(cot=cot), "Take 1 step. Turn around.")
        assert text == ("Q: Take 1 step. Turn around.\nA: Let's think step by step." if cot else "Q: Take 1 step. Turn around.\nA:")


def test_saved_predictions_are_cut_at_the_stop_string_and_bad_bytes_are_named(tmp_path):
    """A raw continuation (a server run without stop strings) is scored on its own answer, not on the
    next, hallucinated question's; a predictions file with bad UTF-8 is an error naming file and line."""
    items, _ = bbh.load_tasks(["navigate"], limit=2)
    rows = []
    for it in items["navigate"]:
        wrong = "No" if it.target == "Yes" else "Yes"
        rows.append({"task": "navigate", "idx": it.idx, "prediction":
                     f"Step one. So the answer is {it.target}.\n\nQ: Take 3 steps.\nA: So the answer is {wrong}."})
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args(["--predictions", str(preds), "--tasks", "navigate", "--limit", "2",
                              "--out", str(tmp_path / "run"), "--no-plot"])
    assert evaluate.run(args) == 0
    scored = [json.loads(x) for x in (tmp_path / "run" / "items.jsonl").read_text().splitlines()]
    assert all(r["correct"] and r["finish"] == "given-cut" and "\n\nQ:" not in r["generation"] for r in scored)

    preds.write_bytes(json.dumps(rows[0]).encode() + b"\n" + b'{"task": "navigate", "idx": 1, "prediction": "\xff"}\n')
    with pytest.raises(evaluate.EvalError, match=r"p\.jsonl: line 2: invalid UTF-8"):
        evaluate.read_predictions(preds)


def _scored(tmp_path, *argv, write: bool = True) -> int:
    """eval-bbh --predictions tmp_path/p.jsonl (no model) on navigate; `write`: first make it, the first 2 items right."""
    preds = tmp_path / "p.jsonl"
    if write and not preds.exists():
        items, _ = bbh.load_tasks(["navigate"], limit=2)
        preds.write_text("".join(json.dumps({"task": "navigate", "idx": it.idx, "prediction": f"So the answer is "
                                                                                          f"{it.target}."}) + "\n"
                                 for it in items["navigate"]))
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    return evaluate.run(parser.parse_args(["--predictions", str(preds), "--tasks", "navigate", "--limit", "2",
                                           *map(str, argv)]))


@needs_bbh
def test_an_evaluation_is_never_replaced_without_overwrite(tmp_path):
    out = tmp_path / "run"
    assert _scored(tmp_path, "--out", out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == set(bbh_results.RUN_FILES)
    with pytest.raises(evaluate.EvalError, match=f"--out {out} already holds an evaluation \\(items.jsonl, "
                                                 "results.json, report.md, scores.png\\); delete it and start over "
                                                 "with --overwrite, or choose another --out"):
        _scored(tmp_path, "--out", out, "--limit", "1")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "notes.txt").write_text("mine")
    assert _scored(tmp_path, "--out", out, "--limit", "1", "--overwrite", "--no-plot") == 0
    assert len((out / "items.jsonl").read_text().splitlines()) == 1
    assert not (out / "scores.png").exists() and (out / "notes.txt").read_text() == "mine"   # nothing mixed
    mine = tmp_path / "mine"   # a folder of the user's own files is fine, as before
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert _scored(tmp_path, "--out", mine, "--no-plot") == 0 and (mine / "notes.txt").read_text() == "mine"


@needs_bbh
def test_a_cache_or_run_folder_is_refused_before_anything_is_read(tmp_path):
    for marker in ("manifest.json", "final"):
        folder = tmp_path / marker.split(".")[0]
        folder.mkdir()
        (folder / marker).mkdir()
        with pytest.raises(UserError, match=f"holds a .*\\({marker}\\), not a BBH evaluation"):
            _scored(tmp_path, "--out", folder, "--overwrite", write=False)   # no predictions file: not read
        assert [p.name for p in folder.iterdir()] == [marker]


@needs_bbh
def test_the_saved_config_is_read_back_by_config(tmp_path):
    """results.json's config, as YAML, makes the same EvalConfig with --config (the facts it led to apart)."""
    import yaml

    out = tmp_path / "run"
    assert _scored(tmp_path, "--out", out, "--no-plot", "--name", "mine") == 0
    results = json.loads((out / "results.json").read_text())
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(results["config"]))
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    again = evaluate.EvalConfig.from_args(parser.parse_args(["--config", str(tmp_path / "again.yaml")]))
    assert again.as_dict() == results["config"] and again.out == str(out) and again.limit == 2
    assert results["resolved"] == {"tasks": ["navigate"], "bbh_dir": str(BBH_DIR), "stop": bbh.STOP_STRING,
                                   "device": None, "dtype": None}
    assert f"data `{BBH_DIR}`" in (out / "report.md").read_text()
    assert evaluate.run(parser.parse_args(["--config", str(tmp_path / "again.yaml"), "--overwrite"])) == 0


@needs_bbh
def test_a_predicted_idx_outside_the_task_is_refused_whatever_the_limit(tmp_path):
    n = len(bbh.load_tasks(["navigate"])[0]["navigate"])
    assert _scored(tmp_path, "--out", tmp_path / "first", "--no-plot") == 0
    preds = tmp_path / "p.jsonl"
    given = preds.read_text() + json.dumps({"task": "navigate", "idx": n - 1, "prediction": "x"}) + "\n"
    preds.write_text(given)
    assert _scored(tmp_path, "--out", tmp_path / "inside", "--no-plot") == 0   # past --limit, in the task: not scored
    for idx in (n, 1000000, -1):
        preds.write_text(given + json.dumps({"task": "navigate", "idx": idx, "prediction": "x"}) + "\n")
        for limit in ("1", "2"):
            with pytest.raises(evaluate.EvalError, match=f"line 4: field 'idx' {idx} is not an item of navigate "
                                                         f"\\(idx 0..{n - 1}\\)"):
                _scored(tmp_path, "--out", tmp_path / "o", "--limit", limit)
    assert not (tmp_path / "o").exists()
