"""Cache codecs: top-k (+ exact tail), sampled ids, hidden states; checked against float64
references on fresh random and adversarial inputs."""

import numpy as np
import pytest
import torch

from fastkd.cache_tools.hidden_codec import decode_hidden, encode_hidden, random_projection
from fastkd.cache_tools.codecs import normalize_codec
from fastkd.cache_tools.errors import CodecError
from fastkd.cache_tools.topk2_codec import topk_section_sizes
from fastkd.cache_tools.topk_codec import DEFAULT_TOPK_PARAMS, decode_sampled, decode_topk, encode_sampled, encode_topk
from fastkd.errors import user_errors
from helpers import hidden_error_bound, topk_error_bound

STEPS = [{}, dict(step=0.1, max_step=0.1), dict(step=0.05, max_step=4.0)]


def exact_topk(logits: np.ndarray, k: int):
    """float64 reference: top-k ids, log-probs and tail of softmax(logits)."""
    z = torch.from_numpy(logits).double()
    logp = torch.log_softmax(z, dim=1)
    top, ids = torch.topk(logp, k, dim=1)
    tail = (1.0 - top.exp().sum(1)).clamp(0, 1)
    return ids.numpy(), top.numpy(), tail.numpy()


def random_teacher(rng, n, vocab, k, spread=(0.2, 8.0)):
    """Logits with sharpness spread so entropies run from ~0 to several nats."""
    logits = rng.standard_normal((n, vocab)) * np.exp(rng.uniform(*np.log(spread), size=(n, 1)))
    return exact_topk(logits, k)


