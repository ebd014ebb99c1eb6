"""What every loss entry point takes and returns: the settings, the teacher's rows, the terms; and the input checks
they share, so bad teacher data fails loudly (LossInputError), never as NaN."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

MODES = ("tail", "renorm", "sampled")
MASS_SLACK = 1e-2  # top-k + tail may exceed 1 by rounding (bf16 log-probs: about 1e-3), never by more


class LossInputError(ValueError):
    """The loss was given inputs it cannot score (shapes, ranges, NaN in teacher values)."""


@dataclass(frozen=True)
class LossSpec:
    """The loss settings, all in one place: total = ce_weight*CE + kl_weight*KL + hidden_weight*hidden; mode tail,
    renorm or sampled (docs/kernels.md); chunk_size: rows per chunk (None or 0: sized from V and the path)."""

    mode: str = "tail"
    ce_weight: float = 1.0
    kl_weight: float = 1.0
    hidden_weight: float = 0.0
    temperature: float = 1.0
    ignore_index: int = -100
    chunk_size: int | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise LossInputError(f"LossSpec: mode must be one of {MODES}, got {self.mode!r}")
        if not 0 < float(self.temperature) < float("inf"):
            raise LossInputError(f"LossSpec: temperature must be finite and > 0, got {self.temperature}")
        if self.chunk_size is not None and int(self.chunk_size) < 0:
            raise LossInputError(f"LossSpec: chunk_size must be >= 0 or None, got {self.chunk_size}")


@dataclass(frozen=True)
class Teacher:
    """The teacher's target per loss row: top-k (or sampled) ids [N, k] (-1: unused slot), their log-probs
    [N, k] (modes tail/renorm), the exact tail mass [N] (mode tail), the draw counts [N, k] (mode sampled)."""

    ids: torch.Tensor
    logprobs: torch.Tensor | None = None
    tail: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    def rows(self, sl: slice) -> "Teacher":
        """The teacher of a chunk of rows."""
        return Teacher(*(None if t is None else t[sl] for t in (self.ids, self.logprobs, self.tail, self.counts)))

    def only(self, keep: torch.Tensor) -> "Teacher":
        """The same rows with every id dropped (-1) where `keep` [N] is false: rows that read no teacher data."""
        return replace(self, ids=torch.where(keep[:, None], self.ids.long(), -1))


@dataclass
class LossTerms:
    """total = ce_weight*ce + kl_weight*kl + hidden_weight*hidden; the terms are detached (for logging)."""

    total: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    hidden: torch.Tensor
    num_tokens: int | torch.Tensor  # rows that counted (label != ignore_index)


def _fail(where: str, mask: torch.Tensor, message) -> None:
    """Raise LossInputError(message(the first bad row)) when any row of `mask` is set."""
    if mask.any():
        raise LossInputError(f"{where}: {message(int(mask.reshape(mask.shape[0], -1).any(dim=1).nonzero()[0, 0]))}")


def check_inputs(shape: tuple[int, int], labels, teacher: Teacher, mode: str, ignore_index: int, where: str,
                 check_values: bool = True, own_vocab: bool = True) -> None:
    """Raise LossInputError naming the field and row; check_values=False: shapes only (no host sync on CUDA).
    own_vocab=False: the teacher's ids index another vocabulary (ULD), so they are not checked against V."""
    (n, v), ids, lp, tail, counts = shape, teacher.ids, teacher.logprobs, teacher.tail, teacher.counts
    if v < 1:
        raise LossInputError(f"{where}: the vocabulary is empty (logits have V={v} columns)")
    if labels.shape != (n,):
        raise LossInputError(f"{where}: labels must have shape [{n}], got {list(labels.shape)}")
    if ids.dim() != 2 or ids.shape[0] != n:
        raise LossInputError(f"{where}: teacher.ids must have shape [{n}, k], got {list(ids.shape)}")
    if ids.dtype.is_floating_point or labels.dtype.is_floating_point:
        raise LossInputError(f"{where}: labels and teacher.ids must be integer tensors")
    if mode == "sampled" and (counts is None or counts.shape != ids.shape):
        raise LossInputError(f"{where}: mode='sampled' needs teacher.counts {list(ids.shape)} (how often each sampled "
                             f"id was drawn), got {None if counts is None else list(counts.shape)}")
    if mode != "sampled" and (lp is None or lp.shape != ids.shape):
        raise LossInputError(f"{where}: teacher.logprobs must have shape {list(ids.shape)}, got "
                             f"{None if lp is None else list(lp.shape)}")
    if mode != "sampled" and own_vocab and ids.shape[1] > v:
        raise LossInputError(f"{where}: k={ids.shape[1]} teacher ids per row but the vocabulary has only V={v} "
                             f"entries (mode={mode!r})")
    if mode == "tail" and (tail is None or tail.shape != (n,)):
        raise LossInputError(f"{where}: mode='tail' needs teacher.tail [{n}] (the exact teacher mass outside the "
                             f"top-k), got {None if tail is None else list(tail.shape)}")
    if not check_values or n == 0:
        return
    counted = labels != ignore_index  # padding rows may hold anything: they are never read
    _fail(where, counted & ((labels < 0) | (labels >= v)),
          lambda r: f"labels[{r}]={int(labels[r])} is outside [0, {v}) and is not ignore_index={ignore_index}")
    if own_vocab:
        _fail(where, counted[:, None] & ((ids < -1) | (ids >= v)),
              lambda r: f"teacher.ids row {r} has an id outside [-1, {v}) (-1 marks an unused slot)")
    valid = counted[:, None] & (ids >= 0)
    if mode == "sampled":
        return _fail(where, valid & ((counts < 0) | ~torch.isfinite(counts.double())),
                     lambda r: f"teacher.counts row {r} has a negative, infinite or NaN count")
    _fail(where, valid & (torch.isnan(lp) | (lp > 1e-4)),
          lambda r: f"teacher.logprobs row {r} has NaN or a log-prob > 0")
    if mode == "tail":
        _fail(where, counted & (torch.isnan(tail) | (tail < -1e-3) | (tail > 1 + 1e-3)),
              lambda r: f"teacher.tail[{r}]={float(tail[r])} is NaN or outside [0, 1]")
    if own_vocab:
        srt = ids.sort(dim=1).values
        _fail(where, counted[:, None] & (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0),
              lambda r: f"teacher.ids row {r} repeats an id; top-k ids must be unique in mode={mode!r}")
    mass = torch.where(valid, lp.double().exp(), 0.0).sum(dim=1)
    # all V ids in K: no tail bucket (docs/kernels.md); ids of another vocabulary (ULD) always keep it
    with_tail = (valid.sum(dim=1) < v) | (not own_vocab)
    if mode == "tail":
        mass = mass + torch.where(with_tail, tail.double(), 0.0)
    parts = lambda r: "top-k + tail" if mode == "tail" and bool(with_tail[r]) else "top-k"  # noqa: E731
    _fail(where, counted & (mass > 1 + MASS_SLACK),
          lambda r: f"row {r}'s teacher probabilities ({parts(r)}) sum to {float(mass[r]):.4g} > 1: teacher.logprobs "
                    "must be log-probabilities over the full vocabulary (log_softmax), not logits")
