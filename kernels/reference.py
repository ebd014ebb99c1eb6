"""Float64 reference of the loss, dense and written straight from the formulas: the specification the fast
paths are tested against (autograd gives its gradient), not something to train with."""

from __future__ import annotations

import torch

from .spec import LossSpec, LossTerms, Teacher, check_inputs


def _dense_target(ids: torch.Tensor, values: torch.Tensor, v: int) -> torch.Tensor:
    """Scatter per-slot values into a dense [N, V] float64 tensor (slots with id -1 dropped; repeats add)."""
    dense = torch.zeros(ids.shape[0], v + 1, dtype=torch.float64, device=ids.device)
    slot = torch.where(ids >= 0, ids, torch.full_like(ids, v))  # unused slots go to a scratch column
    dense.scatter_add_(1, slot, values.double())
    return dense[:, :v]


def reference_loss(logits, labels, teacher: Teacher, spec: LossSpec = LossSpec()) -> LossTerms:
    """CE + sparse KL in float64 over dense tensors; differentiable w.r.t. logits (spec.chunk_size is ignored)."""
    n, v = logits.shape
    check_inputs((n, v), labels, teacher, spec.mode, spec.ignore_index, "reference_loss")
    tau = spec.temperature
    counted = labels != spec.ignore_index
    num = counted.sum()
    denom = num.clamp_min(1).double()
    teacher = teacher.only(counted)
    z = logits.double()
    y = torch.where(counted, labels.long(), 0)
    ce = torch.where(counted, -torch.log_softmax(z, dim=1).gather(1, y[:, None])[:, 0], 0.0).sum() / denom
    # the teacher at tau: p_i^(1/tau), the tail (V-k) (p_tail/(V-k))^(1/tau) (spread evenly outside the top-k;
    # none when k = V), renormalised; padding rows may hold anything (NaN included)
    ids, valid, tail_t = teacher.ids, teacher.ids >= 0, torch.zeros(n, dtype=torch.float64, device=z.device)
    if spec.mode == "sampled":
        target = _dense_target(ids, torch.where(valid, teacher.counts.double(), 0.0), v)
    else:
        target = _dense_target(ids, torch.where(valid, teacher.logprobs.double().exp(), 0.0), v)
        if spec.mode == "tail":
            p_tail = torch.nan_to_num(torch.where(counted, teacher.tail.double(), 0.0), nan=0.0).clamp(0.0, 1.0)
            outside = (v - valid.sum(1)).double()
            tail_t = torch.where(outside > 0, outside.clamp_min(1.0) ** (1.0 - 1 / tau) * p_tail ** (1 / tau), 0.0)
    target = torch.where(target > 0, target.clamp_min(1e-300) ** (1 / tau), 0.0)
    norm = target.sum(1) + tail_t
    norm = torch.where(norm > 0, norm, 1.0)
    target, tail_target = target / norm[:, None], tail_t / norm
    z_t = z / tau
    lse_t = torch.logsumexp(z_t, dim=1)
    logq_t = z_t - lse_t[:, None]
    kl_rows = torch.where(target > 0, torch.xlogy(target, target) - target * logq_t, 0.0).sum(1)
    if spec.mode == "tail":
        # log q^tau_tail = logsumexp of z/tau over the complement of K - logsumexp(z/tau): no subtraction of masses
        in_k = _dense_target(ids, torch.ones_like(ids, dtype=torch.float64), v) > 0
        empty = in_k.all(1, keepdim=True)  # k = V: no tail (tail_target is 0); a finite stand-in keeps autograd clean
        comp = torch.where(empty, 0.0, torch.where(in_k, float("-inf"), z_t))
        log_q_tail = torch.logsumexp(comp, dim=1) - lse_t
        kl_rows = kl_rows + torch.xlogy(tail_target, tail_target) - tail_target * log_q_tail
    kl = torch.where(counted, kl_rows, 0.0).sum() * tau**2 / denom
    total = spec.ce_weight * ce + spec.kl_weight * kl
    return LossTerms(total=total, ce=ce.detach(), kl=kl.detach(), hidden=torch.zeros_like(total), num_tokens=num)