def kl_over_k_and_tail(ids_a, logp_a, tail_a, ids_b, logp_b, tail_b):
    """KL(a || b) per row over K u {tail}, float64, rows aligned by id; a zero-mass entry adds 0."""
    oa, ob = np.argsort(ids_a, axis=1), np.argsort(ids_b, axis=1)
    assert np.array_equal(np.take_along_axis(ids_a, oa, 1), np.take_along_axis(ids_b, ob, 1))
    qa = np.exp(np.take_along_axis(logp_a, oa, 1).astype(np.float64))
    qb = np.exp(np.take_along_axis(logp_b, ob, 1).astype(np.float64))
    ta, tb = np.asarray(tail_a, np.float64), np.asarray(tail_b, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(qa > 0, qa * np.log(qa / qb), 0.0).sum(1)
        terms += np.where(ta > 0, ta * np.log(ta / tb), 0.0)
    return terms


def roundtrip(ids, logp, tail, vocab, **params):
    n, k = ids.shape
    payload = encode_topk(ids, logp.astype(np.float32), tail.astype(np.float32), vocab, **params)
    out = decode_topk(payload, n, k, vocab, **params)
    assert out[0].dtype == np.int64 and out[1].dtype == np.float32 and out[2].dtype == np.float32
    assert out[0].shape == (n, k) and out[1].shape == (n, k) and out[2].shape == (n,)
    return payload, out


def assert_valid_distribution(logp, tail):
    mass = np.exp(logp.astype(np.float64))
    assert not np.isnan(logp).any()
    assert (mass >= 0).all()
    assert (mass.sum(1) + tail.astype(np.float64) <= 1 + 1e-6).all()


@pytest.mark.parametrize("params", STEPS)
def test_topk_roundtrip_random_matches_float64_reference(params):
    rng = np.random.default_rng(1)
    vocab, k = 3000, 48
    ids, logp, tail = random_teacher(rng, 400, vocab, k)
    perm = rng.permuted(np.tile(np.arange(k), (len(ids), 1)), axis=1)   # any input order
    ids, logp = np.take_along_axis(ids, perm, 1), np.take_along_axis(logp, perm, 1)
    _, (ids2, logp2, tail2) = roundtrip(ids, logp, tail, vocab, **params)
    # tail: bit-exact fp32; the id set per row: exact
    assert np.array_equal(tail2.view(np.uint32), tail.astype(np.float32).view(np.uint32))
    assert np.array_equal(np.sort(ids2, 1), np.sort(ids, 1))
    assert_valid_distribution(logp2, tail2)
    # decoded top-k mass is exactly 1 - tail (renormalised), to float32 rounding
    assert np.allclose(np.exp(logp2.astype(np.float64)).sum(1), 1 - tail2.astype(np.float64), rtol=2e-6, atol=1e-9)
    # per-entry error relative to the row's top-1 stays within the codec's stated bound
    bound_params = {key: params.get(key, DEFAULT_TOPK_PARAMS[key]) for key in ("step", "max_step", "growth")}
    o1, o2 = np.argsort(ids, 1), np.argsort(ids2, 1)
    a, b = np.take_along_axis(logp, o1, 1), np.take_along_axis(logp2, o2, 1).astype(np.float64)
    top = a.argmax(1)
    rows = np.arange(len(a))
    bound = topk_error_bound(a.max(1, keepdims=True) - a, **bound_params)
    err = np.abs((b - b[rows, top][:, None]) - (a - a[rows, top][:, None]))
    assert (err <= bound + bound[rows, top][:, None] + 1e-5).all()
    # KL(decoded || exact) over K u {tail}, measured in float64
    kl = kl_over_k_and_tail(ids2, logp2, tail2, ids, logp, tail)
    assert kl.mean() < 1e-3 and kl.max() < 1e-2


def test_default_topk_is_small_and_accurate_on_peaked_large_vocab():
    """The issue's target shape: k=64, V=151,936, a few peaked rows; mean KL under 1e-3."""
    rng = np.random.default_rng(2)
    vocab, k, n = 151_936, 64, 48
    logits = rng.standard_normal((n, vocab)).astype(np.float32) * rng.uniform(1, 4, size=(n, 1)).astype(np.float32)
    logits[np.arange(n), rng.integers(0, vocab, n)] += 12
    ids, logp, tail = exact_topk(logits.astype(np.float64), k)
    payload, (ids2, logp2, tail2) = roundtrip(ids, logp, tail, vocab)
    kl = kl_over_k_and_tail(ids2, logp2, tail2, ids, logp, tail)
    assert kl.mean() < 1e-3
    assert set(topk_section_sizes(payload)) == {"ids", "values", "tail", "header"}


@pytest.mark.parametrize("params", STEPS)
def test_topk_adversarial_rows(params):
    vocab, k = 50, 8
    rows = []
    # ties: equal log-probs
    rows.append((np.arange(8), np.full(8, np.log(0.1)), 0.2))
    # some -inf entries
    lp = np.array([np.log(0.5), np.log(0.25), -np.inf, -np.inf, np.log(0.125), -np.inf, -np.inf, -np.inf])
    rows.append((np.array([49, 0, 1, 2, 3, 4, 5, 6]), lp, 0.125))
    # all -inf, tail 1
    rows.append((np.arange(10, 18), np.full(8, -np.inf), 1.0))
    # top-k carries all the mass: tail 0
    rows.append((np.arange(20, 28), np.log(np.full(8, 1 / 8)), 0.0))
    # tiny mass, tail rounds to exactly 1 in float32
    rows.append((np.arange(30, 38), np.full(8, -40.0), 1.0))
    # one certain token
    rows.append((np.array([7, 3, 9, 11, 13, 15, 17, 19]), np.array([0.0] + [-np.inf] * 7), 0.0))
    # extreme spread (finite but far below the code range)
    rows.append((np.arange(40, 48), np.array([-1e-30, -1e4, -1e6, -3e38, -60, -80, -100, -200.0]), 0.0))
    ids = np.stack([r[0] for r in rows]).astype(np.int64)
    logp = np.stack([r[1] for r in rows]).astype(np.float32)
    tail = np.array([r[2] for r in rows], dtype=np.float32)
    _, (ids2, logp2, tail2) = roundtrip(ids, logp, tail, vocab, **params)
    assert np.array_equal(tail2, tail)
    assert np.array_equal(np.sort(ids2, 1), np.sort(ids, 1))
    assert_valid_distribution(logp2, tail2)
    o1, o2 = np.argsort(ids, 1), np.argsort(ids2, 1)
    a, b = np.take_along_axis(logp, o1, 1), np.take_along_axis(logp2, o2, 1)
    assert np.array_equal(np.isneginf(a[:4]), np.isneginf(b[:4]))     # zero mass stays zero, and only there
    assert np.allclose(b[0], np.log(0.1), atol=1e-6)                  # ties: equal mass, exact when all equal
    assert np.allclose(b[3], np.log(1 / 8), atol=1e-6)
    assert np.isneginf(b[2]).all() and np.isneginf(b[4]).all()        # no top-k mass left when the tail is 1
    assert b[5].max() == 0.0 and np.isneginf(np.sort(b[5])[:-1]).all()
    kl = kl_over_k_and_tail(ids2, logp2, tail2, ids, logp, tail)
    assert np.all(kl[[0, 2, 3]] < 1e-6) and kl[1] < 1e-3 and kl[5] < 1e-12 and kl[6] < 1e-6


def test_topk_k_equals_vocab_and_the_options_not_taken():
    rng = np.random.default_rng(3)
    vocab = 64
    ids, logp, tail = random_teacher(rng, 30, vocab, vocab)
    assert (tail < 1e-12).all()
    payload, (ids2, logp2, tail2) = roundtrip(ids, logp, tail, vocab)
    assert np.array_equal(np.sort(ids2, 1), np.tile(np.arange(vocab), (30, 1)))
    assert_valid_distribution(logp2, tail2)
    assert kl_over_k_and_tail(ids2, logp2, tail2, ids, logp, tail).max() < 5e-3
    # rows sorted by value (layout byte 0) and rank tables (flag bit 0) are benchmark code now: refused
    for retired in (payload[:3] + b"\0" + payload[4:], payload[:4] + bytes([payload[4] | 1]) + payload[5:]):
        with pytest.raises(CodecError, match="no longer reads"):
            decode_topk(retired, 30, vocab, vocab)
    # reference "absolute" (flag bit 1) only moved the codes; decoding never depended on it
    absolute = payload[:4] + bytes([payload[4] | 2]) + payload[5:]
    assert all(np.array_equal(a, b) for a, b in zip(decode_topk(absolute, 30, vocab, vocab), (ids2, logp2, tail2)))
    for option in (dict(layout="value"), dict(reference="absolute"), dict(rank_of_id=np.arange(vocab))):
        with pytest.raises(CodecError, match="unknown parameter"):
            encode_topk(ids, logp.astype(np.float32), tail.astype(np.float32), vocab, **option)


@pytest.mark.parametrize("option", ["layout", "reference", "rank_of_id"])
def test_the_options_not_taken_round_trip_in_benchmark_code(option):
    """benchmarks/codec_table.py keeps the options docs/codec.md measured and did not take: exact ids and tail."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from codec_table import variant

    rng = np.random.default_rng(9)
    vocab, k = 3000, 48
    ids, logp, tail = random_teacher(rng, 200, vocab, k)
    params = {"layout": dict(layout="value"), "reference": dict(reference="absolute"),
              "rank_of_id": dict(rank_of_id=rng.permutation(vocab))}[option]
    encode, decode = variant(vocab, k, **params)
    ids2, logp2, tail2 = decode(encode(ids, logp.astype(np.float32), tail.astype(np.float32)), 200)
    assert np.array_equal(np.sort(ids2, 1), np.sort(ids, 1)) and np.array_equal(tail2, tail.astype(np.float32))
    assert_valid_distribution(logp2, tail2)
    kl = kl_over_k_and_tail(ids2, logp2, tail2, ids, logp, tail)
    assert kl.mean() < 1e-3 and kl.max() < 1e-2


def test_topk_rejects_bad_inputs():
    vocab = 100
    ids = np.array([[1, 2, 3]], dtype=np.int64)
    good = np.log(np.array([[0.5, 0.25, 0.125]], dtype=np.float32))
    tail = np.array([0.125], dtype=np.float32)
    encode_topk(ids, good, tail, vocab)
    cases = [
        (np.array([[1, 2, 1]]), good, tail, "twice"),
        (np.array([[1, 2, 100]]), good, tail, "outside the vocabulary"),
        (np.array([[-2, 2, 3]]), good, tail, "outside the vocabulary"),
        (np.array([[-1, 2, 3]]), good, tail, "unused slot"),
        (ids, np.array([[np.nan, -1, -2]], np.float32), tail, "NaN"),
        (ids, np.array([[0.5, -1, -2]], np.float32), tail, "above 0"),
        (ids, good, np.array([1.5], np.float32), "outside \\[0, 1\\]"),
        (ids, good, np.array([0.5], np.float32), "sums to"),
        (ids, good[:, :2], tail, "shapes"),
    ]
    for bad_ids, lp, t, msg in cases:
        with pytest.raises(CodecError, match=msg):
            encode_topk(bad_ids, lp, t, vocab)
    assert issubclass(CodecError, user_errors())   # the cache layer's own error, printed by the CLI as one line


def test_topk_header_version_and_corruption():
    rng = np.random.default_rng(4)
    ids, logp, tail = random_teacher(rng, 10, 200, 16)
    payload = encode_topk(ids, logp.astype(np.float32), tail.astype(np.float32), 200)
    assert payload[:2] == b"KT" and payload[2] == 1
    with pytest.raises(CodecError, match="version 9"):
        decode_topk(payload[:2] + bytes([9]) + payload[3:], 10, 16, 200)
    with pytest.raises(CodecError, match="not a top-k"):
        decode_topk(b"XX" + payload[2:], 10, 16, 200)
    with pytest.raises(CodecError, match="caller expects"):
        decode_topk(payload, 11, 16, 200)
    with pytest.raises(CodecError, match="corrupt"):
        decode_topk(payload[:-5], 10, 16, 200)
    frames_start = len(payload) - sum(topk_section_sizes(payload)[part] for part in ("ids", "values", "tail"))
    garbled = payload[:frames_start] + b"\0" * (len(payload) - frames_start)   # frames that are not zstd
    with pytest.raises(CodecError, match="corrupt"):
        decode_topk(garbled, 10, 16, 200)
    with pytest.raises(CodecError, match="unknown parameter"):
        encode_topk(ids, logp.astype(np.float32), tail.astype(np.float32), 200, stpe=0.1)
    with pytest.raises(CodecError, match="unknown parameter"):
        decode_topk(payload, 10, 16, 200, stpe=0.1)
    decode_topk(payload, 10, 16, 200, **DEFAULT_TOPK_PARAMS)   # the encoder's own parameters are accepted


@pytest.mark.parametrize("vocab, k", [(3000, 48), (151_936, 64), (50, 50)])
def test_topk_exact_keeps_every_bit(vocab, k):
    """Precision exact: the id set, every log-prob's float32 bits and the tail come back (rows sorted by id)."""
    rng = np.random.default_rng(12)
    ids, logp, tail = random_teacher(rng, 200, vocab, k)
    logp = logp.astype(np.float32)
    logp[3, 5:] = -np.inf                                        # zero mass
    logp[4] = [-0.0] + [-np.inf] * (k - 1)                       # one certain token
    tail = np.clip(1 - np.exp(logp.astype(np.float64)).sum(1), 0, 1)
    payload, (ids2, logp2, tail2) = roundtrip(ids, logp, tail, vocab, exact=True)
    assert payload[:3] == b"KT\x01" and payload[3] == 1 and payload[4] & 4   # version 1, layout id, flag exact
    o1, o2 = np.argsort(ids, 1), np.argsort(ids2, 1)
    assert np.array_equal(np.take_along_axis(ids, o1, 1), ids2) and np.array_equal(o2, np.tile(np.arange(k), (200, 1)))
    assert np.array_equal(np.take_along_axis(logp, o1, 1).view(np.uint32), logp2.view(np.uint32))
    assert np.array_equal(tail2.view(np.uint32), tail.astype(np.float32).view(np.uint32))
    unused = np.where(np.arange(k) >= k - 2, -1, ids)            # unused slots (id -1, log-prob -inf) stay so
    lp_unused = np.where(unused < 0, -np.inf, logp).astype(np.float32)
    mass = np.clip(1 - np.exp(lp_unused.astype(np.float64)).sum(1), 0, 1)
    _, (ids3, logp3, _) = roundtrip(unused, lp_unused, mass.astype(np.float32), vocab, exact=True)
    assert (ids3[:, -2:] == -1).all() and np.isneginf(logp3[:, -2:]).all()


def test_kt_precisions_are_one_codec():
    """The `kt` codec of the registry: each precision writes its own payload, and a payload is decoded only
    at the precision the cache names (a manifest and a shard that disagree are refused)."""
    from fastkd.cache_tools.codecs import decode_kt, encode_kt

    rng = np.random.default_rng(13)
    vocab, k = 500, 16
    ids, logp, tail, lp32, t32, labels = teacher_case(rng, 64, vocab, k)
    sizes = {}
    for precision, version in (("fine", 1), ("small", 2), ("exact", 1)):
        payload = encode_kt(ids, lp32, t32, vocab, labels=labels, precision=precision)
        assert payload[2] == version
        sizes[precision] = len(payload)
        ids2, lp2, tail2 = decode_kt(payload, 64, k, vocab, labels=labels, precision=precision)
        assert np.array_equal(np.sort(ids2, 1), np.sort(ids, 1)) and np.array_equal(tail2, t32)
        for other in {"fine", "small", "exact"} - {precision}:
            with pytest.raises(CodecError, match=f"precision {precision!r}, the cache names {other!r}"):
                decode_kt(payload, 64, k, vocab, labels=labels, precision=other)
    assert max(sizes["small"], sizes["fine"]) < sizes["exact"]   # (small < fine on LM-like data: below)
    with pytest.raises(CodecError, match="unknown precision 'tiny'"):
        encode_kt(ids, lp32, t32, vocab, precision="tiny")


def random_samples(rng, n, s, vocab):
    """Sampled-mode rows: draws with replacement, stored in shuffled slot order with -1 padding."""
    ids = np.full((n, s), -1, dtype=np.int64)
    counts = np.zeros((n, s), dtype=np.int32)
    for i in range(n):
        draws = rng.zipf(1.3, size=s) % vocab if i % 7 else np.array([], dtype=np.int64)
        uniq, cnt = np.unique(draws, return_counts=True)
        slots = rng.permutation(s)[:len(uniq)]
        ids[i, slots], counts[i, slots] = uniq, cnt
    return ids, counts


def as_multisets(ids, counts):
    return [sorted(zip(r[r >= 0].tolist(), c[r >= 0].tolist())) for r, c in zip(ids, counts)]


@pytest.mark.parametrize("s", [50, 300])
def test_sampled_roundtrip_is_lossless(s):
    rng = np.random.default_rng(5)
    vocab = 151_936
    ids, counts = random_samples(rng, 60, s, vocab)
    ids[3, 0], counts[3, 0] = vocab - 1, s  # the largest id
    ids[3, 1:], counts[3, 1:] = -1, 0
    payload = encode_sampled(ids, counts, vocab)
    assert payload[:2] == b"KS" and payload[2] == 1
    ids2, counts2 = decode_sampled(payload, 60, s, vocab)
    assert ids2.dtype == np.int64 and ids2.shape == (60, s) and counts2.shape == (60, s)
    assert as_multisets(ids2, counts2) == as_multisets(ids, counts)
    used = (ids2 >= 0)
    assert np.array_equal(used, np.arange(s)[None] < used.sum(1, keepdims=True))   # used slots first
    assert np.array_equal(counts2 > 0, used)
    with pytest.raises(CodecError, match="no longer reads"):     # a rank table (flag bit 0): benchmark code now
        decode_sampled(payload[:3] + b"\1" + payload[4:], 60, s, vocab)


def test_sampled_rejects_bad_inputs():
    vocab = 10
    ids = np.array([[1, 2, -1]])
    counts = np.array([[3, 1, 0]])
    encode_sampled(ids, counts, vocab)
    for bad_ids, bad_counts, msg in [
        (np.array([[1, 1, -1]]), counts, "twice"),
        (np.array([[1, 10, -1]]), counts, "outside"),
        (ids, np.array([[3, 0, 0]]), "used slot"),
        (ids, np.array([[3, 1, 2]]), "used slot"),
        (np.array([[1, 2, -2]]), counts, "used slot"),
    ]:
        with pytest.raises(CodecError, match=msg):
            encode_sampled(bad_ids, bad_counts, vocab)
    payload = encode_sampled(ids, counts, vocab)
    with pytest.raises(CodecError, match="version 2"):
        decode_sampled(payload[:2] + bytes([2]) + payload[3:], 1, 3, vocab)


def hidden_inputs(rng):
    x = rng.standard_normal((64, 256)).astype(np.float32)
    x[:, 7] *= 80                    # an outlier channel, as LLM activations have
    x[3] = 0.0                       # an all-zero row (scale 0)
    x[5, :4] = [1e-30, -1e-30, 3e4, -3e4]
    return x


@pytest.mark.parametrize("method,block", [("bf16", 0), ("int8", 0), ("int8", 32), ("int8", 96), ("fp8", 0), ("fp8", 64),
                                          ("fp8", 100), ("int8", 1000)])
def test_hidden_roundtrip_within_bound(method, block):
    x = hidden_inputs(np.random.default_rng(6))
    payload = encode_hidden(x, method, block=block)
    assert payload[:2] == b"KH" and payload[2] == 1
    y = decode_hidden(payload, *x.shape, method)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert (np.abs(y.astype(np.float64) - x) <= hidden_error_bound(x, method, block)).all()
    if method == "bf16":   # independent reference: torch's own float32 -> bf16 rounding
        assert np.array_equal(y, torch.from_numpy(x).bfloat16().float().numpy())
    if method == "fp8" and 256 % (block or 256) == 0:   # independent reference: torch's e4m3 cast per block
        scale = np.abs(x.reshape(64, -1, block or 256)).max(2, keepdims=True) / 448
        scale = np.where(scale > 0, scale, 1).astype(np.float32)
        ref = torch.from_numpy(x.reshape(64, -1, block or 256) / scale).to(torch.float8_e4m3fn).float().numpy() * scale
        assert np.allclose(y, ref.reshape(x.shape), rtol=1e-6, atol=0)
    if method == "int8" and 256 % (block or 256) == 0:  # independent reference: float64 round(x / scale) * scale
        xb = x.astype(np.float64).reshape(64, -1, block or 256)
        scale = np.abs(xb).max(2, keepdims=True) / 127
        ref = np.rint(xb / np.where(scale > 0, scale, 1)) * scale
        assert np.allclose(y, ref.reshape(x.shape), rtol=1e-5, atol=1e-30)
    assert np.array_equal(y[3], np.zeros(256, np.float32))


def test_hidden_rejects_bad_inputs_and_versions():
    x = np.ones((2, 8), np.float32)
    with pytest.raises(CodecError, match="NaN or inf"):
        encode_hidden(np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(CodecError, match="block"):
        encode_hidden(x, "int8", block=-1)
    with pytest.raises(CodecError, match="unknown method"):
        encode_hidden(x, "int4")
    with pytest.raises(CodecError, match="unknown parameter"):
        encode_hidden(x, "int8", blok=32)
    payload = encode_hidden(x, "int8")
    with pytest.raises(CodecError, match="method 'int8'"):
        decode_hidden(payload, 2, 8, "bf16")
    with pytest.raises(CodecError, match="version 3"):
        decode_hidden(payload[:2] + bytes([3]) + payload[3:], 2, 8, "int8")


def test_random_projection_fixed_and_norm_preserving():
    r = random_projection(128, 32, seed=11)
    assert r.shape == (128, 32) and r.dtype == np.float32
    assert np.array_equal(r, random_projection(128, 32, seed=11))
    assert not np.array_equal(r, random_projection(128, 32, seed=12))
    assert np.allclose(np.abs(r), 1 / np.sqrt(32))
    # pinned values: the matrix must not change between versions (its seed is all the manifest keeps)
    assert np.array_equal(np.sign(r[0, :8]), np.sign(random_projection(128, 32, seed=11)[0, :8]))
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4000, 128))
    ratio = ((x @ r.astype(np.float64)) ** 2).sum(1) / (x ** 2).sum(1)
    assert abs(ratio.mean() - 1) < 0.03          # E||xR||^2 = ||x||^2
    assert abs(r.mean()) < 0.05 / np.sqrt(32)    # balanced signs


