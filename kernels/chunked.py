"""Chunked PyTorch loss for CPU training: at most one [chunk x V] fp32 working copy at a time.

The gradient is computed in the forward pass (a row constant times q outside K plus the k
entries of K written in full, see docs/kernels.md) and stored in the logits' dtype, optionally into the logits
buffer itself (inplace=True), so backward is a single scale.
"""

from __future__ import annotations

import torch

from .sparse_target import SparseTarget, slice_target, sparse_target
from .terms import LossTerms, keep_gradients, scaled_gradient
from .validate import check_inputs

CHUNK_ELEMENTS = 1 << 24  # 64 MB of fp32 per working chunk


def default_chunk_rows(vocab: int, rows: int) -> int:
    """Rows per chunk so that one fp32 [chunk x V] buffer stays near CHUNK_ELEMENTS."""
    return max(1, min(rows, CHUNK_ELEMENTS // max(vocab, 1)))


def chunk_loss_and_grad(
    z: torch.Tensor,
    labels: torch.Tensor,
    ids: torch.Tensor,
    logprobs,
    tail,
    counts,
    *,
    mode: str,
    ce_weight: float,
    kl_weight: float,
    temperature: float,
    ignore_index: int,
    row_scale: torch.Tensor,
    want_grad: bool,
    may_overwrite: bool = False,
    out: torch.Tensor | None = None,
    target: SparseTarget | None = None,
):
    """Summed CE and KL (fp32 scalars) of a chunk of rows and, if want_grad, d(total)/dz as fp32 [c, V].

    row_scale: scalar tensor multiplying every row's gradient (1 / number of counted rows).
    may_overwrite: z is a private buffer (or the caller wants it overwritten) and may be reused.
    out: where the gradient should end up; used as the work buffer when its dtype allows.
    target: the chunk's teacher target if already computed for all rows (fewer small ops per chunk).
    """
    vocab = z.shape[1]
    tau = float(temperature)
    inv_t = 1.0 / tau
    counted = labels != ignore_index
    ids = torch.where(counted[:, None], ids.long(), -1)
    y = torch.where(counted, labels.long(), 0)
    work = torch.float64 if z.dtype == torch.float64 else torch.float32
    if target is None:
        target = sparse_target(ids, logprobs, tail, counts, mode, tau, vocab, dtype=work)
    row_scale = row_scale.to(work)

    if want_grad and out is not None and out.dtype == work and out.data_ptr() != z.data_ptr():
        buf = out.copy_(z)  # work directly in the gradient buffer: no extra chunk copy
    elif z.dtype == work and not may_overwrite:
        buf = z.clone()
    else:
        buf = z.to(work)  # a copy for fp16/bf16; z itself when fp32 and overwriting is allowed
    valid = ids >= 0
    uniq = target.uniq  # each id of K once
    slot = ids.clamp_min(0)
    z_k = buf.gather(1, slot)
    z_y = buf.gather(1, y[:, None])[:, 0]
    # The dense work is done on the complement of K only: its entries are set to -inf (so exp gives 0
    # there; their gradient is written in full below). Invalid slots point at column 0 with +inf: a no-op
    # under amin, whatever else points there.
    buf.scatter_reduce_(1, slot, torch.where(valid, float("-inf"), float("inf")).to(work).expand_as(slot),
                        reduce="amin", include_self=True)
    neg_inf = torch.tensor(float("-inf"), dtype=work, device=z.device)
    max_k = torch.where(uniq, z_k, neg_inf).amax(1)
    max_c = buf.amax(1)  # the complement's max: -inf when k = V
    row_max = torch.maximum(max_c, max_k)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    shift = torch.where(torch.isfinite(max_c), max_c, row_max)  # the dense pass is relative to the complement's max
    buf.sub_(shift[:, None])
    tempered = None
    if tau != 1.0:
        tempered = (buf * inv_t).exp_()
        sum_ct = tempered.sum(1)  # sum over the complement of exp((z - shift)/tau): >= 1 unless empty
    buf.exp_()
    sum_c1 = buf.sum(1)
    if tau == 1.0:
        sum_ct = sum_c1
    # full sums relative to the row max: complement part + the top-k part (a sum of positive terms)
    e_k = torch.where(uniq, (z_k - row_max[:, None]).exp(), 0.0)
    sum_1 = (shift - row_max).exp() * sum_c1 + e_k.sum(1)
    lse_1 = row_max + sum_1.log()
    if tau == 1.0:
        sum_t, lse_t = sum_1, lse_1
    else:
        et_k = torch.where(uniq, ((z_k - row_max[:, None]) * inv_t).exp(), 0.0)
        sum_t = ((shift - row_max) * inv_t).exp() * sum_ct + et_k.sum(1)
        lse_t = row_max * inv_t + sum_t.log()

    ce_rows = lse_1 - z_y
    logq_k = z_k * inv_t - lse_t[:, None]
    q_k = logq_k.exp()
    w = target.weight
    kl_rows = torch.where(w > 0, w * (target.log_weight - logq_k), 0.0).sum(1)
    has_comp = sum_ct > 0
    if mode == "tail":
        # log q^tau_tail from the complement's own sum: exact, finite even when q_tail underflows to 0
        log_q_tail = shift * inv_t + torch.where(has_comp, sum_ct, 1.0).log() - lse_t
        kl_rows = kl_rows + torch.where(target.tail > 0, target.tail * (target.log_tail - log_q_tail), 0.0)
    kl_rows = kl_rows * (tau * tau)
    ce_sum = torch.where(counted, ce_rows, 0.0).sum()
    kl_sum = torch.where(counted, kl_rows, 0.0).sum()
    if not want_grad:
        return ce_sum, kl_sum, None

    # outside K: g_j = ce_w q_j + kl_w tau (q^tau_j - t_tail q^tau_j / q^tau_tail), with
    # q_j = e_j exp(shift - lse_1) and q^tau_j / q^tau_tail = e^tau_j / sum_ct (e = exp(z - shift)): no division by q_tail
    scale = torch.where(counted, row_scale, 0.0)
    tail_part = torch.where(has_comp, target.tail / torch.where(has_comp, sum_ct, 1.0), 0.0) if mode == "tail" else 0.0
    a = scale * ce_weight * (shift - lse_1).exp()  # multiplies exp(z - shift)
    b = scale * kl_weight * tau * ((shift * inv_t - lse_t).exp() - tail_part)  # multiplies exp((z - shift)/tau)
    if tempered is None:
        buf.mul_((a + b)[:, None])
    else:
        buf.mul_(a[:, None]).add_(tempered.mul_(b[:, None]))
        del tempered
    # inside K (entries are 0 in buf): the full value ce_w q_j + kl_w tau (q^tau_j - t_j), once per id;
    # at the label CE adds -ce_w
    q1_k = (z_k - lse_1[:, None]).exp()
    g_k = scale[:, None] * (ce_weight * q1_k + (kl_weight * tau) * (q_k - w))
    buf.scatter_add_(1, slot, torch.where(uniq, g_k, 0.0))
    buf.scatter_add_(1, y[:, None], (-scale * ce_weight)[:, None])
    return ce_sum, kl_sum, buf


def batch_target(z, labels, ids, logprobs, tail, counts, mode, temperature, ignore_index) -> SparseTarget:
    """The teacher target of all rows at once (padding rows get no teacher mass)."""
    ids = torch.where((labels != ignore_index)[:, None], ids.long(), -1)
    work = torch.float64 if z.dtype == torch.float64 else torch.float32
    return sparse_target(ids, logprobs, tail, counts, mode, float(temperature), z.shape[1], dtype=work)


class ChunkedDistillFunction(torch.autograd.Function):
    """Forward computes loss and gradient chunk by chunk; backward scales the stored gradient."""

    @staticmethod
    def forward(ctx, logits, labels, ids, logprobs, tail, counts, mode, ce_weight, kl_weight, temperature,
                ignore_index, chunk_size, inplace):
        n, vocab = logits.shape
        counted = labels != ignore_index
        num = counted.sum()
        row_scale = 1.0 / num.clamp_min(1).to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
        want_grad = ctx.needs_input_grad[0]
        grad = None
        if want_grad:
            grad = logits if inplace else torch.empty_like(logits)
        rows = chunk_size or default_chunk_rows(vocab, n)
        target = batch_target(logits, labels, ids, logprobs, tail, counts, mode, temperature, ignore_index)
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        ce_sum = torch.zeros((), dtype=acc, device=logits.device)
        kl_sum = torch.zeros((), dtype=acc, device=logits.device)
        for start in range(0, n, rows):
            sl = slice(start, min(n, start + rows))
            ce_c, kl_c, g = chunk_loss_and_grad(
                logits[sl], labels[sl], ids[sl],
                None if logprobs is None else logprobs[sl],
                None if tail is None else tail[sl],
                None if counts is None else counts[sl],
                mode=mode, ce_weight=ce_weight, kl_weight=kl_weight, temperature=temperature,
                ignore_index=ignore_index, row_scale=row_scale, want_grad=want_grad,
                may_overwrite=inplace and want_grad, out=None if grad is None else grad[sl],
                target=slice_target(target, sl),
            )
            ce_sum += ce_c
            kl_sum += kl_c
            if g is not None and g.data_ptr() != grad[sl].data_ptr():
                grad[sl].copy_(g)
        ce = ce_sum * row_scale
        kl = kl_sum * row_scale
        total = ce_weight * ce + kl_weight * kl
        keep_gradients(ctx, grad)
        ctx.mark_non_differentiable(ce, kl, num)
        return total, ce, kl, num

    @staticmethod
    def backward(ctx, grad_total, *unused):
        if ctx.grads[0] is None:
            return (None,) * 13
        return (scaled_gradient(ctx, 0, grad_total),) + (None,) * 12


def chunked_distill_loss(
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
    chunk_size: int | None = None,
    inplace: bool = False,
    validate: bool = True,
) -> LossTerms:
    """CE + sparse KL over row chunks (see module doc); same signature as reference_loss.

    inplace=True writes the gradient into the logits buffer during forward (saves one [N, V]).
    """
    check_inputs(tuple(logits.shape), labels, teacher_ids, teacher_logprobs, tail, counts, mode,
                 temperature, ignore_index, "distill_loss", check_values=validate)
    total, ce, kl, num = ChunkedDistillFunction.apply(
        logits, labels, teacher_ids, teacher_logprobs, tail, counts, mode, float(ce_weight), float(kl_weight),
        float(temperature), int(ignore_index), chunk_size, bool(inplace),
    )
    return LossTerms(total=total, ce=ce, kl=kl, hidden=torch.zeros((), device=logits.device), num_tokens=num)
