"""Fused distillation loss: cross-entropy + sparse KL + hidden MSE (Triton on CUDA, PyTorch on CPU).

Triton is imported only when a CUDA tensor reaches the loss, so CPU users never load it.
"""

from .chunked import chunked_distill_loss
from .fused_linear import fused_linear_distill_loss
from .hidden import HiddenProjector
from .loss import DistillLoss, distill_loss
from .reference import reference_loss
from .terms import LossTerms
from .validate import LossInputError

__all__ = [
    "LossTerms",
    "distill_loss",
    "DistillLoss",
    "fused_linear_distill_loss",
    "HiddenProjector",
    "reference_loss",
    "chunked_distill_loss",
    "LossInputError",
]