def test_topk_unused_slots_roundtrip():
    """Sampled-mode rows through the top-k codec: id -1 with log-prob -inf marks an unused slot."""
    vocab = 151_936
    rng = np.random.default_rng(8)
    ids = np.full((40, 12), -1, np.int64)
    logp = np.full((40, 12), -np.inf, np.float32)
    tail = np.ones(40, np.float32)
    for i in range(40):
        m = i % 13 if i % 13 <= 12 else 12
        chosen = rng.choice(vocab, size=m, replace=False)
        slots = rng.permutation(12)[:m]
        p = rng.dirichlet(np.ones(m)) * 0.9 if m else np.zeros(0)
        ids[i, slots], logp[i, slots] = chosen, np.log(p)
        tail[i] = np.float32(1 - p.sum())
    _, (ids2, logp2, tail2) = roundtrip(ids, logp, tail, vocab)
    assert np.array_equal(np.sort(ids2, 1), np.sort(ids, 1))
    assert np.array_equal(np.isneginf(logp2), ids2 == -1) and np.array_equal(tail2, tail)
    assert_valid_distribution(logp2, tail2)
    with pytest.raises(CodecError, match="unused slot"):
        encode_topk(np.array([[3, -1]]), np.array([[np.log(0.5), np.log(0.5)]], np.float32), np.zeros(1, np.float32), vocab)


