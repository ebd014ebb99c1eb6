"""fastkd generate-rationales: sampling, judging with eval-bbh's extraction, provenance, resume, and
records that cache-teacher reads as they are."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastkd.errors import UserError
from fastkd.generate import Sampling
from fastkd.rationales import LOG_SUFFIX, RationalesConfig, generate_rationales, judge


def generate(teacher, data, out, engine=None, **options) -> dict:
    """generate_rationales on a RationalesConfig made from these options."""
    return generate_rationales(RationalesConfig.make(overrides=dict(teacher=teacher, data=data, out=out, **options)),
                               engine=engine)


def write_answers(path: Path, n: int = 6) -> Path:
    rows = [{"source": f"{i} plus {i} is", "target": str(2 * i), "task": "add" if i % 2 else "double"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class FakeEngine:
    """vLLM's generate() shape: one RequestOutput per prompt, .outputs[0].text and .finish_reason. Its text
    depends on the prompt and the request's seed only (as a seeded engine's would)."""

    def __init__(self):
        self.calls = 0

    def generate(self, prompts, params):
        self.calls += 1
        outs = []
        for prompt, p in zip(prompts, params):
            seed = p["seed"] if isinstance(p, dict) else p.seed
            x = int(prompt.split("Q: ")[1].split(" ")[0])
            right = seed % 3 != 0
            text = f" {x} and {x} make {2 * x if right else 2 * x + 1}. So the answer is {2 * x if right else 2 * x + 1}."
            if seed % 7 == 0:
                text, reason = " I am not sure", "length"
            else:
                reason = "stop"
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(text=text, finish_reason=reason)]))
        return outs


def test_judge_uses_the_eval_extraction():
    assert judge(" 2 and 2. So the answer is 4.", "4", "stop") == (True, "answer matches the target")
    assert judge(" So the answer is 5.", "4", "stop")[1].startswith("wrong answer")
    assert judge(" thinking...", "4", "length") == (False, "no final answer (hit --max-new-tokens)")
    assert judge("   ", "4", "eos") == (False, "empty generation")
    # the LAST answer phrase counts, as in eval-bbh
    assert judge(" So the answer is 3. No wait. So the answer is 4.", "4", "stop")[0]


def test_rationales_are_judged_logged_and_summarised(tmp_path):
    data = write_answers(tmp_path / "answers.jsonl")
    out = tmp_path / "records.jsonl"
    summary = generate("fake-teacher", str(data), str(out), n=5, engine=FakeEngine(), progress=False)
    log = [json.loads(line) for line in (tmp_path / ("records.jsonl" + LOG_SUFFIX)).read_text().splitlines()]
    assert log[0]["settings"]["n"] == 5 and len(log) == 1 + 6 * 5
    assert set(log[0]["settings"]) == {"teacher", "data_sha256", "n", "temperature", "top_p", "top_k",
                                       "max_new_tokens", "seed", "chat", "backend"}   # the header earlier logs have
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(kept) == sum(e["kept"] for e in log[1:]) == summary["kept"]
    for rec in kept:
        assert rec["rationale"].endswith(f"So the answer is {rec['target']}.")
        assert set(rec["provenance"]) == {"teacher", "record_index", "sample"}
    for e in log[1:]:
        assert e["kept"] == e["record"]["rationale"].endswith(f"is {e['record']['target']}.")
    assert summary["tasks"]["add"]["samples"] == 15 and 0 < summary["keep_rate"] < 1
    reasons = {e["reason"].split(":")[0] for e in log[1:] if not e["kept"]}
    assert reasons <= {"wrong answer", "no final answer (hit --max-new-tokens)"} and reasons


def test_a_killed_run_resumes_to_the_same_records_and_other_settings_are_refused(tmp_path, monkeypatch):
    import fastkd.rationales as rationales

    data = write_answers(tmp_path / "answers.jsonl", n=12)
    whole = tmp_path / "whole.jsonl"
    generate("fake-teacher", str(data), str(whole), n=3, batch_size=2, engine=FakeEngine(), progress=False)

    killed = tmp_path / "killed.jsonl"
    real_append = rationales.append_lines
    calls = {"n": 0}

    def dying_append(path, entries):
        calls["n"] += 1
        if calls["n"] == 3:  # the second chunk: half a line reaches the disk, then the process dies
            with path.open("a") as fh:
                fh.write(json.dumps(entries[0])[:25])
            raise KeyboardInterrupt
        real_append(path, entries)

    monkeypatch.setattr(rationales, "append_lines", dying_append)
    with pytest.raises(KeyboardInterrupt):
        generate("fake-teacher", str(data), str(killed), n=3, batch_size=2, engine=FakeEngine(),
                 progress=False)
    monkeypatch.setattr(rationales, "append_lines", real_append)
    engine = FakeEngine()
    generate("fake-teacher", str(data), str(killed), n=3, batch_size=2, engine=engine, progress=False)
    assert killed.read_text() == whole.read_text()
    log = [json.loads(x) for x in (tmp_path / ("killed.jsonl" + LOG_SUFFIX)).read_text().splitlines()]
    assert len(log) == 1 + 12 * 3  # every sample once, the partial line gone
    with pytest.raises(UserError, match="other settings.*temperature"):
        generate("fake-teacher", str(data), str(killed), n=3, temperature=1.3, engine=FakeEngine(),
                 progress=False)
    header_cut = tmp_path / "cut.jsonl"       # killed while the header itself was written: a fresh start
    (tmp_path / ("cut.jsonl" + LOG_SUFFIX)).write_text(json.dumps(log[0])[:20])
    generate("fake-teacher", str(data), str(header_cut), n=3, batch_size=2, engine=FakeEngine(), progress=False)
    assert header_cut.read_text() == whole.read_text()
    assert (tmp_path / ("cut.jsonl" + LOG_SUFFIX)).read_text().splitlines()[0] == json.dumps(log[0])
    for cut in ("", '{"sett'):                  # a kill before the first byte, or inside the first key
        (tmp_path / ("cut.jsonl" + LOG_SUFFIX)).write_text(cut)
        header_cut.unlink()
        generate("fake-teacher", str(data), str(header_cut), n=3, batch_size=2, engine=FakeEngine(), progress=False)
        assert header_cut.read_text() == whole.read_text()
    foreign = tmp_path / ("other.jsonl" + LOG_SUFFIX)   # one unfinished line that no fastkd wrote: kept, refused
    for text in ("notes: do not delete", "\nnotes: do not delete"):   # after a blank line too
        foreign.write_text(text)
        with pytest.raises(UserError, match="not a fastkd provenance log"):
            generate("fake-teacher", str(data), str(tmp_path / "other.jsonl"), n=3, engine=FakeEngine(),
                     progress=False)
        assert foreign.read_text() == text


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        generate("t", str(tmp_path / "missing.jsonl"), str(tmp_path / "o.jsonl"), engine=FakeEngine())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "x is"}\n')
    with pytest.raises(UserError, match="bad.jsonl: record 0: field 'target' is missing"):
        generate("t", str(bad), str(tmp_path / "out" / "o.jsonl"), engine=FakeEngine(), progress=False)
    assert not (tmp_path / "out").exists()  # a refusal leaves no empty output files
    data = write_answers(tmp_path / "a.jsonl")
    with pytest.raises(UserError, match="is the input"):
        generate("t", str(data), str(data), engine=FakeEngine())


def test_an_out_file_it_did_not_write_is_refused_and_kept(tmp_path):
    """--out F without F's provenance log beside it is someone's file: refused, before the teacher loads, untouched;
    an empty F is fine (nothing to lose), and so is F with its log (a resume)."""
    data = write_answers(tmp_path / "answers.jsonl")
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"source": "my", "rationale": "hand-written", "target": "x"}\n')
    engine = FakeEngine()
    with pytest.raises(UserError, match="--out .*mine.jsonl: already exists and was not written by "
                                        "generate-rationales \\(no mine.jsonl.provenance.jsonl beside it\\)"):
        generate("fake-teacher", str(data), str(mine), n=1, engine=engine, progress=False)
    assert mine.read_text() == '{"source": "my", "rationale": "hand-written", "target": "x"}\n'
    assert engine.calls == 0 and not (tmp_path / ("mine.jsonl" + LOG_SUFFIX)).exists()
    with pytest.raises(UserError, match="already exists"):
        generate("fake-teacher", str(data), str(tmp_path), n=1, engine=engine, progress=False)   # a folder
    mine.write_text("")
    first = generate("fake-teacher", str(data), str(mine), n=1, engine=engine, progress=False)
    again = generate("fake-teacher", str(data), str(mine), n=1, engine=engine, progress=False)
    assert first == again and engine.calls == 1


def test_sampling_draws_follow_the_settings():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    assert torch.equal(Sampling(top_k=1).draw(logits, gens), logits.argmax(-1))
    assert torch.equal(Sampling(top_p=1e-6).draw(logits, gens), logits.argmax(-1))
    # nucleus: every draw lies in the smallest top set reaching top_p (brute force)
    probs = torch.softmax(logits, -1)
    for _ in range(20):
        draws = Sampling(top_p=0.6).draw(logits, gens)
        for r in range(3):
            order = probs[r].argsort(descending=True).tolist()
            mass, allowed = 0.0, set()
            for i in order:
                allowed.add(i)
                mass += float(probs[r, i])
                if mass >= 0.6:
                    break
            assert int(draws[r]) in allowed
    with pytest.raises(ValueError):
        Sampling(temperature=0)


def test_hf_backend_output_feeds_cache_teacher(tmp_path, tiny_qwen_dir):
    """The real path on a tiny teacher: sampled rationales written, then cached as they are."""
    from fastkd.cache_stage import cache_teacher
    from fastkd.cache_tools import CacheReader

    data = write_answers(tmp_path / "answers.jsonl", n=4)
    out = tmp_path / "records.jsonl"
    summary = generate(str(tiny_qwen_dir), str(data), str(out), n=2, max_new_tokens=12, batch_size=3,
                       temperature=1.0, progress=False, device="cpu")
    assert summary["samples"] == 8
    # a random tiny teacher rarely reaches the target: keep everything it wrote, as a stand-in set of records
    log = [json.loads(x) for x in (tmp_path / ("records.jsonl" + LOG_SUFFIX)).read_text().splitlines()[1:]]
    assert all(e["finish"] in ("eos", "stop", "length") for e in log)
    records = tmp_path / "all.jsonl"
    records.write_text("".join(json.dumps(e["record"]) + "\n" for e in log))
    cache_teacher(dict(teacher=str(tiny_qwen_dir), data=str(records), out=str(tmp_path / "cache"), top_k=4,
                       progress=False))
    assert len(CacheReader(tmp_path / "cache")) == 8


def test_messages_form_output_is_a_conversation_cache_teacher_reads(tmp_path, tiny_tokenizer):
    """--messages: the same kept samples, as a user turn and an assistant turn whose reasoning_content is the
    rationale without its answer sentence; read back as conversations whose answer turn carries the loss."""
    from fastkd.templates import Template, build_examples

    data = write_answers(tmp_path / "answers.jsonl")
    plain, chat = tmp_path / "plain.jsonl", tmp_path / "chat.jsonl"
    generate("fake-teacher", str(data), str(plain), n=3, engine=FakeEngine(), progress=False)
    generate("fake-teacher", str(data), str(chat), n=3, engine=FakeEngine(), progress=False, messages=True)
    plain_recs = [json.loads(x) for x in plain.read_text().splitlines()]
    chat_recs = [json.loads(x) for x in chat.read_text().splitlines()]
    assert len(chat_recs) == len(plain_recs) > 0
    for p, c in zip(plain_recs, chat_recs):
        user, assistant = c["messages"]
        assert user == {"role": "user", "content": p["source"]}
        assert assistant["content"] == f"So the answer is {p['target']}."
        assert p["rationale"] == f"{assistant['reasoning_content']} {assistant['content']}"
        assert c["task"] == p["task"] and c["provenance"] == p["provenance"] and "source" not in c
    examples = build_examples(chat, tiny_tokenizer, Template(loss_turns="answer"))
    assert [tiny_tokenizer.decode([t for t, m in zip(e.input_ids, e.loss_mask) if m]) for e in examples] == \
        [f"So the answer is {p['target']}." for p in plain_recs]


def test_the_vllm_backend_gets_the_embedded_teacher_as_its_folder(tmp_path, monkeypatch):
    """--backend vllm --teacher embedded: vLLM is given the shipped teacher's folder, not the name (a hub look-up)."""
    from fastkd import teacher_vllm
    from fastkd.paths import EMBEDDED_TEACHER

    given = []

    class Stop(Exception):
        pass

    def engine(model, **kwargs):
        given.append(model)
        raise Stop

    monkeypatch.setattr(teacher_vllm, "require_vllm", lambda: SimpleNamespace(LLM=engine))
    with pytest.raises(Stop):
        generate("embedded", str(write_answers(tmp_path / "in.jsonl", 1)), str(tmp_path / "out.jsonl"), backend="vllm")
    assert given == [str(EMBEDDED_TEACHER)]
