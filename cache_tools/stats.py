"""Per-position teacher statistics from a cache: tail mass, top-1 probability, and bounds on the entropy,
which the top-k + tail alone leave open (docs/cache-format.md section 10 gives both bounds)."""

from __future__ import annotations

import numpy as np

QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
METRICS = ("tail_mass", "top1_prob", "entropy_lower", "entropy_upper", "entropy_gap")


def entropy_bounds(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, vocab_size: int,
                   capped: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) bounds in nats on each row's full-vocabulary entropy, float64 [n]."""
    lp = np.asarray(logprobs, np.float64)
    valid = (np.asarray(ids) >= 0) & np.isfinite(lp)
    p = np.where(valid, np.exp(np.where(valid, lp, 0.0)), 0.0)
    known = -(p * np.where(valid, lp, 0.0)).sum(axis=1)
    t = np.clip(np.asarray(tail, np.float64), 0.0, 1.0)
    rest = np.maximum(vocab_size - valid.sum(axis=1), 1)
    pos = t > 0
    safe_t = np.where(pos, t, 1.0)
    upper_tail = np.where(pos, t * np.log(rest / safe_t), 0.0)
    if capped:
        cap = np.where(valid, p, np.inf).min(axis=1)
        cap = np.where(np.isfinite(cap) & (cap > 0), cap, 1.0)
    else:
        cap = np.ones_like(t)
    cap = np.maximum(cap, t / rest)  # a cap below the even spread means rounding: the spread is the floor
    full = np.floor(t / cap)
    rem = np.clip(t - full * cap, 0.0, None)
    lower_tail = -full * cap * np.log(cap) - np.where(rem > 0, rem * np.log(np.where(rem > 0, rem, 1.0)), 0.0)
    return known + lower_tail, known + np.maximum(upper_tail, lower_tail)


def position_stats(seq, vocab_size: int, sampled: bool) -> dict[str, np.ndarray]:
    """The per-position metrics of one CachedSequence, over the rows that hold the teacher (all but a
    selective-capture cache's empty rows)."""
    keep = (np.asarray(seq.topk_ids) >= 0).any(axis=1)
    ids, lp = np.asarray(seq.topk_ids)[keep], np.asarray(seq.topk_logprobs, np.float64)[keep]
    tail = np.asarray(seq.tail)[keep]
    valid = (ids >= 0) & np.isfinite(lp)
    top1 = np.exp(np.where(valid, lp, -np.inf)).max(axis=1, initial=0.0)
    lower, upper = entropy_bounds(ids, lp, tail, vocab_size, capped=not sampled)
    return {"tail_mass": np.asarray(tail, np.float64), "top1_prob": top1, "entropy_lower": lower,
            "entropy_upper": upper, "entropy_gap": upper - lower}


def summarise(values: dict[str, list[np.ndarray]]) -> dict:
    """mean, quantiles for each metric over all positions."""
    out = {}
    for name in METRICS:
        x = np.concatenate(values[name]) if values[name] else np.zeros(0)
        found = [float(v) for v in (x.mean(), *np.quantile(x, QUANTILES))] if x.size else [None] * (1 + len(QUANTILES))
        out[name] = {"mean": found[0], "quantiles": dict(zip(map(str, QUANTILES), found[1:]))}
    return out


def cache_stats(reader, max_sequences: int | None = None, progress=None) -> dict:
    """Statistics over the first `max_sequences` sequences of a CacheReader (all by default)."""
    vocab = reader.manifest["tokenizer"]["vocab_size"]
    sampled = reader.manifest.get("mode") == "sample"
    values: dict[str, list[np.ndarray]] = {name: [] for name in METRICS}
    total = len(reader) if max_sequences is None else min(max_sequences, len(reader))
    positions = 0
    it = iter(reader)
    for _ in (progress(range(total)) if progress else range(total)):
        seq = next(it)
        for name, v in position_stats(seq, vocab, sampled).items():
            values[name].append(v)
        positions += len(seq.tail)
    return {"cache": str(reader.root), "sequences": total, "loss_positions": positions,
            "loss_positions_with_teacher": sum(map(len, values["tail_mass"])), "vocab_size": vocab,
            "k": reader.manifest["k"], "mode": reader.manifest.get("mode", "topk"), "units": "nats",
            "metrics": summarise(values)}