# ---------------------------------------------------------------------------- top-k version 2 (kt, precision small)

from fastkd.cache_tools.topk2_codec import DEFAULT_TOPK2_PARAMS, decode_topk2, encode_topk2  # noqa: E402


def labels_from(rng, ids, logp, tail, vocab):
    """Next tokens drawn from the teacher: a top-k id with its probability, else an id outside K."""
    cdf = np.cumsum(np.exp(logp.astype(np.float64)), axis=1)
    slot = (cdf < rng.random(len(ids))[:, None]).sum(1)
    inside = slot < ids.shape[1]
    out = rng.integers(0, vocab, len(ids))
    return np.where(inside, ids[np.arange(len(ids)), np.minimum(slot, ids.shape[1] - 1)], out)


def teacher_case(rng, n, vocab, k):
    """random_teacher's rows, their float32 log-probs and tail, and labels drawn from them."""
    ids, logp, tail = random_teacher(rng, n, vocab, k)
    labels = labels_from(rng, ids, logp, tail, vocab)
    return ids, logp, tail, logp.astype(np.float32), tail.astype(np.float32), labels


def roundtrip2(ids, logp, tail, vocab, labels=None, **params):
    n, k = ids.shape
    payload = encode_topk2(ids, logp.astype(np.float32), tail.astype(np.float32), vocab, labels=labels, **params)
    out = decode_topk2(payload, n, k, vocab, labels=labels, **params)
    assert out[0].dtype == np.int64 and out[1].dtype == np.float32 and out[2].dtype == np.float32
    assert out[0].shape == (n, k) and out[1].shape == (n, k) and out[2].shape == (n,)
    return payload, out


