"""The value every loss entry point returns: the differentiable total and each term for logging."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossTerms:
    """total = ce_weight*ce + kl_weight*kl + hidden_weight*hidden; the terms are detached (for logging)."""

    total: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    hidden: torch.Tensor
    num_tokens: int | torch.Tensor  # rows that counted (label != ignore_index)


def scaled_gradient(ctx, slot: int, grad_total: torch.Tensor) -> torch.Tensor:
    """The gradient stored in forward (`ctx.grads[slot]`) times the upstream gradient, without a host sync.

    The first backward scales the stored buffer in place (no second [N, V] buffer, no comparison with 1
    on the device); on CPU a factor of exactly 1 is skipped (free to test there). A later backward
    through the same graph (retain_graph=True) rescales a copy by the ratio to the factor already applied,
    and refuses when the buffer changed after the first backward: autograd may have adopted it as a
    leaf's `.grad` and accumulated into it, and reading it again would silently give a wrong gradient.
    """
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
    """Store forward-computed gradients for `scaled_gradient` (as attributes: they are scaled in place later,
    which save_for_backward's version check would refuse on a second backward)."""
    ctx.grads = list(grads)
    ctx.applied = [None] * len(grads)
    ctx.versions = [None] * len(grads)
