"""ULD (Boizard et al. 2024): CE + the L1 distance between sorted probability vectors, from a top-k cache.

Per row with a teacher: `sum_{r<=k} |s_(r) - t_(r)| + |(1 - sum_{r<=k} s_(r)) - t_tail|`, with `s_(r)` the
student's r-th largest probability over its own vocabulary (0 beyond V) and `t_(r)` the teacher's cached
top-k values, sorted. A lower bound of the full sorted L1 (exact when the ranks beyond k match). Rows are
aligned by index by the caller; rows without a teacher (all teacher ids -1) add 0. Both terms are means over
the counted rows (label != ignore_index). The gradient is computed in forward, chunk by chunk of rows.
"""

from __future__ import annotations

import torch

from .terms import LossTerms


def _chunk_rows(v: int, chunk_size: int | None) -> int:
    return max(1, int(chunk_size) if chunk_size else (1 << 22) // max(v, 1))


def _forward(logits, labels, teacher_logprobs, tail, has_teacher, ce_weight, uld_weight, ignore_index, chunk_size):
    n_rows, v = logits.shape
    k = teacher_logprobs.shape[1]
    counted = labels != ignore_index
    n = max(int(counted.sum()), 1)
    grad = torch.zeros_like(logits)
    ce_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
    uld_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
    kk = min(k, v)
    step = _chunk_rows(v, chunk_size)
    for start in range(0, n_rows, step):
        rows = slice(start, min(start + step, n_rows))
        z = logits[rows].float()
        cnt = counted[rows]
        lse = torch.logsumexp(z, dim=1, keepdim=True)
        p = torch.exp(z - lse)
        y = torch.where(cnt, labels[rows], 0)
        ce_rows = (lse[:, 0] - z.gather(1, y[:, None])[:, 0]) * cnt
        ce_sum += ce_rows.double().sum()
        # teacher: sorted cached values (unused slots: -inf -> 0), its exact tail
        t = torch.nan_to_num(torch.exp(teacher_logprobs[rows].float()), nan=0.0).sort(dim=1, descending=True).values
        t_tail = torch.nan_to_num(tail[rows].float(), nan=0.0)
        vals, idx = p.topk(kk, dim=1)                                     # sorted, largest first
        s_tail = 1.0 - vals.sum(dim=1)
        d_ranked = vals - t[:, :kk]
        d_tail = s_tail - t_tail
        dist = d_ranked.abs().sum(1) + t[:, kk:].sum(1) + d_tail.abs()   # ranks beyond V: the student has 0
        w = (cnt & has_teacher[rows]).float()
        uld_sum += (dist * w).double().sum()
        # d dist / d s_(r) = sign(s_r - t_r) - sign(s_tail - t_tail); through softmax: p_j (g_j - <g, p>)
        g_p = torch.sign(d_ranked) - torch.sign(d_tail)[:, None]
        scale_u = (uld_weight / n) * w
        c = (g_p * vals).sum(1)
        g = -p * (c * scale_u)[:, None]
        g.scatter_add_(1, idx, vals * g_p * scale_u[:, None])
        scale_c = (ce_weight / n) * cnt.float()
        g += p * scale_c[:, None]
        g.scatter_add_(1, y[:, None], -scale_c[:, None])
        grad[rows] = g.to(grad.dtype)
    ce = (ce_sum / n).float()
    uld = (uld_sum / n).float()
    return ce_weight * ce + uld_weight * uld, ce, uld, grad


class _ULDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, teacher_logprobs, tail, has_teacher, ce_weight, uld_weight, ignore_index,
                chunk_size):
        total, ce, uld, grad = _forward(logits.detach(), labels, teacher_logprobs, tail, has_teacher, ce_weight,
                                        uld_weight, ignore_index, chunk_size)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce, uld)
        return total, ce, uld

    @staticmethod
    def backward(ctx, g_total, g_ce, g_uld):
        (grad,) = ctx.saved_tensors
        return (grad * g_total.to(grad.dtype),) + (None,) * 8


def uld_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logprobs: torch.Tensor, tail: torch.Tensor, *,
             teacher_ids: torch.Tensor | None = None, has_teacher: torch.Tensor | None = None, ce_weight: float = 1.0,
             uld_weight: float = 1.0, ignore_index: int = -100, chunk_size: int | None = None) -> LossTerms:
    """CE + uld_weight * ULD over `logits` [N, V] (rows aligned with the teacher rows by the caller).
    A row has a teacher where `has_teacher` (default: any teacher id >= 0); `terms.kl` holds the ULD term."""
    if logits.dim() != 2 or teacher_logprobs.dim() != 2 or teacher_logprobs.shape[0] != logits.shape[0]:
        raise ValueError(f"uld_loss: logits [N, V] and teacher_logprobs [N, k] expected, got "
                         f"{list(logits.shape)} and {list(teacher_logprobs.shape)}")
    if has_teacher is None:
        has_teacher = (teacher_ids >= 0).any(dim=1) if teacher_ids is not None else \
            torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    counted = int((labels != ignore_index).sum())
    total, ce, uld = _ULDLoss.apply(logits, labels, teacher_logprobs, tail, has_teacher.bool(), float(ce_weight),
                                    float(uld_weight), int(ignore_index), chunk_size)
    zero = torch.zeros((), device=logits.device)
    return LossTerms(total=total, ce=ce.detach(), kl=uld.detach(), hidden=zero, num_tokens=counted)