@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("params", [{}, dict(step=0.03), dict(step=0.05, growth=0.5, max_step=3.0)])
def test_topk2_roundtrip_exact_ids_and_tail_kl_within_bounds(with_labels, params):
    rng = np.random.default_rng(11)
    vocab, k = 3000, 48
    ids, logp, tail = random_teacher(rng, 400, vocab, k)
    perm = rng.permuted(np.tile(np.arange(k), (len(ids), 1)), axis=1)
    ids, logp = np.take_along_axis(ids, perm, 1), np.take_along_axis(logp, perm, 1)
    labels = labels_from(rng, ids, logp, tail, vocab) if with_labels else None
    _, (ids2, logp2, tail2) = roundtrip2(ids, logp, tail, vocab, labels, **params)
    assert np.array_equal(tail2.view(np.uint32), tail.astype(np.float32).view(np.uint32))
    assert np.array_equal(np.sort(ids2, 1), np.sort(ids, 1))
    assert_valid_distribution(logp2, tail2)
    assert np.allclose(np.exp(logp2.astype(np.float64)).sum(1), 1 - tail2.astype(np.float64), rtol=2e-6, atol=1e-9)
    kl = kl_over_k_and_tail(ids, logp, tail, ids2, logp2, tail2)     # KL(exact || decoded)
    assert kl.mean() < 1e-3 and kl.max() < 5e-3


