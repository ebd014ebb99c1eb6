"""`fastkd cache-teacher`: cached values against an independent recomputation, resume, refusal."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fastkd.cache_stage import cache_teacher
from fastkd.cli import main as cli_main
from fastkd.errors import UserError

K = 16


def _records(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["True", "False", "and", "or", "not", "(", ")", "step", "Take", "Yes", "No"]
    recs = []
    for i in range(n):
        src = " ".join(rng.choice(words, size=rng.integers(2, 12)))
        rat = " ".join(rng.choice(words, size=rng.integers(0, 20)))
        recs.append({"source": src, "rationale": rat, "target": str(rng.choice(["True", "False"])), "task": f"t{i % 3}"})
    return recs


@pytest.fixture
def records_file(tmp_path):
    path = tmp_path / "recs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(12)))
    return path


def _recompute(model_dir, input_ids, loss_mask, layers):
    """Independent: one unpadded sequence, float64 log-softmax, no batching."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor(input_ids, dtype=torch.long)[None], output_hidden_states=True)
    pos = np.nonzero(np.asarray(loss_mask)[1:])[0]            # position t predicts token t+1
    logp = torch.log_softmax(out.logits[0, pos].double(), -1)
    hidden = {layer: out.hidden_states[layer][0, pos].double() for layer in layers}
    return logp, hidden


def test_cached_values_match_recomputation(tiny_qwen_dir, records_file, tmp_path):
    out = tmp_path / "cache"
    summary = cache_teacher(str(tiny_qwen_dir), str(records_file), str(out), k=K, layers="1,-1", batch_size=5, progress=False)
    from fastkd.cache_tools import CacheReader

    reader = CacheReader(out)
    assert len(reader) == 12 and summary.sequences_written == 12
    assert reader.manifest["layers"] == [1, 2] and reader.manifest["k"] == K
    seen = set()
    for seq in reader:
        seen.add(seq.record_index)
        n = int(seq.loss_mask.sum())
        assert seq.topk_ids.shape == (n, K) and seq.tail.shape == (n,)      # prompt positions absent
        logp, hidden = _recompute(tiny_qwen_dir, seq.input_ids, seq.loss_mask, [1, 2])
        ref_vals, ref_ids = logp.topk(K, dim=-1)
        assert np.array_equal(np.sort(seq.topk_ids, 1), np.sort(ref_ids.numpy(), 1))
        exact = np.take_along_axis(logp.numpy(), seq.topk_ids, 1)
        ref_tail = 1.0 - ref_vals.exp().sum(-1).numpy()
        np.testing.assert_allclose(seq.tail, ref_tail, rtol=1e-5, atol=1e-6)          # tail stored exactly
        # the default codec quantises log-probs: compare distributions over K + tail
        p = np.concatenate([np.exp(exact), ref_tail[:, None]], 1)
        q = np.concatenate([np.exp(seq.topk_logprobs.astype(np.float64)), seq.tail[:, None].astype(np.float64)], 1)
        assert np.abs(q.sum(1) - 1).max() < 1e-5
        kl = (p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300)))).sum(1)
        assert kl.mean() < 1e-3 and kl.max() < 5e-3
        for layer in (1, 2):                                                         # int8, one scale per 128 values
            ref = hidden[layer].numpy()
            assert np.abs(seq.hidden[layer] - ref).max() <= np.abs(ref).max() / 127 + 1e-6
    assert seen == set(range(12))


def test_sampled_mode_counts(tiny_qwen_dir, records_file, tmp_path):
    out = tmp_path / "cache"
    cache_teacher(str(tiny_qwen_dir), str(records_file), str(out), sample_n=20, batch_size=4, progress=False)
    from fastkd.cache_tools import CacheReader

    reader = CacheReader(out)
    assert reader.manifest["mode"] == "sample"
    for seq in reader:
        assert (seq.counts.sum(1) == 20).all()
        valid = seq.topk_ids >= 0
        assert ((seq.counts > 0) == valid).all()
        for row in seq.topk_ids:                                   # unique ids per row
            ids = row[row >= 0]
            assert len(ids) == len(set(ids.tolist()))


