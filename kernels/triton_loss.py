"""Triton kernel: CE + sparse KL per row in two passes over the logits, gradient written in place.

One program per row. Pass 1 reads z once for the online log-sum-exp (at tau = 1 and at tau).
Between the passes the <= k+1 sparse entries (top-k ids, label) are gathered and the row's
loss and gradient constant c are computed in fp32. Pass 2 writes g_j = a*exp(z_j - m) +
b*exp((z_j - m)/tau) over the whole row (into the logits buffer when inplace), then the sparse
entries are overwritten with their exact fp32 values. Losses go to per-row fp32 buffers and
are summed on the device: no host synchronisation. Row offsets are int64.

Runs under TRITON_INTERPRET=1 on CPU tensors (tests): values are cast to fp32 right after
tl.load, there is no tl.dot and no autotune (block sizes come from a heuristic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .terms import LossTerms
from .validate import TAIL_FLOOR

MODE_IDS = {"tail": 0, "renorm": 1, "sampled": 2}



@triton.jit
def _distill_rows_kernel(
    z_ptr, z_stride, g_ptr, g_stride,
    labels_ptr, ids_ptr, ids_stride, lp_ptr, lp_stride, tail_ptr, counts_ptr, counts_stride,
    ce_out_ptr, kl_out_ptr, scale_ptr,
    V, K, ignore_index, ce_weight, kl_weight, tau, inv_tau, tail_floor,
    MODE: tl.constexpr, HAS_GRAD: tl.constexpr, TEMPERED: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    label = tl.load(labels_ptr + row)
    counted = label != ignore_index
    y = tl.where(counted, label, 0)

    # ---- pass 1: online max and sums of exp(z - m) and exp((z - m)/tau)
    m = tl.full((), -3.0e38, tl.float32)  # finite, so exp(m_old - m_new) never sees inf - inf
    s1 = tl.full((), 0.0, tl.float32)
    st = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s1 = s1 * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        if TEMPERED:
            st = st * tl.exp((m - m_new) * inv_tau) + tl.sum(tl.exp((x - m_new) * inv_tau), 0)
        m = m_new
    if not TEMPERED:
        st = s1

    # ---- the sparse entries: top-k ids and the label
    koffs = tl.arange(0, BLOCK_K)
    ids = tl.load(ids_ptr + row * ids_stride + koffs, mask=koffs < K, other=-1)
    ids = tl.where(counted, ids, -1)  # padding rows read no teacher data
    valid = ids >= 0
    z_k = tl.load(z_row + ids, mask=valid, other=0.0).to(tl.float32)
    z_y = tl.load(z_row + y).to(tl.float32)
    if MODE == 2:
        cnt = tl.load(counts_ptr + row * counts_stride + koffs, mask=valid, other=0).to(tl.float32)
        same = (ids[:, None] == ids[None, :]) & valid[:, None] & valid[None, :]
        merged = tl.sum(tl.where(same, cnt[None, :], 0.0), 1)
        earlier = tl.sum((same & (koffs[None, :] < koffs[:, None])).to(tl.int32), 1)
        first = valid & (earlier == 0) & (merged > 0)
        score = tl.where(first, tl.log(tl.maximum(merged, 1e-30)) * inv_tau, float("-inf"))
    else:
        first = valid
        lp = tl.load(lp_ptr + row * lp_stride + koffs, mask=valid, other=0.0).to(tl.float32)
        score = tl.where(valid, lp * inv_tau, float("-inf"))
    top = tl.max(score, 0)
    if MODE == 0:
        p_tail = tl.minimum(tl.maximum(tl.load(tail_ptr + row).to(tl.float32), 0.0), 1.0)
        outside = tl.maximum(V - tl.sum(valid.to(tl.int32), 0), 1).to(tl.float32)
        tail_score = tl.where(p_tail > 0, tl.log(tl.maximum(p_tail, 1e-30)) * inv_tau + (1.0 - inv_tau) * tl.log(outside),
                              float("-inf"))
        top = tl.maximum(top, tail_score)
    top = tl.where(top == float("-inf"), 0.0, top)
    z_sum = tl.sum(tl.where(first, tl.exp(score - top), 0.0), 0)
    if MODE == 0:
        z_sum += tl.where(tail_score == float("-inf"), 0.0, tl.exp(tail_score - top))
    log_z = tl.where(z_sum > 0, top + tl.log(tl.where(z_sum > 0, z_sum, 1.0)), 0.0)
    w = tl.where(first, tl.exp(score - log_z), 0.0)
    log_w = tl.where(w > 0, score - log_z, 0.0)

    # ---- losses (fp32)
    log_st = tl.log(st)
    log_q_k = (z_k - m) * inv_tau - log_st
    q_k = tl.exp((z_k - m) * inv_tau) / st
    kl = tl.sum(tl.where(w > 0, w * (log_w - log_q_k), 0.0), 0)
    c = 1.0
    if MODE == 0:
        q_tail = tl.maximum(1.0 - tl.sum(tl.where(first, q_k, 0.0), 0), tail_floor)
        w_tail = tl.where(tail_score == float("-inf"), 0.0, tl.exp(tail_score - log_z))
        kl += tl.where(w_tail > 0, w_tail * (tl.log(tl.maximum(w_tail, 1e-38)) - tl.log(q_tail)), 0.0)
        c = 1.0 - w_tail / q_tail
    kl = kl * tau * tau
    ce = m + tl.log(s1) - z_y
    tl.store(ce_out_ptr + row, tl.where(counted, ce, 0.0))
    tl.store(kl_out_ptr + row, tl.where(counted, kl, 0.0))

    if HAS_GRAD:
        # ---- pass 2: g = scale*(ce_w*q1 + kl_w*tau*c*q_tau) everywhere
        scale = tl.where(counted, tl.load(scale_ptr).to(tl.float32), 0.0)
        a = scale * ce_weight / s1
        b = scale * kl_weight * tau * c / st
        g_row = g_ptr + row * g_stride
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            x = tl.load(z_row + offs, mask=offs < V, other=0.0).to(tl.float32)
            if TEMPERED:
                g = a * tl.exp(x - m) + b * tl.exp((x - m) * inv_tau)
            else:
                g = (a + b) * tl.exp(x - m)
            tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=offs < V)
        tl.debug_barrier()  # the fix-ups below overwrite entries written above
        # ---- fix-ups in fp32: inside K the KL part is tau*(q_j - w_j); the label gets -ce_w
        if MODE == 2:
            w_all = tl.sum(tl.where(same, w[None, :], 0.0), 1)  # repeated ids all carry the merged weight
        else:
            w_all = w
        is_y = (ids == y) & valid
        q1_k = tl.exp(z_k - m) / s1
        g_k = scale * (ce_weight * (q1_k - is_y.to(tl.float32)) + kl_weight * tau * (q_k - w_all))
        tl.store(g_row + ids, g_k.to(g_ptr.dtype.element_ty), mask=valid)
        y_in_k = tl.sum(is_y.to(tl.int32), 0) > 0
        w_y = tl.sum(tl.where(is_y, w, 0.0), 0)
        q1_y = tl.exp(z_y - m) / s1
        qt_y = tl.exp((z_y - m) * inv_tau) / st
        g_y = scale * (ce_weight * (q1_y - 1.0) + kl_weight * tau * (qt_y * tl.where(y_in_k, 1.0, c) - w_y))
        tl.store(g_row + y, g_y.to(g_ptr.dtype.element_ty), mask=counted)


def _blocks(vocab: int, k: int, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_V, BLOCK_K, num_warps): a fixed heuristic, no autotune (it fails in the interpreter)."""
    block_v = min(triton.next_power_of_2(max(vocab, 16)), 256 if interpret else 4096)
    block_k = max(2, triton.next_power_of_2(max(k, 1)))
    num_warps = 4 if block_v <= 1024 else (8 if block_v <= 2048 else 16)
    return block_v, block_k, num_warps