def test_topk2_is_smaller_than_v1_within_the_kl_bounds_on_an_lm_like_teacher():
    """benchmarks/synthetic_lm.py at a small size (k=64, V=151,936): fewer bytes than KT v1 with the
    next tokens as labels, mean KL(exact || decoded) <= 1e-3 and max <= 5e-3."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from synthetic_lm import synthetic_teacher

    vocab = 151_936
    s = synthetic_teacher(512, k=64, vocab_size=vocab, seed=3)
    labels = labels_from(np.random.default_rng(3), s.ids, s.logprobs, s.tail, vocab)
    payload, (ids2, logp2, tail2) = roundtrip2(s.ids, s.logprobs, s.tail, vocab, labels)
    v1 = encode_topk(s.ids, s.logprobs, s.tail, vocab)
    kl = kl_over_k_and_tail(s.ids, s.exact_logprobs, s.exact_tail, ids2, logp2, tail2)
    print(f"kt2 {len(payload) / 512:.1f} B/position, kt {len(v1) / 512:.1f}; KL mean {kl.mean():.2e} max {kl.max():.2e}")
    assert len(payload) < 0.95 * len(v1)
    assert kl.mean() <= 1e-3 and kl.max() <= 5e-3


def adversarial_rows():
    vocab, k = 50, 8
    rows = [
        (np.arange(8), np.full(8, np.log(0.1)), 0.2, 3),                                    # ties
        (np.array([49, 0, 1, 2, 3, 4, 5, 6]),
         np.array([np.log(0.5), np.log(0.25), -np.inf, -np.inf, np.log(0.125), -np.inf, -np.inf, -np.inf]), 0.125, 49),
        (np.arange(10, 18), np.full(8, -np.inf), 1.0, 12),                                  # all -inf, tail 1
        (np.arange(20, 28), np.log(np.full(8, 1 / 8)), 0.0, 40),                            # tail 0
        (np.arange(30, 38), np.full(8, -40.0), 1.0, 30),                                    # tail 1 in float32
        (np.array([42, 43, 44, 45, 46, 47, 48, 49]), np.array([0.0] + [-np.inf] * 7), 0.0, 42),   # certain, V-1 present
        (np.array([49, 48, 47, 46, 45, 44, 43, 42]),
         np.log(np.array([0.3, 0.2, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05])), 0.1, 49),         # label = V-1 = top-1
    ]
    ids = np.stack([r[0] for r in rows])
    lp = np.stack([r[1] for r in rows]).astype(np.float32)
    tail = np.array([r[2] for r in rows], np.float32)
    labels = np.array([r[3] for r in rows])
    return vocab, k, ids, lp, tail, labels


@pytest.mark.parametrize("with_labels", [True, False])
def test_topk2_adversarial_rows(with_labels):
    vocab, k, ids, lp, tail, labels = adversarial_rows()
    labels = labels if with_labels else None
    _, (ids2, lp2, tail2) = roundtrip2(ids, lp, tail, vocab, labels)
    assert np.array_equal(np.sort(ids2, 1), np.sort(ids, 1))
    assert np.array_equal(tail2, tail)
    assert_valid_distribution(lp2, tail2)
    o1, o2 = np.argsort(ids, 1), np.argsort(ids2, 1)
    a, b = np.take_along_axis(lp, o1, 1), np.take_along_axis(lp2, o2, 1)
    assert np.array_equal(np.isneginf(a[[1, 2, 5]]), np.isneginf(b[[1, 2, 5]]))   # zero mass stays zero
    assert np.ptp(b[0]) == 0                                                        # ties decode equal
    assert np.isneginf(b[4]).all()                                                  # tail exactly 1
    assert b[5].max() == 0.0
    for j in range(len(ids)):                                                       # sorted by value = same order
        assert np.array_equal(np.argsort(-a[j], kind="stable")[:1], np.argsort(-b[j], kind="stable")[:1]) or np.ptp(a[j]) == 0


def test_topk2_k_equals_vocab_one_position_and_empty():
    rng = np.random.default_rng(5)
    vocab = 40
    ids, logp, tail = random_teacher(rng, 30, vocab, vocab)
    labels = rng.integers(0, vocab, 30)
    _, (ids2, logp2, tail2) = roundtrip2(ids, logp, tail, vocab, labels)
    assert np.array_equal(np.sort(ids2, 1), np.tile(np.arange(vocab), (30, 1)))
    assert kl_over_k_and_tail(ids, logp, tail, ids2, logp2, tail2).max() < 5e-3
    _, (i1, l1, t1) = roundtrip2(ids[:1], logp[:1], tail[:1], vocab, labels[:1])      # a sequence of one position
    assert np.array_equal(np.sort(i1, 1), np.sort(ids[:1], 1))
    empty = encode_topk2(np.zeros((0, 8), np.int64), np.zeros((0, 8), np.float32), np.zeros(0, np.float32), vocab,
                         labels=np.zeros(0, np.int64))
    i0, l0, t0 = decode_topk2(empty, 0, 8, vocab, labels=np.zeros(0, np.int64))
    assert i0.shape == (0, 8) and l0.shape == (0, 8) and t0.shape == (0,)


def test_topk2_unused_slots_roundtrip():
    vocab, k = 100, 6
    ids = np.array([[5, -1, 7, -1, 99, -1], [-1] * 6])
    lp = np.array([[np.log(0.5), -np.inf, np.log(0.3), -np.inf, np.log(0.1), -np.inf], [-np.inf] * 6], np.float32)
    tail = np.array([0.1, 1.0], np.float32)
    _, (ids2, lp2, tail2) = roundtrip2(ids, lp, tail, vocab, np.array([7, 3]))
    assert sorted(ids2[0][ids2[0] >= 0].tolist()) == [5, 7, 99] and (ids2[0] == -1).sum() == 3
    assert (ids2[1] == -1).all() and np.isneginf(lp2[1]).all()


def test_topk2_rejects_bad_inputs_and_corrupt_payloads():
    rng = np.random.default_rng(6)
    vocab, k = 200, 16
    ids, logp, tail, lp32, t32, labels = teacher_case(rng, 20, vocab, k)
    for bad_ids in (np.where(np.arange(k) == 3, vocab, ids), np.where(np.arange(k) == 3, ids[:, :1], ids)):
        with pytest.raises(CodecError):
            encode_topk2(bad_ids, lp32, t32, vocab, labels=labels)
    with pytest.raises(CodecError, match="labels"):
        encode_topk2(ids, lp32, t32, vocab, labels=labels[:-1])
    with pytest.raises(CodecError, match="labels"):
        encode_topk2(ids, lp32, t32, vocab, labels=np.full(20, vocab))
    with pytest.raises(CodecError, match="unknown parameter"):
        encode_topk2(ids, lp32, t32, vocab, stpe=0.1)
    payload = encode_topk2(ids, lp32, t32, vocab, labels=labels)
    assert payload[:3] == b"KT\x02"
    with pytest.raises(CodecError, match="labels"):
        decode_topk2(payload, 20, k, vocab)
    with pytest.raises(CodecError, match="caller expects"):
        decode_topk2(payload, 21, k, vocab, labels=np.zeros(21, np.int64))
    with pytest.raises(CodecError, match="caller expects"):
        decode_topk2(payload, 20, k, vocab + 1, labels=labels)
    with pytest.raises(CodecError, match="version"):
        decode_topk2(payload[:2] + bytes([7]) + payload[3:], 20, k, vocab, labels=labels)
    decode_topk2(payload, 20, k, vocab, labels=labels, **DEFAULT_TOPK2_PARAMS)
    # every truncation and many byte flips: a CodecError or a valid decode, never another exception
    outcomes = {"error": 0, "decoded": 0}
    for cut in range(0, len(payload), 7):
        with pytest.raises(CodecError):
            decode_topk2(payload[:cut], 20, k, vocab, labels=labels)
    for offset in range(len(payload)):
        data = bytearray(payload)
        data[offset] ^= 0x5A
        try:
            out_ids, out_lp, out_tail = decode_topk2(bytes(data), 20, k, vocab, labels=labels)
        except CodecError:
            outcomes["error"] += 1
            continue
        outcomes["decoded"] += 1
        assert out_ids.shape == (20, k) and ((out_ids >= -1) & (out_ids < vocab)).all()
    assert outcomes["error"] > 0
    # a header announcing a huge table or block is refused, not allocated
    huge = bytearray(payload)
    huge[4:8] = (2**31).to_bytes(4, "little")
    with pytest.raises(CodecError):
        decode_topk2(bytes(huge), 20, k, vocab, labels=labels)


# ---------------------------------------------------------------------------- the codecs in a cache

import json as _json  # noqa: E402

from fastkd.cache_tools import FORMAT_VERSION, CacheError, CacheReader, CacheWriter, CorruptCacheError  # noqa: E402
from fastkd.cache_tools.integrity import seal  # noqa: E402
from helpers import random_sequence, synthetic_settings  # noqa: E402


def _cache(root, settings, count=14, seed=0):
    rng = np.random.default_rng(seed)
    seqs = [random_sequence(rng, i, settings) for i in range(count)]
    seqs += [random_sequence(rng, count, settings, length=4, num_loss=0),     # empty response
             random_sequence(rng, count + 1, settings, length=3, num_loss=1)]  # one position
    with CacheWriter(root, settings, sequences_per_shard=6, max_block_sequences=3) as writer:
        for s in seqs:
            writer.add(s)
    return seqs


def _shard_meta(root):
    from safetensors import safe_open
    with safe_open(str(sorted((root / "shards").iterdir())[0]), "numpy") as f:
        return f.metadata(), set(f.keys())


def test_kt_small_cache_reads_back(tmp_path):
    settings = synthetic_settings(vocab_size=300, codecs={"topk": "kt:precision=small", "hidden": "kh:method=bf16"})
    seqs = _cache(tmp_path / "c", settings)
    reader = CacheReader(tmp_path / "c")
    assert reader.manifest["format_version"] == FORMAT_VERSION
    assert reader.manifest["codecs"]["topk"] == {"name": "kt", "params": {"precision": "small"}}
    meta, _ = _shard_meta(tmp_path / "c")
    assert meta["format_version"] == str(FORMAT_VERSION)
    assert _json.loads(meta["topk_codec"])["params"]["precision"] == "small"
    for s, got in zip(seqs, reader):
        np.testing.assert_array_equal(got.input_ids, s.input_ids)
        np.testing.assert_array_equal(np.sort(got.topk_ids, 1), np.sort(s.topk_ids, 1))
        np.testing.assert_array_equal(got.tail, s.tail)
        if len(s.tail):
            kl = kl_over_k_and_tail(s.topk_ids, s.topk_logprobs, s.tail, got.topk_ids, got.topk_logprobs, got.tail)
            assert kl.max() < 5e-3
    from fastkd.cache_tools.verify import verify_cache
    report = verify_cache(tmp_path / "c")
    assert report.ok, report.problems


def test_ks_sampled_cache_holds_the_counts_in_its_payload(tmp_path):
    settings = synthetic_settings(vocab_size=300, mode="sample")
    seqs = _cache(tmp_path / "c", settings)
    reader = CacheReader(tmp_path / "c")
    assert reader.manifest["format_version"] == FORMAT_VERSION and reader.manifest["codecs"]["topk"]["name"] == "ks"
    meta, keys = _shard_meta(tmp_path / "c")
    assert "counts_codec" not in meta and not any(k.endswith(".counts") for k in keys)
    for s, got in zip(seqs, reader):
        assert as_multisets(got.topk_ids, got.counts) == as_multisets(s.topk_ids, s.counts)
        used = got.counts > 0
        np.testing.assert_allclose(np.exp(got.topk_logprobs[used]), (got.counts / got.counts.sum(1, keepdims=True))[used],
                                   rtol=1e-6)
        assert np.isneginf(got.topk_logprobs[~used]).all() and (got.tail == 0).all()


def test_the_logits_codec_is_the_one_of_the_mode():
    from fastkd.cache_tools.writing import normalize_settings
    with pytest.raises(CacheError, match="needs mode 'sample'"):
        normalize_settings(synthetic_settings(codecs={"topk": "ks"}))
    with pytest.raises(CacheError, match="for mode 'topk'"):
        normalize_settings(synthetic_settings(mode="sample", codecs={"topk": "kt:precision=small"}))
    sampled = normalize_settings(synthetic_settings(mode="sample", codecs={}))
    assert sampled["codecs"]["topk"] == {"name": "ks", "params": {}}


def test_kt_small_blocks_keep_every_integrity_check(tmp_path):
    """Digests apply at every precision: a flipped byte of a topk block, the header or the manifest is refused;
    a manifest naming another precision than its shards, even sealed, is refused."""
    import struct
    settings = synthetic_settings(vocab_size=300, codecs={"topk": "kt:precision=small", "hidden": "kh:method=bf16"})
    _cache(tmp_path / "c", settings)
    shard = tmp_path / "c" / "shards" / "shard-00000.safetensors"
    original = shard.read_bytes()
    size = struct.unpack("<Q", original[:8])[0]
    header = _json.loads(original[8:8 + size])
    lo = 8 + size + header["block.00000.topk"]["data_offsets"][0]
    data = bytearray(original)
    data[lo + 5] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match="block 0"):
        CacheReader(tmp_path / "c")[0]
    data = bytearray(original)
    data[20] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError):
        CacheReader(tmp_path / "c")[0]
    shard.write_bytes(original)
    manifest = tmp_path / "c" / "manifest.json"
    m = _json.loads(manifest.read_text())
    m["codecs"]["topk"]["params"]["precision"] = "fine"      # claims the other precision: refused by the seal
    manifest.write_text(_json.dumps(m))
    with pytest.raises(CacheError, match="does not match its digest"):
        CacheReader(tmp_path / "c")
    manifest.write_text(_json.dumps(seal(m)))                 # and, sealed, by the shards' own metadata
    with pytest.raises(CorruptCacheError, match="manifest.json field 'codecs.topk' says"):
        CacheReader(tmp_path / "c")


# ---------------------------------------------------------------------------- the byte format, pinned

def _format_digest(payload: bytes, header_size: int, n_groups: int) -> str:
    """sha256 of a payload with its zstd frames decompressed: pins the format's bytes, not zstd's own output."""
    import hashlib

    import zstandard

    from fastkd.cache_tools.planes import unpack_frames

    digest = hashlib.sha256(payload[:header_size])
    for group in unpack_frames(payload, header_size, n_groups):
        digest.update(bytes([len(group)]))
        for frame in group:
            digest.update(zstandard.ZstdDecompressor().decompress(frame))
    return digest.hexdigest()[:16]


FORMAT_DIGESTS = {"fine": "b0a7446bab5c06d3", "exact": "c9c70bd53e484321", "small": "ab02bda28bba340c",
                  "small-unused": "76dbf389d9cb7af2", "ks": "80548423f6e00bc8", "kh-bf16": "ef2adc2f4cc1e607",
                  "kh-int8": "767b97f61195b886", "kh-fp8": "12acd576b0685e45"}


def test_default_payloads_keep_their_bytes():
    """Each codec's payload on a fixed input, frames decompressed, equals the one pinned (fastkd 1.0's encoders)."""
    rng = np.random.default_rng(2026)
    vocab, k = 700, 16
    ids, logp, tail, lp32, t32, labels = teacher_case(rng, 48, vocab, k)
    unused_ids = np.where(np.arange(k) >= 12, -1, ids)
    unused_lp = np.where(unused_ids < 0, -np.inf, lp32).astype(np.float32)
    unused_tail = np.clip(1 - np.exp(unused_lp.astype(np.float64)).sum(1), 0, 1).astype(np.float32)
    sampled_ids, counts = random_samples(rng, 40, 24, vocab)
    x = hidden_inputs(rng)
    small_unused = encode_topk2(unused_ids, unused_lp, unused_tail, vocab, labels=labels)
    got = {"fine": _format_digest(encode_topk(ids, lp32, t32, vocab), 26, 3),
           "exact": _format_digest(encode_topk(ids, lp32, t32, vocab, exact=True), 26, 3),
           "small": _format_digest(encode_topk2(ids, lp32, t32, vocab, labels=labels), 28, 5),
           "small-unused": _format_digest(small_unused, 28, 5),
           "ks": _format_digest(encode_sampled(sampled_ids, counts, vocab), 12, 3)}
    for method in ("bf16", "int8", "fp8"):
        got[f"kh-{method}"] = _format_digest(encode_hidden(x, method, block=64), 16, 2)
    assert got == FORMAT_DIGESTS


@pytest.mark.parametrize("spec", ["kt:layout=value", "kt:reference=absolute", "kt:rank_of_id=true", "ks:step=0.1",
                                  "kh:precision=fine"])
def test_an_option_the_codec_does_not_read_is_refused_when_spelled(spec):
    """Refused where the user spells it (before any teacher runs), naming what the codec reads."""
    with pytest.raises(CodecError, match=f"{spec.split(':')[0]} codec: unknown parameter.*; known: "):
        normalize_codec(spec, "hidden" if spec.startswith("kh") else "topk",
                        "sample" if spec.startswith("ks") else "topk")

