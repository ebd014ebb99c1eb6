"""Float64 reference of the distillation loss, written straight from the formulas in DESIGN.md.

Dense and slow ([N, V] float64 tensors): it is the specification the fast paths are tested
against, not something to train with. Gradients come from autograd through it. The student's
tail is the softmax mass of the complement of K, taken as a logsumexp over the complement's
logits (never 1 - sum_K q_i): exact however small it is, and its log stays finite unless the
complement is empty (k = V, where the tail bucket is dropped).
"""

from __future__ import annotations

import torch

from .terms import LossTerms
from .validate import check_inputs


def _dense_target(ids: torch.Tensor, values: torch.Tensor, v: int) -> torch.Tensor:
    """Scatter per-slot values into a dense [N, V] float64 tensor (slots with id -1 dropped; repeats add)."""
    n = ids.shape[0]
    dense = torch.zeros(n, v + 1, dtype=torch.float64, device=ids.device)
    slot = torch.where(ids >= 0, ids, torch.full_like(ids, v))  # unused slots go to a scratch column
    dense.scatter_add_(1, slot, values.double())
    return dense[:, :v]


def teacher_target(teacher_ids, teacher_logprobs, tail, counts, mode: str, temperature: float, v: int):
    """The teacher distribution at temperature tau: dense [N, V] over the vocabulary plus a tail bucket [N].

    tau != 1: top-k entries become p_i^(1/tau); the tail is assumed spread evenly over the
    V - k ids outside the top-k, so it becomes (V-k) * (p_tail/(V-k))^(1/tau); then all renormalised.
    k = V (no id outside the top-k): no tail bucket, the top-k is renormalised.
    """
    inv_t = 1.0 / temperature
    valid = teacher_ids >= 0
    n = teacher_ids.shape[0]
    tail_t = torch.zeros(n, dtype=torch.float64, device=teacher_ids.device)
    if mode == "sampled":
        freq = _dense_target(teacher_ids, torch.where(valid, counts.double(), 0.0), v)
        weight = torch.where(freq > 0, freq.clamp_min(1e-300) ** inv_t, 0.0)
    else:
        p = torch.where(valid, teacher_logprobs.double().exp(), 0.0)
        weight = _dense_target(teacher_ids, p, v)
        weight = torch.where(weight > 0, weight.clamp_min(1e-300) ** inv_t, 0.0)
        if mode == "tail":
            p_tail = torch.nan_to_num(tail.double(), nan=0.0).clamp(0.0, 1.0)
            outside = (v - valid.sum(1)).double()
            tail_t = torch.where(outside > 0, outside.clamp_min(1.0) ** (1.0 - inv_t) * p_tail ** inv_t, 0.0)
    z = weight.sum(1) + tail_t
    z = torch.where(z > 0, z, 1.0)
    return weight / z[:, None], tail_t / z


def reference_loss(
    logits,
    labels,
    teacher_ids,
    teacher_logprobs,
    tail=None,
    *,
    counts=None,
    mode: str = "tail",
    ce_weight: float = 1.0,
    kl_weight: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size=None,
) -> LossTerms:
    """CE + sparse KL in float64 over dense tensors; differentiable w.r.t. logits (chunk_size is ignored)."""
    n, v = logits.shape
    check_inputs((n, v), labels, teacher_ids, teacher_logprobs, tail, counts, mode, temperature, ignore_index, "reference_loss")
    counted = labels != ignore_index
    num = counted.sum()
    denom = num.clamp_min(1).double()
    ids = torch.where(counted[:, None], teacher_ids.long(), -1)
    z = logits.double()

    logq = torch.log_softmax(z, dim=1)
    y = torch.where(counted, labels.long(), 0)
    ce_rows = -logq.gather(1, y[:, None])[:, 0]
    ce = torch.where(counted, ce_rows, 0.0).sum() / denom

    if tail is not None:
        tail = torch.where(counted, tail.double(), 0.0)  # padding rows may hold anything (NaN included)
    target, tail_target = teacher_target(ids, teacher_logprobs, tail, counts, mode, temperature, v)
    z_t = z / temperature
    lse_t = torch.logsumexp(z_t, dim=1)
    logq_t = z_t - lse_t[:, None]
    kl_rows = torch.where(target > 0, torch.xlogy(target, target) - target * logq_t, 0.0).sum(1)
    if mode == "tail":
        # log q^tau_tail = logsumexp of z/tau over the complement of K - logsumexp(z/tau): no subtraction of masses
        in_k = _dense_target(ids, torch.ones_like(ids, dtype=torch.float64), v) > 0
        empty = in_k.all(1, keepdim=True)  # k = V: no tail (tail_target is 0); a finite stand-in keeps autograd clean
        comp = torch.where(empty, 0.0, torch.where(in_k, float("-inf"), z_t))
        log_q_tail = torch.logsumexp(comp, dim=1) - lse_t
        kl_rows = kl_rows + torch.xlogy(tail_target, tail_target) - tail_target * log_q_tail
    kl_rows = torch.where(counted, kl_rows, 0.0) * temperature**2
    kl = kl_rows.sum() / denom

    total = ce_weight * ce + kl_weight * kl
    zero = torch.zeros((), dtype=torch.float64, device=z.device)
    return LossTerms(total=total, ce=ce.detach(), kl=kl.detach(), hidden=zero, num_tokens=num)


__all__ = ["reference_loss", "teacher_target"]
