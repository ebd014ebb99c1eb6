"""Fused output layer + distillation loss: logits exist for one chunk of rows at a time.

For each chunk: z = h W^T (+ b), loss and dL/dz for the chunk (chunked.chunk_loss_and_grad on
CPU, the Triton kernel on CUDA), then dL/dh = g W and dL/dW += g^T h. The [N, V] logits and
their gradient are never materialised; backward only scales the stored dL/dh, dL/dW, dL/db.
"""

from __future__ import annotations

import torch

from .chunked import batch_target, chunk_loss_and_grad
from .sparse_target import slice_target

FUSED_CHUNK_ELEMENTS = 1 << 25  # 128 MB of fp32 logits per chunk: skinny chunks make the dW matmuls slow


def default_fused_rows(vocab: int, rows: int) -> int:
    """Rows per chunk for the fused-linear loss (a multiple of 32 when there are enough rows)."""
    r = max(1, FUSED_CHUNK_ELEMENTS // max(vocab, 1))
    return max(1, min(rows, r - r % 32 if r >= 32 else r))
from .terms import LossTerms, keep_gradients, scaled_gradient
from .validate import LossInputError, check_inputs


def _chunk_grad(z, labels, ids, logprobs, tail, counts, *, want_grad, target=None, **kw):
    """Loss sums and fp32-or-z-dtype gradient of one logits chunk, on whichever backend fits the device."""
    if z.is_cuda:
        from .triton_loss import triton_chunk_loss_and_grad

        return triton_chunk_loss_and_grad(z, labels, ids, logprobs, tail, counts, want_grad=want_grad, **kw)
    return chunk_loss_and_grad(z, labels, ids, logprobs, tail, counts, want_grad=want_grad, may_overwrite=True,
                               target=target, **kw)


class FusedLinearDistillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ids, logprobs, tail, counts, mode, ce_weight, kl_weight,
                temperature, ignore_index, chunk_size):
        n = hidden.shape[0]
        vocab = weight.shape[0]
        counted = labels != ignore_index
        num = counted.sum()
        z_dtype = torch.result_type(hidden, weight)
        acc = torch.float64 if z_dtype == torch.float64 else torch.float32  # accumulation / work dtype
        row_scale = 1.0 / num.clamp_min(1).to(acc)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        want_grad = need_h or need_w or need_b
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) if need_b else None
        rows = chunk_size or default_fused_rows(vocab, n)
        ce_sum = torch.zeros((), dtype=acc, device=hidden.device)
        kl_sum = torch.zeros((), dtype=acc, device=hidden.device)
        target = None if hidden.is_cuda else batch_target(
            hidden.new_empty(0, vocab, dtype=z_dtype), labels, ids, logprobs, tail, counts, mode, temperature,
            ignore_index)
        # one logits buffer reused by every chunk: fresh [c, V] allocations page-fault on every chunk
        z_buf = torch.empty(min(rows, n), vocab, dtype=z_dtype, device=hidden.device)
        for start in range(0, n, rows):
            sl = slice(start, min(n, start + rows))
            h_c = hidden[sl]
            z = z_buf[: h_c.shape[0]]
            torch.mm(h_c, weight.t(), out=z)
            if bias is not None:
                z.add_(bias)
            ce_c, kl_c, g = _chunk_grad(
                z, labels[sl], ids[sl],
                None if logprobs is None else logprobs[sl],
                None if tail is None else tail[sl],
                None if counts is None else counts[sl],
                want_grad=want_grad, mode=mode, ce_weight=ce_weight, kl_weight=kl_weight, temperature=temperature,
                ignore_index=ignore_index, row_scale=row_scale,
                target=None if target is None else slice_target(target, sl))
            ce_sum += ce_c
            kl_sum += kl_c
            if not want_grad:
                continue
            if need_h:
                torch.mm(g.to(weight.dtype), weight, out=grad_h[sl])
            if need_w or need_b:
                g_acc = g.to(acc)  # no copy on the CPU path (already in acc); dW accumulates in fp32 (fp64 for fp64)
                if need_w:
                    grad_w.addmm_(g_acc.t(), h_c.to(acc))
                if need_b:
                    grad_b.add_(g_acc.sum(0))
                del g_acc
            del g
        del z_buf
        ce = ce_sum * row_scale
        kl = kl_sum * row_scale
        total = ce_weight * ce + kl_weight * kl
        keep_gradients(ctx, grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                       grad_b.to(bias.dtype) if grad_b is not None else None)
        ctx.flags = (need_h, need_w, need_b)
        ctx.mark_non_differentiable(ce, kl, num)
        return total, ce, kl, num

    @staticmethod
    def backward(ctx, grad_total, *unused):
        grads = [scaled_gradient(ctx, slot, grad_total) if flag else None for slot, flag in enumerate(ctx.flags)]
        return tuple(grads) + (None,) * 11


def fused_linear_distill_loss(
    hidden,
    weight,
    labels,
    teacher_ids,
    teacher_logprobs,
    tail=None,
    *,
    bias=None,
    counts=None,
    mode: str = "tail",
    ce_weight: float = 1.0,
    kl_weight: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    validate: bool | None = None,
) -> LossTerms:
    """distill_loss(hidden @ weight.T + bias, ...) without ever holding the [N, V] logits."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise LossInputError(
            f"fused_linear_distill_loss: hidden must be [N, H] and weight [V, H], got {list(hidden.shape)} and {list(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise LossInputError(f"fused_linear_distill_loss: bias must be [{weight.shape[0]}], got {list(bias.shape)}")
    tensors = [hidden, weight] + ([] if bias is None else [bias])
    if any(not t.dtype.is_floating_point for t in tensors) or len({t.dtype for t in tensors}) > 1:
        raise LossInputError("fused_linear_distill_loss: hidden, weight and bias must share one floating-point dtype, "
                             f"got {', '.join(str(t.dtype) for t in tensors)} (cast them, e.g. hidden.to(weight.dtype))")
    check_inputs((hidden.shape[0], weight.shape[0]), labels, teacher_ids, teacher_logprobs, tail, counts, mode,
                 temperature, ignore_index, "fused_linear_distill_loss",
                 check_values=(not hidden.is_cuda) if validate is None else validate)
    total, ce, kl, num = FusedLinearDistillFunction.apply(
        hidden, weight, bias, labels, teacher_ids, teacher_logprobs, tail, counts, mode, float(ce_weight),
        float(kl_weight), float(temperature), int(ignore_index), chunk_size)
    return LossTerms(total=total, ce=ce, kl=kl, hidden=torch.zeros((), device=hidden.device), num_tokens=num)
