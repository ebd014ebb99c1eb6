"""Selective capture (`cache-teacher --capture-share`): which rows keep the teacher, what the
others hold, and what the loss makes of them, against brute-force references."""

import json
import math

import numpy as np
import pytest
import torch

from fastkd.cache_stage import cache_teacher
from fastkd.cache_tools import CacheReader
from fastkd.errors import UserError, user_errors
from fastkd.kernels import LossSpec, Teacher, distill_loss, fused_linear_distill_loss, reference_loss

K = 8


@pytest.fixture
def records(tmp_path):
    rng = np.random.default_rng(3)
    words = ["True", "False", "and", "or", "not", "(", ")", "step", "Take", "Yes", "No"]
    rows = [{"source": " ".join(rng.choice(words, size=rng.integers(2, 10))),
             "rationale": " ".join(rng.choice(words, size=rng.integers(0, 25))),
             "target": str(rng.choice(["True", "False"]))} for _ in range(10)]
    path = tmp_path / "recs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _by_record(path):
    return {s.record_index: s for s in CacheReader(path)}


def _entropy64(logprobs, tail):
    """Brute force, float64: entropy of the top-k + tail-bucket distribution, one row at a time."""
    out = []
    for lp, t in zip(logprobs.astype(np.float64), tail.astype(np.float64)):
        probs = [math.exp(v) for v in lp] + [t]
        out.append(-sum(p * math.log(p) for p in probs if p > 0))
    return np.array(out)


def test_entropy_capture_keeps_the_highest_entropy_rows_and_empties_the_rest(tiny_qwen_dir, records, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    cache_teacher(dict(teacher=str(tiny_qwen_dir), data=str(records), out=str(full), top_k=K, batch_size=4,
                       progress=False, logits_codec="kt:precision=exact"))
    cache_teacher(dict(teacher=str(tiny_qwen_dir), data=str(records), out=str(part), top_k=K, batch_size=3,
                       progress=False, logits_codec="kt:precision=exact", capture_share=0.25))
    assert CacheReader(part).manifest["capture"] == {"share": 0.25, "by": "entropy", "seed": None}
    assert "capture" not in CacheReader(full).manifest
    a, b = _by_record(full), _by_record(part)
    assert a.keys() == b.keys()
    for r, seq in a.items():
        got = b[r]
        n = len(seq.tail)
        assert np.array_equal(got.input_ids, seq.input_ids) and np.array_equal(got.loss_mask, seq.loss_mask)
        kept = (got.topk_ids >= 0).any(axis=1)
        assert kept.sum() == math.ceil(0.25 * n)
        ent = _entropy64(seq.topk_logprobs, seq.tail)
        # every kept row has at least the entropy of every dropped row (ties may go either way)
        if kept.any() and (~kept).any():
            assert ent[kept].min() >= ent[~kept].max() - 1e-6
        assert np.array_equal(got.topk_ids[kept], seq.topk_ids[kept])            # kept rows: the full cache's
        assert np.array_equal(got.topk_logprobs[kept], seq.topk_logprobs[kept])
        assert np.array_equal(got.tail[kept], seq.tail[kept])
        assert (got.topk_ids[~kept] == -1).all() and np.isneginf(got.topk_logprobs[~kept]).all()
        assert (got.tail[~kept] == 1.0).all()


def test_random_capture_is_the_same_for_any_batching_and_depends_on_the_seed(tiny_qwen_dir, records, tmp_path):
    def kept(out, batch, seed):
        cache_teacher(dict(teacher=str(tiny_qwen_dir), data=str(records), out=str(out), top_k=K, batch_size=batch,
                           progress=False, capture_share=0.5, capture_by="random", seed=seed, sequences_per_shard=3))
        return {r: (s.topk_ids >= 0).any(axis=1) for r, s in _by_record(out).items()}

    one, two, other = kept(tmp_path / "a", 2, 7), kept(tmp_path / "b", 5, 7), kept(tmp_path / "c", 5, 8)
    assert all(np.array_equal(one[r], two[r]) for r in one)
    assert all(m.sum() == math.ceil(0.5 * len(m)) for m in one.values())
    assert any(not np.array_equal(one[r], other[r]) for r in one)


def test_a_resume_with_another_share_is_refused_and_bad_values_are_clear(tiny_qwen_dir, records, tmp_path):
    out = tmp_path / "c"
    cache_teacher(dict(teacher=str(tiny_qwen_dir), data=str(records), out=str(out), top_k=K, progress=False,
                       capture_share=0.5))
    with pytest.raises(user_errors(), match="capture"):     # the cache's own CacheError: printed as one line
        cache_teacher(dict(teacher=str(tiny_qwen_dir), data=str(records), out=str(out), top_k=K, progress=False,
                           capture_share=0.2))
    for kwargs, message in ((dict(capture_share=0.0), "capture-share"), (dict(capture_share=1.5), "capture-share"),
                            (dict(capture_share=0.5, capture_by="loss"), "capture-by"),
                            (dict(capture_share=0.5, sample=4), "top-k caches only")):
        with pytest.raises(UserError, match=message):
            cache_teacher(dict(teacher=str(tiny_qwen_dir), data=str(records), out=str(tmp_path / "bad"), top_k=K,
                               progress=False, **kwargs))
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def _random_batch(n=12, v=40, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1] = -100                                               # a padding row
    teacher = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 3, -1)
    lp, ids = teacher.topk(k, dim=-1)
    tail = 1 - lp.exp().sum(-1)
    keep = torch.rand(n, generator=g) < 0.4
    keep[0], keep[2] = True, False
    ids = ids.masked_fill(~keep[:, None], -1)
    lp = lp.masked_fill(~keep[:, None], float("-inf"))
    tail = tail.masked_fill(~keep, 1.0)
    return logits, labels, ids, lp, tail, keep


