"""Chunked PyTorch loss for CPU training: at most one [chunk x V] fp32 working copy at a time.

The gradient is computed in the forward pass (it is a row constant times q plus sparse
fix-ups, see docs/kernels.md) and stored in the logits' dtype, optionally into the logits
buffer itself (inplace=True), so backward is a single scale.
"""

from __future__ import annotations

import torch

from .sparse_target import SparseTarget, slice_target, sparse_target
from .terms import LossTerms
from .validate import TAIL_FLOOR, check_inputs

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
    counted = labels != ignore_index
    ids = torch.where(counted[:, None], ids.long(), -1)
    y = torch.where(counted, labels.long(), 0)
    work = torch.float64 if z.dtype == torch.float64 else torch.float32
    if target is None:
        target = sparse_target(ids, logprobs, tail, counts, mode, tau, vocab, dtype=work)

    if want_grad and out is not None and out.dtype == work and out.data_ptr() != z.data_ptr():
        buf = out.copy_(z)  # work directly in the gradient buffer: no extra chunk copy
    elif z.dtype == work and not may_overwrite:
        buf = z.clone()
    else:
        buf = z.to(work)  # a copy for fp16/bf16; z itself when fp32 and overwriting is allowed
    slot = ids.clamp_min(0)
    z_k = buf.gather(1, slot)
    z_y = buf.gather(1, y[:, None])[:, 0]
    row_max = buf.amax(1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    buf.sub_(row_max)
    if tau != 1.0:
        tempered = (buf * (1.0 / tau)).exp_()
        sum_t = tempered.sum(1)
        buf.exp_()
        sum_1 = buf.sum(1)
        lse_t = row_max[:, 0] / tau + sum_t.log()
    else:
        tempered = None
        buf.exp_()
        sum_1 = buf.sum(1)
        sum_t = sum_1
    lse_1 = row_max[:, 0] + sum_1.log()
    if tau == 1.0:
        lse_t = lse_1

    ce_rows = lse_1 - z_y
    logq_k = z_k / tau - lse_t[:, None]
    q_k = logq_k.exp()
    w = target.weight
    kl_rows = torch.where(w > 0, w * (target.log_weight - logq_k), 0.0).sum(1)
    if mode == "tail":
        q_tail = (1.0 - torch.where(target.first, q_k, 0.0).sum(1)).clamp_min(TAIL_FLOOR)
        kl_rows = kl_rows + torch.where(target.tail > 0, target.tail * (target.log_tail - q_tail.log()), 0.0)
        c_row = 1.0 - target.tail / q_tail
    else:
        c_row = torch.ones_like(kl_rows)
    kl_rows = kl_rows * (tau * tau)
    ce_sum = torch.where(counted, ce_rows, 0.0).sum()
    kl_sum = torch.where(counted, kl_rows, 0.0).sum()
    if not want_grad:
        return ce_sum, kl_sum, None

    scale = torch.where(counted, row_scale, 0.0)
    a = scale * ce_weight / sum_1  # multiplies exp(z - max)  -> ce_weight * q_1
    b = scale * kl_weight * tau * c_row / sum_t  # multiplies exp((z - max)/tau) -> kl part outside K
    if tempered is None:
        buf.mul_((a + b)[:, None])
    else:
        buf.mul_(a[:, None]).add_(tempered.mul_(b[:, None]))
        del tempered
    # fix-ups: inside K the KL gradient is tau*(q_j - w_j), not tau*c*q_j; at the label CE adds -1
    fix_k = (scale * kl_weight * tau)[:, None] * (torch.where(target.first, (1.0 - c_row)[:, None] * q_k, 0.0) - w)
    buf.scatter_add_(1, slot, torch.where(ids >= 0, fix_k, 0.0))
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
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        ctx.mark_non_differentiable(ce, kl, num)
        return total, ce, kl, num

    @staticmethod
    def backward(ctx, grad_total, *unused):
        (grad,) = ctx.saved_tensors
        if grad.numel() == 0:
            return (None,) * 13
        if not bool(grad_total == 1):
            grad = grad * grad_total.to(grad.dtype)
        return (grad.view_as(grad),) + (None,) * 12  # a fresh alias: autograd can adopt it without a copy


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
