"""Records -> templates -> ids and masks, checked against hand-written expectations."""

import json

import pytest

from fastkd.data import (DataError, FieldMap, Template, build_example, build_examples, labels_from_mask,
                         length_sorted_batches, pad_batch, read_records, strip_answer_phrase, tokenizer_identity,
                         check_tokenizer, BuildReport)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


REC = {"source": "True or False is", "rationale": "True or False is True.", "target": "True"}


def test_cot_template_tokens_and_mask(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = build_example(REC, 7, tok, Template(cot=True))
    prompt = _ids(tok, "Q: True or False is\nA: Let's think step by step.")
    response = _ids(tok, " True or False is True. So the answer is True.") + [tok.eos_token_id]
    assert ex.input_ids == prompt + response
    assert ex.loss_mask == [0] * len(prompt) + [1] * len(response)
    assert ex.record_index == 7 and ex.prompt_length == len(prompt) and ex.num_loss_tokens == len(response)


def test_no_cot_template_is_target_alone(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = build_example(REC, 0, tok, Template(cot=False))
    prompt = _ids(tok, "Q: True or False is\nA:")
    assert ex.input_ids == prompt + _ids(tok, " True") + [tok.eos_token_id]
    assert tok.decode([i for i, m in zip(ex.input_ids, ex.loss_mask) if m]) == " True<|endoftext|>"


@pytest.mark.parametrize("rationale", [
    "True or False is True. So the answer is True.",
    "True or False is True. So the answer is True",
    "True or False is True.  so the answer is True. ",
    "True or False is True. Therefore, the answer is True.",
    "Let's think step by step. True or False is True. So the answer is True.",
])
def test_answer_phrase_added_once(rationale):
    text = Template(cot=True).response(rationale, "True")
    assert text == " True or False is True. So the answer is True."


def test_answer_phrase_kept_when_target_differs():
    assert strip_answer_phrase("So the answer is (A).", "(B)") == "So the answer is (A)."


def test_chat_template_prompt(tiny_tokenizer):
    ex = build_example(REC, 0, tiny_tokenizer, Template(cot=False, chat=True))
    assert tiny_tokenizer.decode(ex.input_ids) == "<|user|>True or False is<|assistant|> True<|endoftext|>"
    assert tiny_tokenizer.decode(ex.input_ids[:ex.prompt_length]) == "<|user|>True or False is<|assistant|>"
    ex = build_example(REC, 0, tiny_tokenizer, Template(cot=True, chat=True))
    assert tiny_tokenizer.decode(ex.input_ids[ex.prompt_length:]) == \
        " Let's think step by step. True or False is True. So the answer is True.<|endoftext|>"


def test_cot_and_answer_only_prompts_differ():
    """One model trained on both modes must be told which one a prompt asks for."""
    assert Template(cot=True).prompt("x") == "Q: x\nA: Let's think step by step."
    assert Template(cot=False).prompt("x") == "Q: x\nA:"


def _write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.mark.parametrize("bad, reason", [
    ({"source": "x", "rationale": "r"}, "field 'target' is missing"),
    ({"source": "x", "rationale": "r", "target": 3}, "field 'target' is int, not a string"),
    ({"source": "x", "rationale": "r", "target": "  "}, "empty response"),
    ({"source": "x", "target": "t"}, "field 'rationale' is missing"),
    (["not", "an", "object"], "expected an object"),
])
def test_bad_record_error_names_file_record_field(tmp_path, tiny_tokenizer, bad, reason):
    path = _write_jsonl(tmp_path / "r.jsonl", [REC, REC, bad])
    with pytest.raises(DataError) as err:
        build_examples(path, tiny_tokenizer, Template(cot=True))
    assert str(path) in str(err.value) and "record 2" in str(err.value) and reason in str(err.value)


def test_skip_bad_counts_reasons(tmp_path, tiny_tokenizer):
    path = _write_jsonl(tmp_path / "r.jsonl", [REC, {"source": "x"}, {"source": "x", "rationale": "r", "target": ""}, REC])
    report = BuildReport()
    examples = build_examples(path, tiny_tokenizer, Template(cot=True), skip_bad=True, report=report)
    assert [e.record_index for e in examples] == [0, 3]
    assert report.kept == 2 and report.skipped == {"missing": 1, "empty response": 1}


def test_invalid_json_line_named(tmp_path, tiny_tokenizer):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(REC) + "\n{oops\n")
    with pytest.raises(DataError, match=r"record 1 \(line 2\): invalid JSON"):
        build_examples(path, tiny_tokenizer, Template())


def test_no_cot_does_not_need_rationale(tmp_path, tiny_tokenizer):
    path = _write_jsonl(tmp_path / "r.jsonl", [{"source": "q", "target": "t"}])
    assert len(build_examples(path, tiny_tokenizer, Template(cot=False))) == 1


def test_overflow_truncate_and_skip(tmp_path, tiny_tokenizer):
    long = dict(REC, rationale="True or False is True. " * 40)
    path = _write_jsonl(tmp_path / "r.jsonl", [REC, long])
    report = BuildReport()
    ex = build_examples(path, tiny_tokenizer, Template(), max_length=30, overflow="truncate", report=report)
    assert len(ex) == 2 and len(ex[1].input_ids) == 30 and ex[1].truncated and report.truncated == 1
    assert ex[1].loss_mask[-1] == 1  # the truncated end is still a loss token
    report = BuildReport()
    ex = build_examples(path, tiny_tokenizer, Template(), max_length=30, overflow="skip", report=report)
    assert [e.record_index for e in ex] == [0] and report.skipped == {"too long": 1}


def test_prompt_longer_than_context_is_skipped(tmp_path, tiny_tokenizer):
    path = _write_jsonl(tmp_path / "r.jsonl", [dict(REC, source="True or " * 50 + "False")])
    report = BuildReport()
    assert build_examples(path, tiny_tokenizer, Template(), max_length=20, report=report) == []
    assert report.skipped == {"too long": 1}


def test_read_json_formats(tmp_path):
    (tmp_path / "map.json").write_text(json.dumps({"id1": REC, "id2": dict(REC, target="False")}))
    (tmp_path / "list.json").write_text(json.dumps([REC]))
    assert [r["target"] for _, r in read_records(tmp_path / "map.json")] == ["True", "False"]
    assert [i for i, _ in read_records(tmp_path / "list.json")] == [0]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([REC, REC]), tmp_path / "r.parquet")
    assert len(list(read_records(tmp_path / "r.parquet"))) == 2
    (tmp_path / "r.txt").write_text("x")
    with pytest.raises(DataError, match="unknown record format"):
        list(read_records(tmp_path / "r.txt"))
    with pytest.raises(DataError, match="no such file"):
        list(read_records(tmp_path / "missing.jsonl"))


