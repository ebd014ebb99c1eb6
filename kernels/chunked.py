"""The PyTorch per-chunk backend (CPU): loss and gradient of a chunk of rows in one fp32 [c, V] work buffer, the
gradient a row constant times q outside K plus K's entries in full (docs/kernels.md)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .spec import LossSpec, Teacher

CHUNK_ELEMENTS = 1 << 24  # logits path: 64 MB of fp32 per working chunk


@dataclass
class SparseTarget:
    weight: torch.Tensor      # [c, k] target mass per slot (0 for unused or repeated slots)
    log_weight: torch.Tensor  # [c, k] log of weight (finite placeholder where weight is 0)
    tail: torch.Tensor        # [c] tail-bucket mass (0 unless mode == "tail")
    log_tail: torch.Tensor    # [c]
    uniq: torch.Tensor        # [c, k] bool: slot holds a valid id seen for the first time in its row (weight or not)

    def rows(self, sl: slice) -> "SparseTarget":
        return SparseTarget(*(getattr(self, f.name)[sl] for f in fields(self)))


def batch_target(labels, teacher: Teacher, spec: LossSpec, vocab: int, dtype: torch.dtype) -> SparseTarget:
    """The teacher's k weights per row at tau (+ the tail bucket, spread evenly over V - k ids), repeated sampled
    ids merged into their first slot; k = V: no tail bucket. Padding rows get no teacher mass."""
    inv_t = 1.0 / spec.temperature
    ids = teacher.only(labels != spec.ignore_index).ids
    valid = ids >= 0
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=ids.device)
    if spec.mode == "sampled":
        same = (ids[:, :, None] == ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        merged = (same * torch.where(valid, teacher.counts.to(dtype), 0.0)[:, None, :]).sum(-1)  # per id
        earlier = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=ids.device).tril(-1)
        uniq = valid & ~(same & earlier).any(-1)  # the id's first slot carries its merged weight
        first = uniq & (merged > 0)
        scores = torch.where(first, merged.clamp_min(1e-30).log() * inv_t, neg_inf)
    else:
        first = uniq = valid  # top-k ids are unique (spec.check_inputs checks)
        lp = teacher.logprobs.to(dtype)
        scores = torch.where(valid, lp * inv_t if inv_t != 1.0 else lp, neg_inf)
    tail_score = neg_inf.expand(ids.shape[0])
    if spec.mode == "tail":
        p_tail = torch.nan_to_num(teacher.tail.to(dtype), nan=0.0).clamp(0.0, 1.0)  # NaN only in padding rows
        outside = vocab - valid.sum(1)
        log_out = outside.clamp_min(1).to(dtype).log()
        tail_score = torch.where((p_tail > 0) & (outside > 0),
                                 p_tail.clamp_min(1e-30).log() * inv_t + (1.0 - inv_t) * log_out, neg_inf)
    log_z = torch.logaddexp(torch.logsumexp(scores, 1), tail_score)
    log_z = torch.where(torch.isfinite(log_z), log_z, 0.0)  # a row with no teacher mass: all weights 0
    log_w = scores - log_z[:, None]
    weight = torch.where(first, log_w.exp(), 0.0)
    log_tail = tail_score - log_z
    return SparseTarget(weight=weight, log_weight=torch.where(weight > 0, log_w, 0.0), tail=log_tail.exp(),
                        log_tail=torch.where(torch.isfinite(log_tail), log_tail, 0.0), uniq=uniq)


def _sums(buf, z_k, uniq, tau):
    """The complement of K's (-inf in buf) max `shift` and sums, buf := exp(z - shift); the full lse at 1 and tau."""
    inv_t = 1.0 / tau
    max_k = torch.where(uniq, z_k, float("-inf")).amax(1)
    max_c = buf.amax(1)  # the complement's max: -inf when k = V
    row_max = torch.maximum(max_c, max_k)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    shift = torch.where(torch.isfinite(max_c), max_c, row_max)  # the dense pass is relative to the complement's max
    buf.sub_(shift[:, None])
    tempered = None if tau == 1.0 else (buf * inv_t).exp_()
    buf.exp_()
    sum_c1 = buf.sum(1)
    sum_ct = sum_c1 if tempered is None else tempered.sum(1)  # >= 1 unless the complement is empty
    # full sums relative to the row max: complement part + the top-k part (a sum of positive terms)
    sum_1 = (shift - row_max).exp() * sum_c1 + torch.where(uniq, (z_k - row_max[:, None]).exp(), 0.0).sum(1)
    lse_1 = row_max + sum_1.log()
    lse_t = lse_1
    if tempered is not None:
        et_k = torch.where(uniq, ((z_k - row_max[:, None]) * inv_t).exp(), 0.0)
        lse_t = row_max * inv_t + (((shift - row_max) * inv_t).exp() * sum_ct + et_k.sum(1)).log()
    return shift, sum_ct, tempered, lse_1, lse_t


