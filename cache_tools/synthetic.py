"""Random but well-formed cached sequences and caches, for tests and benchmarks (no model needed)."""

from __future__ import annotations

import numpy as np

from .format import CachedSequence


def synthetic_settings(vocab_size: int = 1000, k: int = 8, mode: str = "topk", layers=(1, 3),
                       widths=(16, 24), **extra) -> dict:
    """Settings as the cache stage passes them (placeholder identities), with exact codecs pinned (kt at
    precision exact, ks in mode sample, kh bf16) so format tests compare bit for bit."""
    topk = "ks" if mode == "sample" else "kt:precision=exact"
    extra.setdefault("codecs", {"topk": topk, "hidden": "kh:method=bf16"})
    return {"teacher": {"path": "synthetic-teacher", "config_sha256": "0" * 64, "dtype": "bfloat16"},
            "tokenizer": {"vocab_size": vocab_size, "vocab_sha256": "1" * 64},
            "template": {"cot": True, "chat": False}, "k": k, "mode": mode,
            "sample_n": 32 if mode == "sample" else None,
            "layers": list(layers), "hidden_widths": list(widths), "max_length": 512, **extra}


def random_sequence(rng: np.random.Generator, record_index: int, settings: dict, length: int | None = None,
                    num_loss: int | None = None) -> CachedSequence:
    """One sequence whose teacher rows are a real distribution: top-k log-probs sorted, tail = 1 - sum."""
    vocab, k = settings["tokenizer"]["vocab_size"], settings["k"]
    L = int(rng.integers(1, 40)) if length is None else length
    n = int(rng.integers(0, L + 1)) if num_loss is None else num_loss
    mask = np.zeros(L, np.uint8)
    mask[L - n:] = 1  # the response is the end of the sequence
    logits = rng.standard_normal((n, vocab)) * 3.0
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    part = np.argpartition(-logp, min(k, vocab - 1), axis=1)[:, :k] if n else np.zeros((0, k), np.int64)
    order = np.take_along_axis(part, np.argsort(-np.take_along_axis(logp, part, axis=1), axis=1), axis=1)
    top = np.take_along_axis(logp, order, axis=1)
    counts = None
    ids = order.astype(np.int64)
    lp = top.astype(np.float32)
    tail = (1.0 - np.exp(top).sum(axis=1)).astype(np.float32)
    if settings.get("mode") == "sample":
        ids = np.full((n, k), -1, np.int64)
        lp = np.full((n, k), -np.inf, np.float32)
        counts = np.zeros((n, k), np.int32)
        for j in range(n):
            draws = rng.choice(vocab, size=settings.get("sample_n") or 16, p=np.exp(logp[j]))
            uniq, cnt = np.unique(draws, return_counts=True)
            uniq, cnt = uniq[:k], cnt[:k]
            ids[j, : len(uniq)] = uniq
            lp[j, : len(uniq)] = logp[j, uniq]
            counts[j, : len(uniq)] = cnt
        tail = (1.0 - np.exp(lp.astype(np.float64)).sum(axis=1)).astype(np.float32)
    hidden = {layer: (rng.standard_normal((n, d)) * 2).astype(np.float32)
              for layer, d in zip(settings.get("layers", []), settings.get("hidden_widths", []))}
    return CachedSequence(record_index=record_index, task=f"task_{record_index % 3}",
                          input_ids=rng.integers(0, vocab, L).astype(np.int32), loss_mask=mask,
                          topk_ids=ids, topk_logprobs=lp, tail=tail, counts=counts, hidden=hidden)


def random_sequences(seed: int, count: int, settings: dict, start: int = 0) -> list[CachedSequence]:
    rng = np.random.default_rng(seed)
    return [random_sequence(rng, start + i, settings) for i in range(count)]
