"""Public entry points: distill_loss (dispatch: Triton on CUDA, chunked PyTorch on CPU) and DistillLoss."""

from __future__ import annotations

import torch
from torch import nn

from .chunked import chunked_distill_loss
from .hidden import HiddenProjector
from .terms import LossTerms
from .validate import LossInputError, check_inputs


def distill_loss(
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
    validate: bool | None = None,
) -> LossTerms:
    """CE + sparse teacher KL, mean over rows whose label != ignore_index; see docs/kernels.md.

    inplace=True lets the gradient overwrite the logits buffer (saves one [N, V]; logits are garbage after).
    validate: check teacher values for NaN/ranges (a host sync); default on CPU only.
    """
    if logits.dim() != 2:
        raise LossInputError(f"distill_loss: logits must be [N, V], got shape {list(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise LossInputError(f"distill_loss: logits must be a floating-point tensor, got {logits.dtype}")
    if logits.is_cuda:
        from .triton_loss import triton_distill_loss

        check_inputs(tuple(logits.shape), labels, teacher_ids, teacher_logprobs, tail, counts, mode,
                     temperature, ignore_index, "distill_loss", check_values=bool(validate))
        return triton_distill_loss(
            logits, labels, teacher_ids, teacher_logprobs, tail, counts=counts, mode=mode, ce_weight=ce_weight,
            kl_weight=kl_weight, temperature=temperature, ignore_index=ignore_index, inplace=inplace)
    return chunked_distill_loss(
        logits, labels, teacher_ids, teacher_logprobs, tail, counts=counts, mode=mode, ce_weight=ce_weight,
        kl_weight=kl_weight, temperature=temperature, ignore_index=ignore_index, chunk_size=chunk_size,
        inplace=inplace, validate=True if validate is None else validate)


class DistillLoss(nn.Module):
    """total = ce_weight*CE + kl_weight*KL + hidden_weight*hidden, the projector saved in state_dict."""

    def __init__(self, mode: str = "tail", ce_weight: float = 1.0, kl_weight: float = 1.0, hidden_weight: float = 0.0,
                 temperature: float = 1.0, ignore_index: int = -100, projector: HiddenProjector | None = None):
        super().__init__()
        if hidden_weight and projector is None:
            raise LossInputError("DistillLoss: hidden_weight > 0 needs a HiddenProjector (projector=...)")
        self.mode = mode
        self.ce_weight = ce_weight
        self.kl_weight = kl_weight
        self.hidden_weight = hidden_weight
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.projector = projector

    def forward(self, logits, labels, teacher_ids, teacher_logprobs, tail=None, counts=None,
                student_hidden=None, teacher_hidden=None) -> LossTerms:
        terms = distill_loss(logits, labels, teacher_ids, teacher_logprobs, tail, counts=counts, mode=self.mode,
                             ce_weight=self.ce_weight, kl_weight=self.kl_weight, temperature=self.temperature,
                             ignore_index=self.ignore_index)
        if self.hidden_weight and self.projector is not None:
            if student_hidden is None or teacher_hidden is None:
                raise LossInputError("DistillLoss: hidden_weight > 0 but student_hidden / teacher_hidden were not given")
            hidden = self.projector(student_hidden, teacher_hidden, mask=labels != self.ignore_index)
            terms.total = terms.total + self.hidden_weight * hidden.to(terms.total.dtype)
            terms.hidden = hidden.detach()
        return terms


class LinearDistillLoss(nn.Module):
    """The same loss from hidden states and the output layer's weight (`lm_head.weight`, + bias): the
    fused linear path, which never holds the [N, V] logits. forward(hidden [N, H], weight [V, H], labels, ...)."""

    def __init__(self, mode: str = "tail", ce_weight: float = 1.0, kl_weight: float = 1.0, temperature: float = 1.0,
                 ignore_index: int = -100, chunk_size: int | None = None):
        super().__init__()
        self.mode = mode
        self.ce_weight = ce_weight
        self.kl_weight = kl_weight
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size

    def forward(self, hidden, weight, labels, teacher_ids, teacher_logprobs, tail=None, counts=None,
                bias=None) -> LossTerms:
        from .fused_linear import fused_linear_distill_loss

        return fused_linear_distill_loss(hidden, weight, labels, teacher_ids, teacher_logprobs, tail, bias=bias,
                                         counts=counts, mode=self.mode, ce_weight=self.ce_weight,
                                         kl_weight=self.kl_weight, temperature=self.temperature,
                                         ignore_index=self.ignore_index, chunk_size=self.chunk_size)