def chunk_loss_and_grad(z, labels, teacher: Teacher, spec: LossSpec, row_scale, out=None, target=None):
    """Summed CE and KL of a chunk and d(total)/dz times row_scale. out=None: no gradient (z untouched); out is z:
    z may be overwritten; else into out. Returns out or an fp32 work buffer (the caller copies)."""
    tau, ce_w, kl_w = float(spec.temperature), spec.ce_weight, spec.kl_weight
    inv_t = 1.0 / tau
    counted = labels != spec.ignore_index
    ids = teacher.only(counted).ids
    y = torch.where(counted, labels.long(), 0)
    work = torch.float64 if z.dtype == torch.float64 else torch.float32
    t = target if target is not None else batch_target(labels, teacher, spec, z.shape[1], work)
    if out is not None and out is not z and out.dtype == work:
        buf = out.copy_(z)  # work directly in the gradient buffer: no extra chunk copy
    elif z.dtype == work and out is not z:
        buf = z.clone()
    else:
        buf = z.to(work)  # a copy for fp16/bf16; z itself when fp32 and overwriting is allowed
    valid = ids >= 0
    slot = ids.clamp_min(0)
    z_k = buf.gather(1, slot)
    z_y = buf.gather(1, y[:, None])[:, 0]
    # K's entries set to -inf (exp gives 0 there; their gradient is written in full below). Invalid slots
    # point at column 0 with +inf: a no-op under amin, whatever else points there.
    buf.scatter_reduce_(1, slot, torch.where(valid, float("-inf"), float("inf")).to(work).expand_as(slot),
                        reduce="amin", include_self=True)
    shift, sum_ct, tempered, lse_1, lse_t = _sums(buf, z_k, t.uniq, tau)
    logq_k = z_k * inv_t - lse_t[:, None]
    q_k = logq_k.exp()
    kl_rows = torch.where(t.weight > 0, t.weight * (t.log_weight - logq_k), 0.0).sum(1)
    has_comp = sum_ct > 0
    if spec.mode == "tail":
        # log q^tau_tail from the complement's own sum: exact, finite even when q_tail underflows to 0
        log_q_tail = shift * inv_t + torch.where(has_comp, sum_ct, 1.0).log() - lse_t
        kl_rows = kl_rows + torch.where(t.tail > 0, t.tail * (t.log_tail - log_q_tail), 0.0)
    ce_sum = torch.where(counted, lse_1 - z_y, 0.0).sum()
    kl_sum = torch.where(counted, kl_rows * (tau * tau), 0.0).sum()
    if out is None:
        return ce_sum, kl_sum, None
    # outside K: g_j = ce_w q_j + kl_w tau (q^tau_j - t_tail q^tau_j / q^tau_tail), with q_j = e_j exp(shift - lse_1)
    # and q^tau_j / q^tau_tail = e^tau_j / sum_ct (e = exp(z - shift)): no division by q_tail
    scale = torch.where(counted, row_scale.to(work), 0.0)
    tail_part = torch.where(has_comp, t.tail / torch.where(has_comp, sum_ct, 1.0), 0.0) if spec.mode == "tail" else 0.0
    a = scale * ce_w * (shift - lse_1).exp()  # multiplies exp(z - shift)
    b = scale * kl_w * tau * ((shift * inv_t - lse_t).exp() - tail_part)  # multiplies exp((z - shift)/tau)
    if tempered is None:
        buf.mul_((a + b)[:, None])
    else:
        buf.mul_(a[:, None]).add_(tempered.mul_(b[:, None]))
        del tempered
    # inside K (entries are 0 in buf): ce_w q_j + kl_w tau (q^tau_j - t_j), once per id; at the label CE adds -ce_w
    g_k = scale[:, None] * (ce_w * (z_k - lse_1[:, None]).exp() + (kl_w * tau) * (q_k - t.weight))
    buf.scatter_add_(1, slot, torch.where(t.uniq, g_k, 0.0))
    buf.scatter_add_(1, y[:, None], (-scale * ce_w)[:, None])
    return ce_sum, kl_sum, buf
