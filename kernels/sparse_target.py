"""The teacher's target as k sparse weights per row (+ a tail bucket), in fp32: shared by the fast paths.

Repeated ids (sampled mode) are merged: the first slot of each id carries the merged weight,
later slots carry 0, so scatter-adds and sums over slots stay correct. `uniq` marks the first
slot of every valid id (whatever its weight): the set K whose complement is the tail.
k = V in mode tail (no id outside K): the tail bucket is empty, its mass is dropped and the
top-k renormalised (the mass can only be rounding noise in the cache there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparseTarget:
    weight: torch.Tensor      # [c, k] target mass per slot (0 for unused or repeated slots)
    log_weight: torch.Tensor  # [c, k] log of weight (finite placeholder where weight is 0)
    first: torch.Tensor       # [c, k] bool: slot holds an id seen for the first time in its row
    tail: torch.Tensor        # [c] tail-bucket mass (0 unless mode == "tail")
    log_tail: torch.Tensor    # [c]
    uniq: torch.Tensor        # [c, k] bool: slot holds a valid id seen for the first time in its row (weight or not)


def slice_target(t: SparseTarget, rows: slice) -> SparseTarget:
    """The target of a chunk of rows."""
    return SparseTarget(t.weight[rows], t.log_weight[rows], t.first[rows], t.tail[rows], t.log_tail[rows],
                        t.uniq[rows])


def merge_repeats(ids: torch.Tensor, values: torch.Tensor):
    """Per slot: the sum of values over slots with the same id, and whether the slot is the id's first."""
    valid = ids >= 0
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    merged = (same * values[:, None, :]).sum(-1)
    k = ids.shape[1]
    earlier = torch.ones(k, k, dtype=torch.bool, device=ids.device).tril(-1)
    first = valid & ~(same & earlier).any(-1)
    return merged, first


def sparse_target(ids, logprobs, tail, counts, mode: str, temperature: float, vocab: int,
                  dtype: torch.dtype = torch.float32) -> SparseTarget:
    """Teacher weights at temperature tau (p^(1/tau) renormalised; tail spread evenly over V - k ids)."""
    inv_t = 1.0 / temperature
    valid = ids >= 0
    c = ids.shape[0]
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=ids.device)
    if mode == "sampled":
        merged, uniq = merge_repeats(ids, torch.where(valid, counts.to(dtype), 0.0))
        first = uniq & (merged > 0)
        scores = torch.where(first, merged.clamp_min(1e-30).log() * inv_t, neg_inf)
    else:
        first = uniq = valid  # top-k ids are unique (checked by validate.check_inputs)
        lp = logprobs.to(dtype)
        scores = torch.where(valid, lp * inv_t if inv_t != 1.0 else lp, neg_inf)
    if mode == "tail":
        p_tail = torch.nan_to_num(tail.to(dtype), nan=0.0).clamp(0.0, 1.0)  # NaN only in padding rows
        outside = vocab - valid.sum(1)
        log_out = outside.clamp_min(1).to(dtype).log()
        tail_score = torch.where((p_tail > 0) & (outside > 0), p_tail.clamp_min(1e-30).log() * inv_t + (1.0 - inv_t) * log_out,
                                 neg_inf)
        log_z = torch.logaddexp(torch.logsumexp(scores, 1), tail_score)
    else:
        tail_score = torch.full((c,), float("-inf"), dtype=dtype, device=ids.device)
        log_z = torch.logsumexp(scores, 1)
    log_z = torch.where(torch.isfinite(log_z), log_z, 0.0)  # a row with no teacher mass: all weights 0
    log_w = scores - log_z[:, None]
    weight = torch.where(first, log_w.exp(), 0.0)
    log_tail = tail_score - log_z
    return SparseTarget(
        weight=weight,
        log_weight=torch.where(weight > 0, log_w, 0.0),
        first=first,
        tail=log_tail.exp(),
        log_tail=torch.where(torch.isfinite(log_tail), log_tail, 0.0),
        uniq=uniq,
    )


__all__ = ["SparseTarget", "sparse_target", "merge_repeats", "slice_target"]