def test_no_cot_cache_masks_only_target(tiny_qwen_dir, tiny_tokenizer, records_file, tmp_path):
    out = tmp_path / "cache"
    cache_teacher(str(tiny_qwen_dir), str(records_file), str(out), k=4, cot=False, progress=False)
    from fastkd.cache_tools import CacheReader

    recs = _records(12)
    for seq in CacheReader(out):
        response = [t for t, m in zip(seq.input_ids, seq.loss_mask) if m]
        expected = tiny_tokenizer(" " + recs[seq.record_index]["target"], add_special_tokens=False)["input_ids"]
        assert response == expected + [tiny_tokenizer.eos_token_id]


def test_resume_with_other_settings_refused(tiny_qwen_dir, records_file, tmp_path):
    out = tmp_path / "cache"
    cache_teacher(str(tiny_qwen_dir), str(records_file), str(out), k=4, progress=False)
    with pytest.raises(UserError, match="k"):
        cache_teacher(str(tiny_qwen_dir), str(records_file), str(out), k=8, progress=False)
    again = cache_teacher(str(tiny_qwen_dir), str(records_file), str(out), k=4, progress=False)
    assert again.sequences_written == 0 and again.sequences_resumed == 12


def test_bad_inputs_clear_errors(tiny_qwen_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"source": "a", "rationale": "b", "target": "c"}) + "\n" + json.dumps({"source": "a"}) + "\n")
    rc = cli_main(["cache-teacher", "--teacher", str(tiny_qwen_dir), "--data", str(bad), "--out", str(tmp_path / "c"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "record 1" in err and "'target'" in err and "Traceback" not in err
    rc = cli_main(["cache-teacher", "--teacher", str(tmp_path / "nope"), "--data", str(bad), "--out", str(tmp_path / "c")])
    assert rc == 2 and "no such folder" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"source": "a", "rationale": "b", "target": "c"}) + "\n")
    rc = cli_main(["cache-teacher", "--teacher", str(tiny_qwen_dir), "--data", str(good), "--out", str(tmp_path / "c"), "--layers", "7"])
    assert rc == 2 and "out of range" in capsys.readouterr().err


def _contents(path):
    from fastkd.cache_tools import CacheReader

    return {s.record_index: (s.input_ids.tolist(), s.topk_ids.tolist(), s.topk_logprobs.tolist(), s.tail.tolist())
            for s in CacheReader(path)}


@pytest.mark.parametrize("extra", [[], ["--capture-share", "0.3", "--capture-by", "random", "--logits-codec", "kt2"]],
                         ids=["full", "selective-capture"])
