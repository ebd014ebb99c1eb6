"""`fastkd cache-teacher`: cached values against an independent recomputation, resume, refusal."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fastkd.cache_tools import CacheError
from fastkd.cli import main as cli_main
from fastkd.errors import UserError
from helpers import random_records, run_cache, slow_cli

K = 16


@pytest.fixture
def records_file(tmp_path):
    path = tmp_path / "recs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in random_records(12)))
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
    summary = run_cache(tiny_qwen_dir, records_file, out, top_k=K, layers="1,-1", batch_size=5)
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
    run_cache(tiny_qwen_dir, records_file, out, sample=20, batch_size=4)
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
    run_cache(tiny_qwen_dir, records_file, out, top_k=4, cot=False)
    from fastkd.cache_tools import CacheReader

    recs = random_records(12)
    for seq in CacheReader(out):
        response = [t for t, m in zip(seq.input_ids, seq.loss_mask) if m]
        expected = tiny_tokenizer(" " + recs[seq.record_index]["target"], add_special_tokens=False)["input_ids"]
        assert response == expected + [tiny_tokenizer.eos_token_id]


def test_resume_with_other_settings_refused(tiny_qwen_dir, records_file, tmp_path):
    out = tmp_path / "cache"
    run_cache(tiny_qwen_dir, records_file, out, top_k=4)
    with pytest.raises(CacheError, match="k"):
        run_cache(tiny_qwen_dir, records_file, out, top_k=8)
    again = run_cache(tiny_qwen_dir, records_file, out, top_k=4)
    assert again.sequences_written == 0 and again.sequences_resumed == 12


def test_bad_inputs_clear_errors(tiny_qwen_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"source": "a", "rationale": "b", "target": "c"}) + "\n" + '{"source": "a"}\n')
    out = ["--out", str(tmp_path / "c")]
    rc = cli_main(["cache-teacher", "--teacher", str(tiny_qwen_dir), "--data", str(bad), *out, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "record 1" in err and "'target'" in err and "Traceback" not in err
    rc = cli_main(["cache-teacher", "--teacher", str(tmp_path / "nope"), "--data", str(bad), *out])
    assert rc == 2 and "no such folder" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"source": "a", "rationale": "b", "target": "c"}) + "\n")
    rc = cli_main(["cache-teacher", "--teacher", str(tiny_qwen_dir), "--data", str(good), *out, "--layers", "7"])
    assert rc == 2 and "out of range" in capsys.readouterr().err


def test_an_out_that_is_a_file_or_another_kind_of_folder_is_refused_first(tmp_path, records_file, capsys):
    """Before the teacher is looked for: --out a file says so; a training run's or an evaluation's folder is left as
    it was (its config.yaml included); a folder of the user's own files is still a fine new cache folder."""
    (tmp_path / "afile").write_text("data")
    run, evaluation = tmp_path / "run", tmp_path / "eval"
    for folder, marker in ((run, "metrics.jsonl"), (evaluation, "items.jsonl")):
        folder.mkdir()
        (folder / marker).write_text("")
        (folder / "config.yaml").write_text("mine")
    said = {"afile": "--out {} is a file; give a folder for the teacher cache",
            "run": "--out {} holds a training run (metrics.jsonl), not a teacher cache",
            "eval": "--out {} holds a BBH evaluation (items.jsonl), not a teacher cache"}
    for name, message in said.items():
        out = tmp_path / name
        rc = cli_main(["cache-teacher", "--teacher", str(tmp_path / "no-model"), "--data", str(records_file),
                       "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"fastkd cache-teacher: error: {message.format(out)}") and \
            err.count("\n") == 1, err
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.jsonl"]
    assert (run / "config.yaml").read_text() == (evaluation / "config.yaml").read_text() == "mine"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    rc = cli_main(["cache-teacher", "--teacher", str(tmp_path / "no-model"), "--data", str(records_file),
                   "--out", str(mine), "--no-progress"])
    assert rc == 2 and "no-model" in capsys.readouterr().err   # got as far as the teacher


def test_config_file_flags_and_the_saved_config(tiny_qwen_dir, records_file, tmp_path, capsys):
    """--config YAML < flags; the cache keeps the resolved config as config.yaml, which --config reads back."""
    import yaml

    from fastkd.cache_stage import CacheConfig
    from fastkd.cache_tools import CacheReader

    out, run_file = tmp_path / "cache", tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump({"teacher": str(tiny_qwen_dir), "data": str(records_file), "top-k": 4,
                                        "batch_size": 3, "cot": False, "progress": False}))
    assert cli_main(["cache-teacher", "--config", str(run_file), "--out", str(out), "--top-k", "5"]) == 0
    expected = CacheConfig.make(overrides=dict(teacher=str(tiny_qwen_dir), data=str(records_file), out=str(out),
                                               top_k=5, batch_size=3, cot=False, progress=False))
    assert yaml.safe_load((out / "config.yaml").read_text()) == expected.as_dict()
    manifest = CacheReader(out).manifest
    assert manifest["k"] == 5 and manifest["template"]["cot"] is False
    capsys.readouterr()
    assert cli_main(["cache-teacher", "--config", str(out / "config.yaml")]) == 0      # the saved config resumes
    assert "this run: 0 sequences, 0 loss positions written; 12 already cached" in capsys.readouterr().out
    assert cli_main(["cache-teacher", "--data", str(records_file), "--out", str(tmp_path / "c")]) == 2
    assert "give --teacher" in capsys.readouterr().err and not (tmp_path / "c").exists()
    assert cli_main(["cache-teacher", "--teacher", str(tiny_qwen_dir), "--data", str(records_file), "--out", ""]) == 2
    assert "give --out" in capsys.readouterr().err    # an empty --out ("$UNSET") is not the current folder
    for codec, said in (("kt:layout=value", "unknown parameter(s) layout"), ("kt:precision=tiny", "precision 'tiny'"),
                        ("zz", "unknown logits codec 'zz'")):   # refused before any model is looked for
        assert cli_main(["cache-teacher", "--teacher", str(tmp_path / "no-model"), "--data", str(records_file),
                         "--out", str(tmp_path / "d"), "--logits-codec", codec]) == 2
        err = capsys.readouterr().err
        assert f"--logits-codec {codec!r}" in err and said in err and not (tmp_path / "d").exists(), err


def _contents(path):
    from fastkd.cache_tools import CacheReader

    return {s.record_index: (s.input_ids.tolist(), s.topk_ids.tolist(), s.topk_logprobs.tolist(), s.tail.tolist())
            for s in CacheReader(path)}


@pytest.mark.parametrize("extra", [[], ["--capture-share", "0.3", "--capture-by", "random",
                                        "--logits-codec", "kt:precision=small"]], ids=["full", "selective-capture"])
def test_sigkill_then_resume_equals_uninterrupted(tiny_qwen_dir, tmp_path, extra):
    recs = tmp_path / "recs.jsonl"
    recs.write_text("".join(json.dumps(r) + "\n" for r in random_records(60, seed=3)))
    args = ["--teacher", str(tiny_qwen_dir), "--data", str(recs), "--top-k", "8", "--batch-size", "2",
            "--sequences-per-shard", "4", "--no-progress", *extra]
    full = tmp_path / "full"
    assert cli_main(["cache-teacher", *args, "--out", str(full)]) == 0
    part = tmp_path / "part"
    proc = subprocess.Popen([*slow_cli(0.05), "cache-teacher", *args, "--out", str(part)])
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
    run_cache(tiny_qwen_dir, records_file, out, top_k=4, layers="-1", hidden_project=16, seed=5)
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
        run_cache(tiny_qwen_dir, records_file, tmp_path / "c2", top_k=4, hidden_project=16)


def test_a_resume_keeps_the_cache_codec_when_none_is_asked(tiny_qwen_dir, records_file, tmp_path, monkeypatch):
    """A cache begun with one default codec resumes after the default changed (a fastkd upgrade mid-cache):
    the codec not asked for is the cache's own; asking for another one is still refused."""
    import fastkd.cache_tools.codecs as codecs
    from fastkd.cache_tools import CacheReader

    out, exact, small = tmp_path / "cache", {"precision": "exact"}, {"precision": "small"}
    run_cache(tiny_qwen_dir, records_file, out, top_k=4, logits_codec="kt:precision=exact")
    before = [s.topk_ids.copy() for s in CacheReader(out)]
    default = codecs.default_codec
    monkeypatch.setattr(codecs, "default_codec", lambda part, mode="topk": (
        {"name": "kt", "params": small} if part == "topk" else default(part, mode)))
    run_cache(tiny_qwen_dir, records_file, tmp_path / "new", top_k=4)           # the new default is in effect
    assert read_manifest_codec(tmp_path / "new") == {"name": "kt", "params": small}
    run_cache(tiny_qwen_dir, records_file, out, top_k=4)  # no codec asked: resumes
    assert read_manifest_codec(out) == {"name": "kt", "params": exact}
    assert all((a == s.topk_ids).all() for a, s in zip(before, CacheReader(out)))
    with pytest.raises(CacheError, match="codecs.topk"):
        run_cache(tiny_qwen_dir, records_file, out, top_k=4, logits_codec="kt:precision=small")


def test_a_rerun_clears_a_dead_runs_tokenizer_staging_and_a_nameless_os_error_names_the_cache(
        tiny_qwen_dir, records_file, tmp_path, monkeypatch, capsys):
    """A full disk met by a write or a close (an OSError without a file name) names the cache folder; a run stopped
    while saving the teacher tokenizer leaves .teacher_tokenizer.<pid>.tmp/, which the next run removes once its
    process is gone (a live one's is left alone)."""
    from fastkd.cache_stage import CacheConfig

    out = tmp_path / "cache"
    no_space = OSError(28, "No space left on device")
    monkeypatch.setattr(CacheConfig, "save", lambda self, path: (_ for _ in ()).throw(no_space))
    rc = cli_main(["cache-teacher", "--teacher", str(tiny_qwen_dir), "--data", str(records_file), "--out", str(out),
                   "--top-k", "4", "--no-progress"])
    assert rc == 2 and f"error: No space left on device ({out}). What was finished" in capsys.readouterr().err
    monkeypatch.undo()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        for pid in (int(gone.stdout), running.pid):
            (out / f".teacher_tokenizer.{pid}.tmp").mkdir()
            (out / f".teacher_tokenizer.{pid}.tmp" / "tokenizer.json").write_text("{")
        assert run_cache(tiny_qwen_dir, records_file, out, top_k=4).sequences_written == 12
        assert [p.name for p in out.glob(".teacher_tokenizer.*")] == [f".teacher_tokenizer.{running.pid}.tmp"]
    finally:
        running.kill()
        running.wait()


def read_manifest_codec(root):
    return json.loads((root / "manifest.json").read_text())["codecs"]["topk"]
