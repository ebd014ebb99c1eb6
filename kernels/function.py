"""The one autograd path: forward computes loss and gradient chunk by chunk of rows (logits, or h W^T + b per chunk:
fused linear) on a per-chunk backend chosen once; backward only scales the stored gradient (docs/kernels.md)."""

from __future__ import annotations

import importlib

import torch

FUSED_CHUNK_ELEMENTS = 1 << 25  # 128 MB of fp32 logits per chunk: skinny chunks make the dW matmuls slow
BACKENDS = {"torch": "chunked", "triton": "triton_loss", "uld": "uld"}  # name -> module of this package


def backend_for(device: torch.device, name: str | None = None):
    """The per-chunk backend module by name (default: triton for CUDA tensors, else torch), imported on first use."""
    name = name or ("triton" if device.type == "cuda" else "torch")
    return importlib.import_module(f".{BACKENDS[name]}", __package__)


def chunk_rows(vocab: int, n: int, linear: bool, backend) -> int:
    """Rows per chunk when the spec gives none: a fixed fp32 budget (a multiple of 32 rows on the fused-linear path)."""
    if not linear and backend.CHUNK_ELEMENTS is None:  # the Triton logits path: every row in one launch
        return max(1, n)
    r = max(1, (FUSED_CHUNK_ELEMENTS if linear else backend.CHUNK_ELEMENTS) // max(vocab, 1))
    return max(1, min(n, r - r % 32 if linear and r >= 32 else r))


def _logits_io(x, want: bool, inplace: bool):
    """The logits path: chunk i is a slice of the logits, its gradient a slice of [N, V] (the logits when inplace)."""
    grad = None if not want else x if inplace else torch.empty_like(x, memory_format=torch.contiguous_format)

    def take(sl):
        z = x[sl]
        return z, None if grad is None else z if inplace else grad[sl]

    def put(sl, out, g):
        if g is not out:
            out.copy_(g)

    return take, put, lambda: (grad, None, None)


def _linear_io(h, w, b, need, rows: int, acc):
    """The fused-linear path: chunk i's logits h W^T + b are made in one reused buffer (fresh [c, V] allocations
    page-fault on every chunk); dL/dh = g W per chunk, dL/dW += g^T h and dL/db += sum g accumulate in acc."""
    grads = [torch.empty_like(h) if need[0] else None,
             torch.zeros(w.shape, dtype=acc, device=w.device) if need[1] else None,
             torch.zeros(w.shape[0], dtype=acc, device=w.device) if need[2] else None]
    buf = torch.empty(min(rows, h.shape[0]), w.shape[0], dtype=torch.result_type(h, w), device=h.device)

    def take(sl):
        z = torch.mm(h[sl], w.t(), out=buf[: sl.stop - sl.start])
        return (z if b is None else z.add_(b)), (z if any(need) else None)

    def put(sl, out, g):
        if need[0]:
            torch.mm(g.to(w.dtype), w, out=grads[0][sl])
        if need[1] or need[2]:
            g_acc = g.to(acc)  # no copy on the CPU path (already in acc); fp32 sums (fp64 for fp64)
            if need[1]:
                grads[1].addmm_(g_acc.t(), h[sl].to(acc))
            if need[2]:
                grads[2].add_(g_acc.sum(0))

    def result():  # dL/dW and dL/db back in the parameters' dtypes
        return grads[0], *(None if g is None else g.to(t.dtype) for g, t in zip(grads[1:], (w, b)))

    return take, put, result


class DistillFunction(torch.autograd.Function):
    """apply(x, weight, bias, labels, teacher, spec, backend, inplace) -> (total, ce, kl, counted rows);
    weight None: x is the logits [N, V]; else x is hidden states [N, H] and weight the output layer [V, H]."""

    @staticmethod
    def forward(ctx, x, weight, bias, labels, teacher, spec, backend, inplace):
        linear = weight is not None
        n, vocab = x.shape[0], (weight.shape[0] if linear else x.shape[1])
        z_dtype = torch.result_type(x, weight) if linear else x.dtype
        acc = torch.float64 if z_dtype == torch.float64 else torch.float32  # accumulation / work dtype
        num = (labels != spec.ignore_index).sum()
        row_scale = 1.0 / num.clamp_min(1).to(acc)
        rows = spec.chunk_size or chunk_rows(vocab, n, linear, backend)
        need = ctx.needs_input_grad[:3]
        take, put, grads = _linear_io(x, weight, bias, need, rows, acc) if linear else _logits_io(x, need[0], inplace)
        target = backend.batch_target and backend.batch_target(labels, teacher, spec, vocab, acc)
        ce_sum = torch.zeros((), dtype=acc, device=x.device)
        kl_sum = torch.zeros((), dtype=acc, device=x.device)
        for start in range(0, n, rows):
            sl = slice(start, min(n, start + rows))
            z, out = take(sl)
            ce_c, kl_c, g = backend.chunk_loss_and_grad(z, labels[sl], teacher.rows(sl), spec, row_scale, out,
                                                        None if target is None else target.rows(sl))
            ce_sum += ce_c
            kl_sum += kl_c
            if g is not None:
                put(sl, out, g)
            del z, out, g
        del take, put  # the fused path's chunk buffer goes before dL/dW is cast
        ce, kl = ce_sum * row_scale, kl_sum * row_scale
        keep_gradients(ctx, *grads())
        ctx.mark_non_differentiable(ce, kl, num)
        return spec.ce_weight * ce + spec.kl_weight * kl, ce, kl, num

    @staticmethod
    def backward(ctx, grad_total, *unused):
        grads = [None if g is None else scaled_gradient(ctx, i, grad_total) for i, g in enumerate(ctx.grads)]
        return (*grads, None, None, None, None, None)


def scaled_gradient(ctx, slot: int, grad_total: torch.Tensor) -> torch.Tensor:
    """The gradient stored in forward times the upstream gradient, in place and without a host sync; a later
    backward (retain_graph) rescales a copy, or refuses once the buffer changed (docs/kernels.md)."""
    grad = ctx.grads[slot]
    applied = ctx.applied[slot]
    if applied is None:
        if grad_total.device.type == "cpu" and bool(grad_total == 1):
            ctx.applied[slot] = grad_total.new_ones(())
            out = grad.view_as(grad)  # a fresh alias: autograd can adopt it without a copy
        else:
            ctx.applied[slot] = grad_total.detach().clone()
            out = grad.mul_(grad_total.to(grad.dtype)).view_as(grad)
        ctx.versions[slot] = grad._version
        return out
    if grad._version != ctx.versions[slot]:
        raise RuntimeError("fastkd loss: a later backward through the same graph (retain_graph=True) after the first "
                           "one's gradient was accumulated into or modified in place (e.g. a third backward, or "
                           "zero_grad(set_to_none=False)) cannot be computed from the stored buffer; recompute the "
                           "loss, or backward once through the sum of the losses")
    if bool(applied == 0):  # a later backward only (retain_graph): one sync there is fine
        raise RuntimeError("fastkd loss: a second backward through a graph whose first backward had a zero upstream "
                           "gradient cannot be rescaled (the stored gradient was zeroed in place)")
    return grad * (grad_total / applied).to(grad.dtype)


def keep_gradients(ctx, *grads) -> None:
    """Store forward-computed gradients for `scaled_gradient` (as attributes: scaled in place later, which
    save_for_backward's version check would refuse on a second backward)."""
    ctx.grads = list(grads)
    ctx.applied = [None] * len(grads)
    ctx.versions = [None] * len(grads)
