"""Records -> templates -> ids and masks, checked against hand-written expectations."""

import json

import pytest

from fastkd.records import DataError, FieldMap, read_records
from fastkd.templates import Template, build_example, build_examples, strip_answer_phrase, BuildReport
from fastkd.batching import labels_from_mask, length_sorted_batches, pad_batch
from fastkd.tokenizer_identity import tokenizer_identity, check_tokenizer


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
    assert ex.record_index == 7   # the mask above fixes where the prompt ends and how many tokens learn


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
    assert tiny_tokenizer.decode(ex.input_ids[:ex.loss_mask.index(1)]) == "<|user|>True or False is<|assistant|>"
    ex = build_example(REC, 0, tiny_tokenizer, Template(cot=True, chat=True))
    assert tiny_tokenizer.decode(ex.input_ids[ex.loss_mask.index(1):]) == \
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


def test_a_json_line_cut_short_names_its_own_line_only(tmp_path, tiny_tokenizer):
    """The parser sees the line's newline; its 'line 2, column 1' must not contradict 'line 1'."""
    path = tmp_path / "r.jsonl"
    path.write_text('{"source": "q", "target": "t"\n' + json.dumps(REC) + "\n")
    with pytest.raises(DataError) as err:
        build_examples(path, tiny_tokenizer, Template())
    assert "record 0 (line 1): invalid JSON: Expecting ',' delimiter at the end of the line" in str(err.value)
    assert "line 2" not in str(err.value)


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


# ----------------------------------------------------------------------------- tokenizer identity

