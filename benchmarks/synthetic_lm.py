"""Synthetic large-vocabulary teacher: logits shaped like a language model's, for codec benchmarks.

How a position's logits are made (all in float32, V = 151,936 by default):
  logit_j = a * (zipf_j + s * <h, e_j> / sqrt(r)) + spikes
  - zipf_j = -1.1 * log(rank_j): one Zipf-like unigram prior shared by every position; ranks
    are tied to ids the way a BPE vocabulary's are (id ~ rank, shuffled by a log-normal factor),
  - e_j: a fixed random r-dimensional token embedding (r = 32), h: a fresh random context vector
    per position, s = 2.5: the context-dependent part, correlated across positions through e,
  - spikes: 1 to 4 context tokens drawn from the Zipf prior get +U(4, 12),
  - a: a per-position sharpness, log-uniform in [0.8, 5], so entropies spread from ~0 to
    several nats.
Every row's exact distribution is computed in float64 from these logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TeacherSample:
    """Top-k view of a teacher plus what the KL check needs, for n positions."""
    ids: np.ndarray         # int64 [n, k], sorted by log-prob descending
    logprobs: np.ndarray    # float32 [n, k], log-softmax over the full vocabulary
    tail: np.ndarray        # float32 [n], 1 - sum of the top-k probabilities (computed in float64)
    exact_logprobs: np.ndarray  # float64 [n, k], the same log-probs before rounding to float32
    exact_tail: np.ndarray  # float64 [n]
    entropy: np.ndarray     # float64 [n], entropy of the full distribution (nats)
    sampled_ids: np.ndarray | None = None    # int64 [n, s], -1 padded
    sampled_counts: np.ndarray | None = None  # int32 [n, s]


def topk_from_logits(logits: np.ndarray, k: int, rng: np.random.Generator | None = None,
                     samples: int = 0) -> TeacherSample:
    """Exact top-k log-probs, tail mass and entropy (float64) of a [n, V] logit block;
    with `samples` > 0 also draw that many ids with replacement from the full distribution."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    total = p.sum(axis=1, keepdims=True)
    logp = z - np.log(total)
    p /= total
    entropy = -(p * logp).sum(axis=1)
    part = np.argpartition(-logp, k - 1, axis=1)[:, :k] if k < z.shape[1] else np.tile(np.arange(k), (len(z), 1))
    top = np.take_along_axis(logp, part, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    ids = np.take_along_axis(part, order, axis=1).astype(np.int64)
    top = np.take_along_axis(top, order, axis=1)
    tail = np.clip(1.0 - np.exp(top).sum(axis=1), 0.0, 1.0)
    out = TeacherSample(ids, top.astype(np.float32), tail.astype(np.float32), top, tail, entropy)
    if samples:
        cdf = np.cumsum(p, axis=1)
        u = rng.random((len(z), samples)) * cdf[:, -1:]
        draws = np.stack([np.searchsorted(cdf[i], u[i]) for i in range(len(z))])
        draws = np.minimum(draws, z.shape[1] - 1)
        out.sampled_ids, out.sampled_counts = _counts(draws)
    return out


def _counts(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: distinct drawn ids (ascending, -1 padded) and how often each was drawn."""
    n, s = draws.shape
    srt = np.sort(draws, axis=1)
    first = np.ones_like(srt, dtype=bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    ids = np.full((n, s), -1, dtype=np.int64)
    counts = np.zeros((n, s), dtype=np.int32)
    slot = np.cumsum(first, axis=1) - 1
    rows = np.repeat(np.arange(n), s)
    ids[rows, slot.ravel()] = srt.ravel()
    np.add.at(counts, (rows, slot.ravel()), 1)
    return ids, counts


def _vocabulary(rng: np.random.Generator, vocab_size: int, rank_dim: int):
    """The parts shared by every position: Zipf prior (float32), its CDF and the token embeddings."""
    rank = np.arange(1, vocab_size + 1, dtype=np.float64)
    id_of_rank = np.argsort(rank * rng.lognormal(0.0, 1.0, vocab_size), kind="stable")
    zipf = np.empty(vocab_size, dtype=np.float64)
    zipf[id_of_rank] = -1.1 * np.log(rank)
    zipf = zipf.astype(np.float32)
    prior_cdf = np.cumsum(np.exp(zipf.astype(np.float64)))
    prior_cdf /= prior_cdf[-1]
    emb = rng.standard_normal((vocab_size, rank_dim), dtype=np.float32)
    return zipf, prior_cdf, emb


def _chunk_draws(rng: np.random.Generator, m: int, rank_dim: int, prior_cdf: np.ndarray):
    """One chunk's random draws, in the generator's order: contexts h, spike ids, spike boosts, sharpness."""
    h = rng.standard_normal((m, rank_dim), dtype=np.float32)
    spikes = np.minimum(np.searchsorted(prior_cdf, rng.random((m, 4))), len(prior_cdf) - 1)
    boost = rng.uniform(4.0, 12.0, size=(m, 4)) * (np.arange(4) < rng.integers(1, 5, size=(m, 1)))
    sharp = np.exp(rng.uniform(np.log(0.8), np.log(5.0), size=(m, 1))).astype(np.float32)
    return h, spikes, boost, sharp


def synthetic_teacher(n: int = 4096, k: int = 64, vocab_size: int = 151_936, seed: int = 0,
                      samples: int = 0, rank_dim: int = 32, chunk: int = 256) -> TeacherSample:
    """n positions of the synthetic LM described in the module docstring."""
    rng = np.random.default_rng(seed)
    zipf, prior_cdf, emb = _vocabulary(rng, vocab_size, rank_dim)
    parts = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        h, spikes, boost, sharp = _chunk_draws(rng, m, rank_dim, prior_cdf)
        logits = zipf[None, :] + (2.5 / np.sqrt(rank_dim)) * (h @ emb.T)
        np.add.at(logits, (np.repeat(np.arange(m), 4), spikes.ravel()), boost.ravel().astype(np.float32))
        parts.append(topk_from_logits(logits * sharp, k, rng, samples))
    return concat(parts)


def synthetic_contexts(n: int = 4096, vocab_size: int = 151_936, seed: int = 0, rank_dim: int = 32,
                       chunk: int = 256) -> np.ndarray:
    """The context vectors h [n, rank_dim] behind synthetic_teacher(n, ..., samples=0) with the same
    arguments, replayed from the random stream without computing logits (for oracle measurements)."""
    rng = np.random.default_rng(seed)
    prior_cdf = _vocabulary(rng, vocab_size, rank_dim)[1]
    return np.concatenate([_chunk_draws(rng, min(chunk, n - start), rank_dim, prior_cdf)[0]
                           for start in range(0, n, chunk)])


def concat(parts: list[TeacherSample]) -> TeacherSample:
    """Join the per-chunk samples row-wise."""
    def cat(name):
        vals = [getattr(p, name) for p in parts]
        return None if vals[0] is None else np.concatenate(vals)
    return TeacherSample(*(cat(f) for f in TeacherSample.__dataclass_fields__))


if __name__ == "__main__":
    import time
    t = time.perf_counter()
    s = synthetic_teacher(1024, samples=50)
    print(f"{time.perf_counter() - t:.1f}s", np.percentile(s.entropy, [0, 10, 50, 90, 100]).round(2),
          "tail pct", np.percentile(s.tail, [0, 50, 100]).round(4),
          "distinct sampled", (s.sampled_ids >= 0).sum(1).mean())