def _brute_force(logits, labels, ids, lp, tail, keep, kl_weight):
    """CE on every counted row, KL(teacher || student) over K u {tail} on the kept rows only, mean over counted rows."""
    total, rows = 0.0, 0
    for r in range(len(labels)):
        if labels[r] == -100:
            continue
        rows += 1
        logq = torch.log_softmax(logits[r], -1)
        total += float(-logq[labels[r]])
        if keep[r]:
            p = torch.cat([lp[r].exp(), tail[r:r + 1]])
            q_k = logq[ids[r]].exp()
            q = torch.cat([q_k, (1 - q_k.sum()).clamp_min(1e-300)[None]])
            total += kl_weight * float((p * (p.clamp_min(1e-300).log() - q.log())).sum())
    return total / rows


@pytest.mark.parametrize("impl", ["reference", "chunked", "fused_linear"])
def test_empty_rows_train_on_ce_alone_in_every_loss_path(impl):
    logits, labels, ids, lp, tail, keep = _random_batch()
    spec, teacher = LossSpec(mode="tail", ce_weight=1.0, kl_weight=0.7), Teacher(ids, lp.float(), tail.float())
    if impl == "fused_linear":
        g = torch.Generator().manual_seed(1)
        hidden = torch.randn(len(labels), 16, generator=g, dtype=torch.float64, requires_grad=True)
        weight = torch.randn(logits.shape[1], 16, generator=g, dtype=torch.float64)
        terms = fused_linear_distill_loss(hidden, weight, labels, teacher, spec)
        expected = _brute_force((hidden @ weight.T).detach(), labels, ids, lp, tail, keep, 0.7)
        z = hidden
    else:
        z = logits.clone().float().requires_grad_(True)
        expected = _brute_force(z.detach().double(), labels, ids, lp, tail, keep, 0.7)
        fn = reference_loss if impl == "reference" else distill_loss   # distill_loss: the chunked path on CPU
        terms = fn(z, labels, teacher, spec)
    assert abs(float(terms.total.detach()) - expected) < 1e-5 * max(1.0, abs(expected))
    terms.total.backward()
    if impl != "fused_linear":   # the gradient of an empty row is the CE gradient alone (softmax - onehot) / rows
        rows = int((labels != -100).sum())
        for r in torch.nonzero(~keep).flatten().tolist():
            if labels[r] == -100:
                assert torch.all(z.grad[r] == 0)
                continue
            ce = torch.softmax(z.detach()[r].double(), -1)
            ce[labels[r]] -= 1
            torch.testing.assert_close(z.grad[r].double(), ce / rows, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------- the format: a bit per row, only kept rows coded

def _captured_sequences(settings, seed, share):
    from helpers import random_sequences

    rng = np.random.default_rng(seed)
    seqs = random_sequences(seed, 24, settings)
    for j, s in enumerate(seqs):
        n = len(s.tail)
        drop = rng.random(n) >= share
        if j % 5 == 0:
            drop[:] = True                   # sequences with no kept row at all
        s.topk_ids[drop] = -1
        s.topk_logprobs[drop] = -np.inf
        s.tail[drop] = 1.0
    return seqs


@pytest.mark.parametrize("precision,share", [("exact", 0.3), ("fine", 0.3), ("small", 0.3), ("fine", 0.0)])
def test_captured_cache_round_trip_and_rows_tensor(tmp_path, precision, share):
    from fastkd.cache_tools import FORMAT_VERSION, CacheWriter
    from helpers import synthetic_settings
    from safetensors import safe_open

    settings = synthetic_settings(vocab_size=300, k=8, layers=(1,), widths=(16,),
                                  codecs={"topk": {"name": "kt", "params": {"precision": precision}},
                                          "hidden": "kh:method=bf16"},
                                  capture={"share": 0.3, "by": "entropy", "seed": None})
    seqs = _captured_sequences(settings, 5, share)   # share 0: every row of every block empty
    root = tmp_path / "c"
    with CacheWriter(root, settings, sequences_per_shard=10) as w:
        for s in seqs:
            w.add(s)
    reader = CacheReader(root)
    assert reader.manifest["format_version"] == FORMAT_VERSION
    assert reader.manifest["counts"]["payload_bytes"]["rows"] > 0
    by = _by_record(root)
    for s in seqs:
        got = by[s.record_index]
        kept = ~(s.topk_ids == -1).all(axis=1)
        assert np.array_equal(got.topk_ids == -1, s.topk_ids == -1)      # empty rows come back empty, others whole
        assert (got.tail[~kept] == 1.0).all() and np.isneginf(got.topk_logprobs[~kept]).all()
        assert np.array_equal(np.sort(got.topk_ids[kept], 1), np.sort(s.topk_ids[kept], 1))
        np.testing.assert_allclose(got.tail[kept], s.tail[kept], rtol=1e-6, atol=0)
        assert got.hidden[1].shape == s.hidden[1].shape                  # hidden states at every row
    with safe_open(str(root / "shards" / "shard-00000.safetensors"), "np") as f:
        names = list(f.keys())
        assert f.metadata()["captured"] == "1" and f.metadata()["format_version"] == str(FORMAT_VERSION)
    assert {n for n in names if n.endswith(".rows")} == {n.replace(".tokens", ".rows") for n in names if n.endswith(".tokens")}


def test_empty_rows_are_refused_without_capture_and_a_flipped_row_bit_is_caught(tmp_path):
    from fastkd.cache_tools import CacheError, CacheWriter
    from helpers import synthetic_settings

    plain = synthetic_settings(vocab_size=300, k=8, layers=(), widths=())
    seqs = _captured_sequences(plain, 6, 0.5)
    with pytest.raises(CacheError, match="topk_logprobs"):
        with CacheWriter(tmp_path / "plain", plain) as w:
            for s in seqs:
                w.add(s)
    captured = dict(plain, capture={"share": 0.5, "by": "random", "seed": 0})
    root = tmp_path / "c"
    with CacheWriter(root, captured) as w:
        for s in seqs:
            w.add(s)
    shard = root / "shards" / "shard-00000.safetensors"
    from helpers import tensor_ranges

    a, b = tensor_ranges(shard)["block.00000.rows"]
    data = bytearray(shard.read_bytes())
    data[(a + b) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="block 0"):
        list(CacheReader(root))


def test_fastkd_train_on_a_captured_cache_says_so_and_its_kl_counts_only_kept_rows(tiny_qwen_dir, tiny_llama_dir,
                                                                                 records, tmp_path, capsys):
    from fastkd.cli import main

    cache = tmp_path / "cache"
    cache_teacher(dict(teacher=str(tiny_qwen_dir), data=str(records), out=str(cache), top_k=K, progress=False,
                       capture_share=0.2))
    rc = main(["train", "--cache", str(cache), "--student", str(tiny_llama_dir), "--out", str(tmp_path / "run"),
               "--max-steps", "2", "--batch-size", "4", "--eval-cache", str(cache)])
    err = capsys.readouterr().err
    assert rc == 0 and "teacher at 20% of loss positions (by entropy)" in err
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = lines[0]
    assert first["eval_kl"] > 0 and first["eval_kl"] < first["eval_ce"]   # KL summed over 20% of rows, mean over all
