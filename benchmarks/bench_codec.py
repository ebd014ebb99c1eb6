"""pytest-benchmark runs of the cache codecs on the synthetic 151,936-token LM (k=64, blocks of 1024
positions), grouped so each codec's time reads beside the raw baseline's.

    pytest benchmarks/bench_codec.py --benchmark-enable --benchmark-columns=min,median,ops

extra_info holds bytes per position; positions/s = 1024 / time. benchmarks/codec_table.py prints
the full table (sizes, KL, single-core throughput) for both data sets.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard

sys.path.insert(0, str(Path(__file__).parent))
from codec_table import decode_variant, encode_variant  # noqa: E402
from synthetic_lm import synthetic_teacher  # noqa: E402

from fastkd.cache_tools.hidden_codec import decode_hidden, encode_hidden  # noqa: E402
from fastkd.cache_tools.topk2_codec import decode_topk2, encode_topk2  # noqa: E402
from fastkd.cache_tools.topk_codec import decode_sampled, decode_topk, encode_sampled, encode_topk  # noqa: E402

V, K, N = 151_936, 64, 1024


@pytest.fixture(scope="module")
def teacher():
    sample = synthetic_teacher(N, k=K, samples=50, seed=3)
    TOP1[0] = sample.ids[:, 0].copy()
    return sample


def _raw(sample):
    return sample.ids.astype("<i4").tobytes() + sample.logprobs.astype("<f2").tobytes() + sample.tail.tobytes()


TOPK = {
    "raw": (lambda s: _raw(s), lambda p: (np.frombuffer(p, "<i4", N * K).astype(np.int64),
                                          np.frombuffer(p, "<f2", N * K, offset=4 * N * K).astype(np.float32))),
    "raw+zstd": (lambda s: zstandard.ZstdCompressor(level=3).compress(_raw(s)),
                 lambda p: zstandard.ZstdDecompressor().decompress(p)),
    "kt-fine": (lambda s: encode_topk(s.ids, s.logprobs, s.tail, V), lambda p: decode_topk(p, N, K, V)),
    "kt-fine-value-layout": (lambda s: encode_variant(s.ids, s.logprobs, s.tail, V, layout="value"),
                             lambda p: decode_variant(p, N, K)),   # an idea not taken: benchmark code
    "kt-exact": (lambda s: encode_topk(s.ids, s.logprobs, s.tail, V, exact=True), lambda p: decode_topk(p, N, K, V)),
    # precision small with the top-1 as the label: the case of a teacher whose top-1 is the next token
    "kt-small": (lambda s: encode_topk2(s.ids, s.logprobs, s.tail, V, labels=s.ids[:, 0]),
                 lambda p: decode_topk2(p, N, K, V, labels=TOP1[0])),
}
TOP1: list = [None]   # the labels decode_topk2 needs, set by the fixture


@pytest.mark.parametrize("name", list(TOPK))
def test_encode_topk(benchmark, teacher, name):
    benchmark.group = "topk encode (1024 positions)"
    encode, _ = TOPK[name]
    payload = benchmark(encode, teacher)
    benchmark.extra_info["bytes_per_position"] = len(payload) / N


@pytest.mark.parametrize("name", list(TOPK))
def test_decode_topk(benchmark, teacher, name):
    benchmark.group = "topk decode (1024 positions)"
    encode, decode = TOPK[name]
    payload = encode(teacher)
    benchmark(decode, payload)
    benchmark.extra_info["bytes_per_position"] = len(payload) / N


def test_sampled_roundtrip(benchmark, teacher):
    benchmark.group = "sampled (s=50) encode + decode"
    s = teacher.sampled_ids.shape[1]

    def both():
        return decode_sampled(encode_sampled(teacher.sampled_ids, teacher.sampled_counts, V), N, s, V)
    benchmark(both)
    benchmark.extra_info["bytes_per_position"] = len(encode_sampled(teacher.sampled_ids, teacher.sampled_counts, V)) / N


@pytest.mark.parametrize("method,block", [("bf16", 0), ("int8", 128), ("fp8", 128)])
def test_hidden_roundtrip(benchmark, method, block):
    benchmark.group = "hidden d=4096, 256 tokens: encode + decode"
    x = np.random.default_rng(0).standard_normal((256, 4096)).astype(np.float32)
    payload = encode_hidden(x, method, block=block)
    benchmark(lambda: decode_hidden(encode_hidden(x, method, block=block), 256, 4096, method))
    benchmark.extra_info["bytes_per_token"] = len(payload) / 256