def test_sigkill_then_resume_equals_uninterrupted(tiny_qwen_dir, tmp_path, extra):
    recs = tmp_path / "recs.jsonl"
    recs.write_text("".join(json.dumps(r) + "\n" for r in _records(60, seed=3)))
    args = ["--teacher", str(tiny_qwen_dir), "--data", str(recs), "--top-k", "8", "--batch-size", "2",
            "--sequences-per-shard", "4", "--quiet", *extra]
    full = tmp_path / "full"
    assert cli_main(["cache-teacher", *args, "--out", str(full)]) == 0
    part = tmp_path / "part"
    env = dict(os.environ, FASTKD_SLOW_WRITE_SECONDS="0.05")
    proc = subprocess.Popen([sys.executable, "-m", "fastkd", "cache-teacher", *args, "--out", str(part)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        shards = list((part / "shards").glob("*.safetensors")) if (part / "shards").exists() else []
        if len(shards) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from fastkd.cache_tools import CacheReader

    done_before = len(CacheReader(part)) if (part / "manifest.json").exists() else 0
    assert 0 < done_before < 60, "the kill should land part-way"
    assert cli_main(["cache-teacher", *args, "--out", str(part)]) == 0
    a, b = _contents(full), _contents(part)
    assert sorted(a) == sorted(b) == list(range(60))
    assert len(CacheReader(part)) == 60                          # nothing duplicated
    for key in a:
        assert a[key][0] == b[key][0] and a[key][1] == b[key][1]
        np.testing.assert_array_equal(a[key][2], b[key][2])
        np.testing.assert_allclose(a[key][3], b[key][3], atol=1e-6)
    empty_rows = sum(row[0] == -1 for v in b.values() for row in v[1])
    assert (empty_rows > 0) == bool(extra)                       # the captured run really left rows empty


def test_hidden_projection_is_the_stored_fixed_matrix(tiny_qwen_dir, records_file, tmp_path):
    from fastkd.cache_tools import CacheReader
    from fastkd.cache_tools.hidden_codec import random_projection

    out = tmp_path / "cache"
    cache_teacher(str(tiny_qwen_dir), str(records_file), str(out), k=4, layers="-1", hidden_project=16, seed=5, progress=False)
    reader = CacheReader(out)
    spec = reader.manifest["hidden_projection"]
    assert spec["d_in"] == 64 and spec["d_out"] == 16 and reader.manifest["hidden_widths"] == [16]
    matrix = random_projection(spec["d_in"], spec["d_out"], spec["seed"])
    seq = reader[0]
    _, hidden = _recompute(tiny_qwen_dir, seq.input_ids, seq.loss_mask, [2])
    ref = hidden[2].numpy() @ matrix
    assert seq.hidden[2].shape == ref.shape
    assert np.abs(seq.hidden[2] - ref).max() <= np.abs(ref).max() / 127 + 1e-5
    with pytest.raises(UserError, match="needs --layers"):
        cache_teacher(str(tiny_qwen_dir), str(records_file), str(tmp_path / "c2"), k=4, hidden_project=16, progress=False)


def test_a_cache_begun_before_the_full_tokenizer_identity_resumes(tiny_qwen_dir, tmp_path):
    """A partial cache whose manifest holds the old five-key tokenizer identity: the new fastkd
    finishes it (comparing what the old identity holds) instead of refusing it."""
    from fastkd.cache_tools import CacheReader
    from fastkd.integrity import seal

    recs = tmp_path / "recs.jsonl"
    recs.write_text("".join(json.dumps(r) + "\n" for r in _records(20, seed=4)))
    out = tmp_path / "cache"
    cache_teacher(str(tiny_qwen_dir), str(recs), str(out), k=4, sequences_per_shard=4, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    old_keys = ("vocab_size", "vocab_sha256", "eos_token_id", "pad_token_id", "class")
    manifest["tokenizer"] = {key: manifest["tokenizer"][key] for key in old_keys}
    manifest["shards"] = manifest["shards"][:2]            # as if killed after two shards
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(seal(manifest)))
    summary = cache_teacher(str(tiny_qwen_dir), str(recs), str(out), k=4, sequences_per_shard=4, progress=False)
    assert summary.sequences_resumed == 8 and summary.sequences_written == 12
    reader = CacheReader(out)
    assert sorted(reader.record_indices.tolist()) == list(range(20))
    assert set(reader.manifest["tokenizer"]) == set(old_keys)


def test_a_resume_keeps_the_cache_codec_when_none_is_asked(tiny_qwen_dir, records_file, tmp_path, monkeypatch):
    """A cache begun with one default codec resumes after the default changed (a fastkd upgrade mid-cache):
    the codec not asked for is the cache's own; asking for another one is still refused."""
    import fastkd.cache_tools.codecs as codecs
    import fastkd.cache_tools.writer as writer
    from fastkd.cache_tools import CacheError, CacheReader

    out = tmp_path / "cache"
    cache_teacher(str(tiny_qwen_dir), str(records_file), str(out), k=4, progress=False, logits_codec="raw-zstd")
    before = [s.topk_ids.copy() for s in CacheReader(out)]
    monkeypatch.setattr(writer, "DEFAULT_TOPK_CODEC", "kt-zstd")
    monkeypatch.setattr(codecs, "DEFAULT_TOPK_CODEC", "kt-zstd", raising=False)
    cache_teacher(str(tiny_qwen_dir), str(records_file), str(out), k=4, progress=False)  # no codec asked: resumes
    assert read_manifest_codec(out) == "raw-zstd"
    assert all((a == s.topk_ids).all() for a, s in zip(before, CacheReader(out)))
    with pytest.raises(CacheError, match="codecs.topk"):
        cache_teacher(str(tiny_qwen_dir), str(records_file), str(out), k=4, progress=False, logits_codec="kt-zstd")


def read_manifest_codec(root):
    import json

    return json.loads((root / "manifest.json").read_text())["codecs"]["topk"]["name"]