def test_custom_field_names(tmp_path, tiny_tokenizer):
    path = _write_jsonl(tmp_path / "r.jsonl", [{"question": "q", "why": "w", "answer": "a"}])
    ex = build_examples(path, tiny_tokenizer, Template(), FieldMap("question", "why", "answer"))
    assert len(ex) == 1


def test_padding_and_labels():
    import torch

    ids, attn, loss = pad_batch([[5, 6, 7, 8], [9, 10]], pad_id=0, side="right", masks=[[0, 0, 1, 1], [0, 1]])
    assert ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]] and attn.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert labels_from_mask(ids, loss).tolist() == [[-100, 7, 8, -100], [10, -100, -100, -100]]
    ids, attn = pad_batch([[1, 2, 3], [4]], pad_id=0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and attn.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert isinstance(ids, torch.Tensor)


def test_length_sorted_batches_cover_all_once():
    lengths = [5, 1, 9, 3, 9, 2, 7]
    batches = length_sorted_batches(lengths, 3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(7)) and [lengths[i] for i in flat] == sorted(lengths, reverse=True)


def test_tokenizer_identity_detects_difference(tiny_tokenizer):
    from fastkd.tiny import train_tokenizer

    ident = tokenizer_identity(tiny_tokenizer)
    check_tokenizer(ident, tiny_tokenizer, "cache")
    other = train_tokenizer(["a completely different corpus of words"] * 3, vocab_size=300)
    with pytest.raises(DataError, match="vocab_size: cache has"):
        check_tokenizer(ident, other, "cache")


def test_tokenizer_reload_keeps_ids(tiny_qwen_dir, tiny_tokenizer):
    """AutoTokenizer on a Qwen2 folder must give the ids the trained tokenizer gives."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    text = "Q: not ( True ) and ( False ) is\nA: Let's think. (Q) So the answer is False.<|endoftext|>"
    assert loaded(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert tokenizer_identity(loaded)["vocab_sha256"] == tokenizer_identity(tiny_tokenizer)["vocab_sha256"]


def test_record_cot_false_gets_answer_only_response(tmp_path, tiny_tokenizer):
    path = _write_jsonl(tmp_path / "r.jsonl", [dict(REC, cot=True), {"source": REC["source"], "target": "True", "rationale": "", "cot": False}])
    cot, plain = build_examples(path, tiny_tokenizer, Template(cot=True))
    assert cot.input_ids == build_example(REC, 0, tiny_tokenizer, Template(cot=True)).input_ids
    assert plain.input_ids == build_example(REC, 1, tiny_tokenizer, Template(cot=False)).input_ids


def test_response_keeps_the_rationale_text_as_written():
    """Only the answer phrase is normalised; spacing inside the rationale is data and stays."""
    assert Template(cot=True).response("a  b\n\nc", "d") == " a  b\n\nc So the answer is d."
    assert Template(cot=True).response("", "d") == " So the answer is d."
