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