def _variant(tok, edit=None, **special):
    """The tokenizer rebuilt from its own tokenizer.json, after `edit(spec)` changes the parsed JSON."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tok.backend_tokenizer.to_str())
    if edit is not None:
        edit(spec)
    kwargs = dict(eos_token="<|endoftext|>", pad_token="<|pad|>", model_max_length=4096)
    kwargs.update(special)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), **kwargs)


def _refusal(ident, tok) -> str:
    with pytest.raises(DataError) as err:
        check_tokenizer(ident, tok, "cache /c")
    return str(err.value)


def _drop_last_merge(spec):
    spec["model"]["merges"].pop()


def _prefix_space(spec):
    spec["pre_tokenizer"]["add_prefix_space"] = True


def _lowercase(spec):
    spec["normalizer"] = {"type": "Lowercase"}


def _bos_template(spec):
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}


def _vocab_word_as_added_token(spec):   # "True" is in the vocabulary already: same vocab, one more added token
    spec["added_tokens"].append({"id": spec["model"]["vocab"]["True"], "content": "True", "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": True, "special": False})


def _added_token_flag(spec):
    spec["added_tokens"][2]["lstrip"] = True


def test_identical_tokenizer_accepted_and_identity_deterministic(tiny_tokenizer):
    import warnings

    from fastkd.tiny import train_tokenizer

    ident = tokenizer_identity(tiny_tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_tokenizer(ident, tiny_tokenizer, "cache /c")
        check_tokenizer(ident, _variant(tiny_tokenizer), "cache /c")      # rebuilt from its tokenizer.json
        check_tokenizer(ident, train_tokenizer(), "cache /c")             # trained again
    assert tokenizer_identity(_variant(tiny_tokenizer)) == ident
    assert json.loads(json.dumps(ident)) == ident                          # stored in a JSON manifest as is


@pytest.mark.parametrize("edit, special, part", [
    (_drop_last_merge, {}, "merges differ"),
    (_prefix_space, {}, "pre-tokenizer differs"),
    (_lowercase, {}, "normalizer differs"),
    (_bos_template, {}, "post-processor differs"),
    (_vocab_word_as_added_token, {}, "added tokens differ"),
    (_added_token_flag, {}, "added tokens differ"),
    (None, {"bos_token": "<|user|>"}, "special tokens differ: bos_token None vs '<|user|>'"),
    (None, {"pad_token": "<|assistant|>"}, "special tokens differ: pad_token '<|pad|>' vs '<|assistant|>', pad_token_id 1 vs 3"),
], ids=["merges", "pre_tokenizer", "normalizer", "post_processor", "added_token", "added_token_flag", "bos", "pad"])
def test_same_vocab_other_tokenisation_refused_naming_the_part(tiny_tokenizer, edit, special, part):
    """Each of these keeps vocabulary, size and EOS id (what the first identity hashed) and was accepted."""
    other = _variant(tiny_tokenizer, edit, **special)
    old = tokenizer_identity(tiny_tokenizer)
    new = tokenizer_identity(other)
    assert (new["vocab_sha256"], new["vocab_size"], new["eos_token_id"]) == (old["vocab_sha256"], old["vocab_size"], old["eos_token_id"])
    message = _refusal(old, other)
    assert part in message and "cache /c" in message, message
    name = {"merges differ": "merges", "pre-tokenizer differs": "pre_tokenizer", "normalizer differs": "normalizer",
            "post-processor differs": "post_processor", "added tokens differ": "added_tokens"}.get(part, "special_tokens")
    assert f"({name}: cache {old['components'][name][:12]}..., student {new['components'][name][:12]}...)" in message


def test_the_edits_do_change_tokenisation(tiny_tokenizer):
    """The parts the identity refuses on really change ids (so refusing is right)."""
    text = "Q: not ( True ) and ( True ) is\nA: So the answer is False. <|user|>"
    base = tiny_tokenizer(text)["input_ids"]
    for edit in (_drop_last_merge, _prefix_space, _lowercase, _bos_template, _vocab_word_as_added_token):
        merged = dict(json.loads(tiny_tokenizer.backend_tokenizer.to_str())["model"])
        probe = text if edit is not _drop_last_merge else "".join(merged["merges"][-1]).replace("\u0120", " ")
        assert _variant(tiny_tokenizer, edit)(probe)["input_ids"] != tiny_tokenizer(probe)["input_ids"], edit.__name__
    assert base == _variant(tiny_tokenizer)(text)["input_ids"]


def test_identity_without_components_is_refused(tiny_tokenizer):
    """A pre-release identity (size, vocabulary and special ids only) cannot vouch for merges and the rest: refused."""
    ident = tokenizer_identity(tiny_tokenizer)
    old = {key: ident[key] for key in ("vocab_size", "vocab_sha256", "eos_token_id", "pad_token_id", "class")}
    with pytest.raises(DataError, match="cache /c: .*no per-part hashes .*re-create the cache"):
        check_tokenizer(old, tiny_tokenizer, "cache /c")
    from fastkd.tiny import train_tokenizer

    with pytest.raises(DataError, match="vocab_size: cache has"):
        check_tokenizer(old, train_tokenizer(["a completely different corpus of words"] * 3, vocab_size=300), "cache /c")
    with pytest.raises(DataError, match="eos_token_id: cache has 0, tokenizer has 2"):
        check_tokenizer(old, _variant(tiny_tokenizer, eos_token="<|user|>"), "cache /c")


def test_round_trip_keeps_identity(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tiny_tokenizer.save_pretrained(tmp_path / "plain")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "plain")
    assert tokenizer_identity(loaded) == tokenizer_identity(tiny_tokenizer)
    loaded.save_pretrained(tmp_path / "again")
    assert tokenizer_identity(AutoTokenizer.from_pretrained(tmp_path / "again")) == tokenizer_identity(tiny_tokenizer)


def test_identity_of_what_autotokenizer_loads_beside_a_qwen2_config(tiny_qwen_dir, tiny_llama_dir, tiny_tokenizer, tmp_path):
    """transformers may load a tokenizers-trained tokenizer.json beside a Qwen2 config.json as its
    own Qwen2 tokenizer, which re-derives normalizer and pre-tokenizer: test what was loaded."""
    import shutil

    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    ident = tokenizer_identity(loaded)
    (tmp_path / "q").mkdir()
    shutil.copy(tiny_qwen_dir / "config.json", tmp_path / "q")
    loaded.save_pretrained(tmp_path / "q")
    again = AutoTokenizer.from_pretrained(tmp_path / "q")
    assert type(again) is type(loaded) and tokenizer_identity(again) == ident   # its own round trip is stable
    mine, theirs = (json.loads(t.backend_tokenizer.to_str()) for t in (tiny_tokenizer, loaded))
    changed = [key for key in ("normalizer", "pre_tokenizer", "post_processor", "added_tokens") if mine[key] != theirs[key]]
    if not changed and mine["model"]["merges"] == theirs["model"]["merges"] and \
            tokenizer_identity(tiny_tokenizer)["special_tokens"] == ident["special_tokens"]:
        check_tokenizer(tokenizer_identity(tiny_tokenizer), loaded, "cache /c")
    else:
        message = _refusal(tokenizer_identity(tiny_tokenizer), loaded)
        labels = {"normalizer": "normalizer differs", "pre_tokenizer": "pre-tokenizer differs",
                  "post_processor": "post-processor differs", "added_tokens": "added tokens differ"}
        assert all(labels[key] in message for key in changed), (changed, message)
        if "normalizer" in changed:   # and the difference is real: NFC composes "a" + combining acute
            assert loaded("a\u0301")["input_ids"] != tiny_tokenizer("a\u0301")["input_ids"]
    llama = AutoTokenizer.from_pretrained(tiny_llama_dir)   # beside a Llama config: loaded as saved
    if llama.backend_tokenizer.to_str() == tiny_tokenizer.backend_tokenizer.to_str():
        check_tokenizer(tokenizer_identity(tiny_tokenizer), llama, "cache /c")


class _SlowTokenizer:
    """A tokenizer without a `tokenizers` backend: a word-level vocabulary in Python."""

    def __init__(self, vocab, lower=False):
        self.vocab, self.do_lower_case = dict(vocab), lower
        self.eos_token, self.eos_token_id, self.pad_token, self.pad_token_id = "</s>", self.vocab["</s>"], "</s>", self.vocab["</s>"]
        self.bos_token = self.unk_token = None
        self.bos_token_id = self.unk_token_id = None

    def __len__(self):
        return len(self.vocab)

    def get_vocab(self):
        return dict(self.vocab)

    def __call__(self, text, add_special_tokens=True):
        words = (text.lower() if self.do_lower_case else text).split()
        return {"input_ids": [self.vocab.get(w, 0) for w in words]}


def test_slow_tokenizer_gets_a_partial_identity(tiny_tokenizer):
    import fastkd.tokenizer_identity as data

    vocab = {"</s>": 0, "hello": 1, "Hello": 2, "world": 3}
    slow = _SlowTokenizer(vocab)
    ident = tokenizer_identity(slow)
    assert ident["partial"] and ident["unchecked"] == ["merges", "model", "normalizer", "pre_tokenizer", "post_processor"]
    check_tokenizer(ident, _SlowTokenizer(vocab), "cache /c")
    message = _refusal(ident, _SlowTokenizer(vocab, lower=True))
    assert "tokenizer class or its tokenisation flags differ" in message and "probe texts tokenise differently" in message
    with pytest.warns(data.TokenizerIdentityWarning, match="could not be checked"):   # full cache, slow student: the rest still compared
        full = dict(tokenizer_identity(tiny_tokenizer))
        full.update(vocab_size=ident["vocab_size"], vocab_sha256=ident["vocab_sha256"], eos_token_id=0,
                    components={k: v for k, v in ident["components"].items() if k in ("special_tokens", "probe")}
                    | {"merges": "0" * 64})
        check_tokenizer(full, _SlowTokenizer(vocab), "cache /c")


def test_merges_spellings_and_empty_affixes_hash_the_same(tiny_tokenizer):
    from fastkd.tokenizer_identity import _canonical_merges

    assert _canonical_merges(["a b", "ab c"]) == _canonical_merges([["a", "b"], ["ab", "c"]])

    def empty_affixes(spec):
        spec["model"]["continuing_subword_prefix"] = ""
        spec["model"]["end_of_word_suffix"] = ""
    check_tokenizer(tokenizer_identity(tiny_tokenizer), _variant(tiny_tokenizer, empty_affixes), "cache /c")
