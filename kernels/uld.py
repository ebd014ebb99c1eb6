"""ULD (Boizard et al. 2024) as a per-chunk backend: CE + the L1 distance between the student's sorted
probabilities and the teacher's cached top-k values and tail, a lower bound of the full sorted L1 (docs/library.md)."""

from __future__ import annotations

import torch

from .spec import LossSpec, Teacher

CHUNK_ELEMENTS = 1 << 22  # fp32 elements per working chunk
batch_target = None  # each chunk reads its rows' teacher values itself


def chunk_loss_and_grad(z, labels, teacher: Teacher, spec: LossSpec, row_scale, out=None, target=None):
    """Summed CE and ULD of a chunk of rows and (unless out is None) their fp32 gradient, scaled by row_scale."""
    z = z.float()
    counted = labels != spec.ignore_index
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    p = torch.exp(z - lse)
    y = torch.where(counted, labels.long(), 0)
    ce_sum = ((lse[:, 0] - z.gather(1, y[:, None])[:, 0]) * counted).double().sum()
    # teacher: sorted cached values (unused slots: -inf -> 0), its exact tail
    t = torch.nan_to_num(torch.exp(teacher.logprobs.float()), nan=0.0).sort(dim=1, descending=True).values
    t_tail = torch.nan_to_num(teacher.tail.float(), nan=0.0)
    kk = min(t.shape[1], z.shape[1])
    vals, idx = p.topk(kk, dim=1)                                     # sorted, largest first
    d_ranked = vals - t[:, :kk]
    d_tail = 1.0 - vals.sum(dim=1) - t_tail
    dist = d_ranked.abs().sum(1) + t[:, kk:].sum(1) + d_tail.abs()   # ranks beyond V: the student has 0
    w = (counted & (teacher.ids >= 0).any(dim=1)).float()
    uld_sum = (dist * w).double().sum()
    if out is None:
        return ce_sum, uld_sum, None
    # d dist / d s_(r) = sign(s_r - t_r) - sign(s_tail - t_tail); through softmax: p_j (g_j - <g, p>)
    g_p = torch.sign(d_ranked) - torch.sign(d_tail)[:, None]
    scale_u = spec.kl_weight * row_scale.float() * w
    g = -p * ((g_p * vals).sum(1) * scale_u)[:, None]
    g.scatter_add_(1, idx, vals * g_p * scale_u[:, None])
    scale_c = spec.ce_weight * row_scale.float() * counted.float()
    g += p * scale_c[:, None]
    g.scatter_add_(1, y[:, None], -scale_c[:, None])
    return ce_sum, uld_sum, g