def launch_rows(z, grad, labels, ids, logprobs, tail, counts, *, mode, ce_weight, kl_weight, temperature,
                ignore_index, row_scale):
    """Run the kernel over every row of z; returns per-row (ce, kl) fp32. grad may be z (in place) or None."""
    import os

    n, vocab = z.shape
    k = ids.shape[1]
    ce_rows = torch.zeros(n, dtype=torch.float32, device=z.device)
    kl_rows = torch.zeros(n, dtype=torch.float32, device=z.device)
    if n == 0:
        return ce_rows, kl_rows
    ids = ids.contiguous()
    dummy = ce_rows
    lp = logprobs.contiguous() if (mode != "sampled" and logprobs is not None) else dummy
    tl_ = tail.contiguous() if (mode == "tail" and tail is not None) else dummy
    cn = counts.contiguous() if (mode == "sampled" and counts is not None) else ids
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    block_v, block_k, num_warps = _blocks(vocab, k, interpret)
    scale = row_scale.reshape(1).to(torch.float32)
    g = grad if grad is not None else z
    _distill_rows_kernel[(n,)](
        z, z.stride(0), g, g.stride(0),
        labels.contiguous(), ids, ids.stride(0), lp, lp.stride(0) if lp is not dummy else 0, tl_,
        cn, cn.stride(0), ce_rows, kl_rows, scale,
        vocab, k, int(ignore_index), float(ce_weight), float(kl_weight), float(temperature),
        1.0 / float(temperature), TAIL_FLOOR,
        MODE=MODE_IDS[mode], HAS_GRAD=grad is not None, TEMPERED=float(temperature) != 1.0,
        BLOCK_V=block_v, BLOCK_K=block_k, num_warps=num_warps,
    )
    return ce_rows, kl_rows


