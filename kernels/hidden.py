"""Hidden-state term: learned projections from student to teacher width, MSE normalised by width."""

from __future__ import annotations

import torch
from torch import nn

from .spec import LossInputError, LossSpec, LossTerms


class HiddenProjector(nn.Module):
    """One nn.Linear(d_s, d_t, bias=False) per mapped (student layer, teacher layer) pair; saved with the student."""

    def __init__(self, student_width: int, teacher_widths: list[int]):
        super().__init__()
        self.student_width = int(student_width)
        self.teacher_widths = [int(w) for w in teacher_widths]
        self.projections = nn.ModuleList(nn.Linear(self.student_width, w, bias=False) for w in self.teacher_widths)

    def forward(self, student_hidden: list, teacher_hidden: list, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over pairs of (mean over counted rows of ||P h_s - h_t||^2 / d_t); 0 when no row counts."""
        pairs = len(self.projections)
        if len(student_hidden) != pairs or len(teacher_hidden) != pairs:
            raise LossInputError(
                f"HiddenProjector: expected {pairs} student and teacher hidden tensors (one per mapped layer pair), "
                f"got {len(student_hidden)} and {len(teacher_hidden)}")
        terms = []
        for i, (proj, h_s, h_t) in enumerate(zip(self.projections, student_hidden, teacher_hidden)):
            if (h_s.shape[-1], h_t.shape[-1], h_s.shape[0]) != (self.student_width, proj.out_features, h_t.shape[0]):
                raise LossInputError(
                    f"HiddenProjector: pair {i}: student hidden {list(h_s.shape)} / teacher hidden {list(h_t.shape)} "
                    f"do not match widths {self.student_width} -> {proj.out_features} over the same rows")
            diff = proj(h_s.to(proj.weight.dtype)).float() - h_t.float()
            per_row = diff.pow(2).sum(-1) / proj.out_features
            m = torch.ones_like(per_row) if mask is None else mask.to(per_row.dtype)
            terms.append((per_row * m).sum() / m.sum().clamp_min(1.0))
        return torch.stack(terms).mean() if terms else torch.zeros(())


def add_hidden_term(terms: LossTerms, spec: LossSpec, projector: HiddenProjector | None, student_hidden,
                    teacher_hidden, mask: torch.Tensor | None = None) -> LossTerms:
    """terms + hidden_weight * projector(student_hidden, teacher_hidden): the hidden term's one home (DistillLoss and
    the trainer's student call it); no projector or a weight of 0 leaves the terms as they are."""
    if not spec.hidden_weight or projector is None:
        return terms
    if student_hidden is None or teacher_hidden is None:
        raise LossInputError("hidden_weight > 0 but student_hidden / teacher_hidden were not given")
    hidden = projector(student_hidden, teacher_hidden, mask=mask)
    terms.total = terms.total + spec.hidden_weight * hidden.to(terms.total.dtype)
    terms.hidden = hidden.detach()
    return terms
