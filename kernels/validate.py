"""Input checks shared by every loss implementation, so bad teacher data fails loudly, never as NaN."""

from __future__ import annotations

import torch

from fastkd.errors import UserError

MODES = ("tail", "renorm", "sampled")
MASS_SLACK = 1e-2  # top-k + tail may exceed 1 by rounding (bf16 log-probs: about 1e-3), never by more


class LossInputError(UserError):
    """The loss was given inputs it cannot score (shapes, ranges, NaN in teacher values)."""


def _first_bad_row(mask: torch.Tensor) -> int:
    rows = mask.reshape(mask.shape[0], -1).any(dim=1).nonzero()
    return int(rows[0, 0]) if rows.numel() else -1


def check_inputs(
    logits_shape: tuple[int, int],
    labels: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor | None,
    tail: torch.Tensor | None,
    counts: torch.Tensor | None,
    mode: str,
    temperature: float,
    ignore_index: int,
    where: str = "distill_loss",
    check_values: bool = True,
) -> None:
    """Raise LossInputError naming the field and row for anything the loss cannot score.

    check_values=False keeps only the shape checks (no host synchronisation on CUDA).
    """
    n, v = logits_shape
    if mode not in MODES:
        raise LossInputError(f"{where}: mode must be one of {MODES}, got {mode!r}")
    if not 0 < temperature < float("inf"):
        raise LossInputError(f"{where}: temperature must be finite and > 0, got {temperature}")
    if v < 1:
        raise LossInputError(f"{where}: the vocabulary is empty (logits have V={v} columns)")
    if labels.shape != (n,):
        raise LossInputError(f"{where}: labels must have shape [{n}], got {list(labels.shape)}")
    if teacher_ids.dim() != 2 or teacher_ids.shape[0] != n:
        raise LossInputError(f"{where}: teacher_ids must have shape [{n}, k], got {list(teacher_ids.shape)}")
    k = teacher_ids.shape[1]
    if teacher_ids.dtype.is_floating_point or labels.dtype.is_floating_point:
        raise LossInputError(f"{where}: labels and teacher_ids must be integer tensors")
    if mode == "sampled":
        if counts is None:
            raise LossInputError(f"{where}: mode='sampled' needs counts [N, k] (how often each sampled id was drawn)")
        if counts.shape != teacher_ids.shape:
            raise LossInputError(f"{where}: counts must have shape {list(teacher_ids.shape)}, got {list(counts.shape)}")
    else:
        if teacher_logprobs is None or teacher_logprobs.shape != teacher_ids.shape:
            got = None if teacher_logprobs is None else list(teacher_logprobs.shape)
            raise LossInputError(f"{where}: teacher_logprobs must have shape {list(teacher_ids.shape)}, got {got}")
        if k > v:
            raise LossInputError(f"{where}: k={k} teacher ids per row but the vocabulary has only V={v} entries (mode={mode!r})")
        if mode == "tail":
            if tail is None:
                raise LossInputError(f"{where}: mode='tail' needs tail [N] (the exact teacher mass outside the top-k)")
            if tail.shape != (n,):
                raise LossInputError(f"{where}: tail must have shape [{n}], got {list(tail.shape)}")
    if not check_values or n == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
    if bad.any():
        r = _first_bad_row(bad)
        raise LossInputError(f"{where}: labels[{r}]={int(labels[r])} is outside [0, {v}) and is not ignore_index={ignore_index}")
    counted = (labels != ignore_index)[:, None]  # padding rows may hold anything: they are never read
    bad = counted & ((teacher_ids < -1) | (teacher_ids >= v))
    if bad.any():
        r = _first_bad_row(bad)
        raise LossInputError(f"{where}: teacher_ids row {r} has an id outside [-1, {v}) (-1 marks an unused slot)")
    valid = counted & (teacher_ids >= 0)
    if mode == "sampled":
        c_bad = valid & ((counts < 0) | ~torch.isfinite(counts.double()))
        if c_bad.any():
            r = _first_bad_row(c_bad)
            raise LossInputError(f"{where}: counts row {r} has a negative, infinite or NaN count")
        return
    lp_bad = valid & (torch.isnan(teacher_logprobs) | (teacher_logprobs > 1e-4))
    if lp_bad.any():
        r = _first_bad_row(lp_bad)
        raise LossInputError(f"{where}: teacher_logprobs row {r} has NaN or a log-prob > 0")
    if mode == "tail":
        t_bad = counted[:, 0] & (torch.isnan(tail) | (tail < -1e-3) | (tail > 1 + 1e-3))
        if t_bad.any():
            r = _first_bad_row(t_bad)
            raise LossInputError(f"{where}: tail[{r}]={float(tail[r])} is NaN or outside [0, 1]")
    srt = teacher_ids.sort(dim=1).values
    dup = counted & (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if dup.any():
        r = _first_bad_row(dup)
        raise LossInputError(f"{where}: teacher_ids row {r} repeats an id; top-k ids must be unique in mode={mode!r}")
    mass = torch.where(valid, teacher_logprobs.double().exp(), 0.0).sum(dim=1)
    with_tail = valid.sum(dim=1) < v if mode == "tail" else None  # all V ids in K: no tail bucket (docs/kernels.md)
    if mode == "tail":
        mass = mass + torch.where(with_tail, tail.double(), 0.0)
    m_bad = counted[:, 0] & (mass > 1 + MASS_SLACK)
    if m_bad.any():
        r = _first_bad_row(m_bad)
        parts = "top-k + tail" if mode == "tail" and bool(with_tail[r]) else "top-k"
        raise LossInputError(f"{where}: row {r}'s teacher probabilities ({parts}) sum to {float(mass[r]):.4g} > 1: "
                             "teacher_logprobs must be log-probabilities over the full vocabulary (log_softmax), "
                             "not logits")