def triton_chunk_loss_and_grad(z, labels, ids, logprobs, tail, counts, *, mode, ce_weight, kl_weight, temperature,
                               ignore_index, row_scale, want_grad):
    """Same contract as chunked.chunk_loss_and_grad, but the gradient overwrites z (z's dtype)."""
    z = z if z.stride(1) == 1 else z.contiguous()
    ce_rows, kl_rows = launch_rows(z, z if want_grad else None, labels, ids, logprobs, tail, counts, mode=mode,
                                   ce_weight=ce_weight, kl_weight=kl_weight, temperature=temperature,
                                   ignore_index=ignore_index, row_scale=row_scale)
    return ce_rows.sum(), kl_rows.sum(), (z if want_grad else None)


class TritonDistillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ids, logprobs, tail, counts, mode, ce_weight, kl_weight, temperature,
                ignore_index, inplace):
        num = (labels != ignore_index).sum()
        row_scale = 1.0 / num.clamp_min(1).float()
        want_grad = ctx.needs_input_grad[0]
        z = logits if logits.stride(1) == 1 else logits.contiguous()
        grad = None
        if want_grad:
            grad = z if (inplace and z is logits) else torch.empty_like(z)
        ce_rows, kl_rows = launch_rows(z, grad, labels, ids, logprobs, tail, counts, mode=mode, ce_weight=ce_weight,
                                       kl_weight=kl_weight, temperature=temperature, ignore_index=ignore_index,
                                       row_scale=row_scale)
        ce = ce_rows.sum() * row_scale
        kl = kl_rows.sum() * row_scale
        total = ce_weight * ce + kl_weight * kl
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        ctx.mark_non_differentiable(ce, kl, num)
        return total, ce, kl, num

    @staticmethod
    def backward(ctx, grad_total, *unused):
        (grad,) = ctx.saved_tensors
        if grad.numel() == 0:
            return (None,) * 12
        if not bool(grad_total == 1):  # one scalar sync in backward, saves a full pass when it is 1
            grad = grad * grad_total.to(grad.dtype)
        return (grad.view_as(grad),) + (None,) * 11  # a fresh alias: autograd can adopt it without a copy


def triton_distill_loss(logits, labels, teacher_ids, teacher_logprobs, tail=None, *, counts=None, mode="tail",
                        ce_weight=1.0, kl_weight=1.0, temperature=1.0, ignore_index=-100, inplace=False) -> LossTerms:
    """The Triton path of distill_loss (inputs already checked by the caller)."""
    total, ce, kl, num = TritonDistillFunction.apply(
        logits, labels, teacher_ids, teacher_logprobs, tail, counts, mode, float(ce_weight), float(kl_weight),
        float(temperature), int(ignore_index), bool(inplace))
    return LossTerms(total=total, ce=ce, kl=kl, hidden=torch.zeros((), device=logits.device), num_tokens=num)
