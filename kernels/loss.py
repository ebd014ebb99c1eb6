"""The entry points, each taking a Teacher and a LossSpec: distill_loss (logits), fused_linear_distill_loss (hidden
states and the output layer), uld_loss (cross-tokenizer), and the modules DistillLoss / LinearDistillLoss."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .function import DistillFunction, backend_for
from .hidden import HiddenProjector, add_hidden_term
from .spec import LossInputError, LossSpec, LossTerms, Teacher, check_inputs

DEFAULT = LossSpec()


def run_loss(x, weight, bias, labels, teacher: Teacher, spec: LossSpec, *, where: str, validate: bool | None,
             backend: str | None, inplace: bool = False, own_vocab: bool = True) -> LossTerms:
    """Check the inputs, then the one autograd path on the backend for x's device (or the one named)."""
    linear, tensors = weight is not None, [t for t in (x, weight, bias) if t is not None]
    if x.dim() != 2 or linear and (weight.dim() != 2 or x.shape[1] != weight.shape[1]):
        want = "hidden [N, H] and weight [V, H]" if linear else "logits [N, V]"
        raise LossInputError(f"{where}: {want} expected, got {' and '.join(str(list(t.shape)) for t in tensors)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise LossInputError(f"{where}: bias must be [{weight.shape[0]}], got {list(bias.shape)}")
    if any(not t.dtype.is_floating_point for t in tensors) or len({t.dtype for t in tensors}) > 1:
        names = "hidden, weight and bias" if linear else "logits"
        hint = " (cast them, e.g. hidden.to(weight.dtype))" if linear else ""
        raise LossInputError(f"{where}: {names} must share one floating-point dtype, got "
                             f"{', '.join(str(t.dtype) for t in tensors)}{hint}")
    vocab = x.shape[1] if weight is None else weight.shape[0]
    check_inputs((x.shape[0], vocab), labels, teacher, spec.mode, spec.ignore_index, where,
                 check_values=(not x.is_cuda) if validate is None else validate, own_vocab=own_vocab)
    total, ce, kl, num = DistillFunction.apply(x, weight, bias, labels, teacher, spec, backend_for(x.device, backend),
                                               bool(inplace))
    return LossTerms(total=total, ce=ce, kl=kl, hidden=torch.zeros((), device=x.device), num_tokens=num)


def distill_loss(logits, labels, teacher: Teacher, spec: LossSpec = DEFAULT, *, inplace: bool = False,
                 validate: bool | None = None, backend: str | None = None) -> LossTerms:
    """CE + sparse teacher KL over the counted rows (docs/kernels.md). inplace: the gradient overwrites the logits
    (saves one [N, V]); validate: value checks, a host sync (default: not on CUDA); backend: torch or triton."""
    return run_loss(logits, None, None, labels, teacher, spec, where="distill_loss", validate=validate,
                    backend=backend, inplace=inplace)


def fused_linear_distill_loss(hidden, weight, labels, teacher: Teacher, spec: LossSpec = DEFAULT, *, bias=None,
                              validate: bool | None = None, backend: str | None = None) -> LossTerms:
    """distill_loss(hidden @ weight.T + bias, ...) without ever holding the [N, V] logits."""
    return run_loss(hidden, weight, bias, labels, teacher, spec, where="fused_linear_distill_loss", validate=validate,
                    backend=backend)


def uld_loss(logits, labels, teacher: Teacher, spec: LossSpec = DEFAULT, *, validate: bool | None = None) -> LossTerms:
    """CE + spec.kl_weight * ULD (kernels/uld.py) over logits [N, V], rows aligned with the teacher's by the caller;
    the teacher's ids index its own vocabulary (a row with every id -1 has no teacher). terms.kl holds ULD."""
    return run_loss(logits, None, None, labels, teacher, replace(spec, mode="tail"), where="uld_loss",
                    validate=validate, backend="uld", own_vocab=False)


class DistillLoss(nn.Module):
    """total = ce_weight*CE + kl_weight*KL + hidden_weight*hidden from logits, the projector saved in state_dict."""

    def __init__(self, spec: LossSpec = DEFAULT, projector: HiddenProjector | None = None):
        super().__init__()
        if spec.hidden_weight and projector is None:
            raise LossInputError("DistillLoss: hidden_weight > 0 needs a HiddenProjector (projector=...)")
        self.spec = spec
        self.projector = projector

    def forward(self, logits, labels, teacher: Teacher, student_hidden=None, teacher_hidden=None) -> LossTerms:
        terms = distill_loss(logits, labels, teacher, self.spec)
        return add_hidden_term(terms, self.spec, self.projector, student_hidden, teacher_hidden,
                               mask=labels != self.spec.ignore_index)


class LinearDistillLoss(nn.Module):
    """The loss from hidden states [N, H] and the output layer's weight [V, H] (+ bias), never holding [N, V] logits."""

    def __init__(self, spec: LossSpec = DEFAULT):
        super().__init__()
        self.spec = spec

    def forward(self, hidden, weight, labels, teacher: Teacher, bias=None) -> LossTerms:
        return fused_linear_distill_loss(hidden, weight, labels, teacher, self.spec, bias=bias)
