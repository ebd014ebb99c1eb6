"""The Triton per-chunk backend (CUDA): one program per row, two passes over the logits, the gradient written
in the logits' dtype; the design, and what lets it run under TRITON_INTERPRET=1, are in docs/kernels.md."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .spec import LossSpec, Teacher

MODE_IDS = {"tail": 0, "renorm": 1, "sampled": 2}
CHUNK_ELEMENTS = None  # logits path: every row in one launch (no work copy to bound)
batch_target = None  # the kernel builds each row's teacher target itself


@triton.jit
def _complement_sums(z_row, V, inv_tau, TEMPERED: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 1 over the row (K entries read -inf): online max m_c and sums of exp(z - m_c), exp((z - m_c)/tau)."""
    m_c = tl.full((), -1.0e30, tl.float32)  # finite (and /tau stays finite), so exp(m_old - m_new) never sees inf - inf
    s_c1 = tl.full((), 0.0, tl.float32)
    s_ct = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_c, tl.max(x, 0))
        s_c1 = s_c1 * tl.exp(m_c - m_new) + tl.sum(tl.exp(x - m_new), 0)
        if TEMPERED:
            s_ct = s_ct * tl.exp((m_c - m_new) * inv_tau) + tl.sum(tl.exp((x - m_new) * inv_tau), 0)
        m_c = m_new
    if not TEMPERED:
        s_ct = s_c1
    return m_c, s_c1, s_ct


@triton.jit
def _teacher_weights(row, ids, valid, koffs, counted, lp_ptr, lp_stride, tail_ptr, counts_ptr, counts_stride, V,
                     inv_tau, MODE: tl.constexpr):
    """The teacher's weights at tau per slot (w, log w; w_all: the merged weight of the slot's id, repeated
    sampled ids included), whether the slot is its id's first (uniq), and the tail bucket's weight."""
    if MODE == 2:
        cnt = tl.load(counts_ptr + row * counts_stride + koffs, mask=valid, other=0).to(tl.float32)
        same = (ids[:, None] == ids[None, :]) & valid[:, None] & valid[None, :]
        merged = tl.sum(tl.where(same, cnt[None, :], 0.0), 1)
        earlier = tl.sum((same & (koffs[None, :] < koffs[:, None])).to(tl.int32), 1)
        uniq = valid & (earlier == 0)
        first = uniq & (merged > 0)
        score = tl.where(first, tl.log(tl.maximum(merged, 1e-30)) * inv_tau, float("-inf"))
    else:
        uniq = valid
        first = valid
        lp = tl.load(lp_ptr + row * lp_stride + koffs, mask=valid, other=0.0).to(tl.float32)
        score = tl.where(valid, lp * inv_tau, float("-inf"))
    top = tl.max(score, 0)
    if MODE == 0:
        p_tail = tl.load(tail_ptr + row).to(tl.float32)
        p_tail = tl.where(counted & (p_tail == p_tail), p_tail, 0.0)  # NaN / padding -> no tail
        p_tail = tl.minimum(tl.maximum(p_tail, 0.0), 1.0)
        n_out = V - tl.sum(valid.to(tl.int32), 0)
        outside = tl.maximum(n_out, 1).to(tl.float32)
        tail_score = tl.where((p_tail > 0) & (n_out > 0),
                              tl.log(tl.maximum(p_tail, 1e-30)) * inv_tau + (1.0 - inv_tau) * tl.log(outside),
                              float("-inf"))
        top = tl.maximum(top, tail_score)
    top = tl.where(top == float("-inf"), 0.0, top)
    z_sum = tl.sum(tl.where(first, tl.exp(score - top), 0.0), 0)
    if MODE == 0:
        z_sum += tl.where(tail_score == float("-inf"), 0.0, tl.exp(tail_score - top))
    log_z = tl.where(z_sum > 0, top + tl.log(tl.where(z_sum > 0, z_sum, 1.0)), 0.0)
    w = tl.where(first, tl.exp(score - log_z), 0.0)
    w_tail = tl.full((), 0.0, tl.float32)
    if MODE == 0:
        w_tail = tl.where(tail_score == float("-inf"), 0.0, tl.exp(tail_score - log_z))
    w_all = w
    if MODE == 2:
        w_all = tl.sum(tl.where(same, w[None, :], 0.0), 1)  # repeated ids all carry the merged weight
    return w, tl.where(w > 0, score - log_z, 0.0), w_all, uniq, w_tail


@triton.jit
def _write_gradient(z_row, g_row, ids, valid, y, z_k, z_y, w_all, q_k, counted, a, b, m, m_c, s1, scale, ce_weight,
                    kl_weight, tau, inv_tau, V, TEMPERED: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 2: g = a*exp(z - m_c) + b*exp((z - m_c)/tau) over the row (0 at the masked K entries), then the K
    entries and the label (if outside K) overwritten with their exact fp32 values."""
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        if TEMPERED:
            g = a * tl.exp(x - m_c) + b * tl.exp((x - m_c) * inv_tau)
        else:
            g = (a + b) * tl.exp(x - m_c)
        tl.store(g_row + offs, g.to(g_row.dtype.element_ty), mask=offs < V)
    tl.debug_barrier()  # the stores below overwrite entries written (and z entries read) above
    # K entries in full, in fp32: ce_w (q_j - [j=y]) + kl_w tau (q^tau_j - t_j)
    is_y = (ids == y) & valid
    q1_k = tl.exp(z_k - m) / s1
    g_k = scale * (ce_weight * (q1_k - is_y.to(tl.float32)) + kl_weight * tau * (q_k - w_all))
    tl.store(g_row + ids, g_k.to(g_row.dtype.element_ty), mask=valid)
    y_out_k = tl.sum(is_y.to(tl.int32), 0) == 0  # y in K: its entry was written just above
    d_y = tl.minimum(z_y - m_c, 0.0)  # y outside K is in the complement: z_y <= m_c (the clamp only spares
    g_y = a * tl.exp(d_y) + b * tl.exp(d_y * inv_tau) - scale * ce_weight  # an unused overflow when y in K)
    tl.store(g_row + y, g_y.to(g_row.dtype.element_ty), mask=counted & y_out_k)


@triton.jit
def _distill_rows_kernel(
    z_ptr, z_stride, g_ptr, g_stride,
    labels_ptr, ids_ptr, ids_stride, lp_ptr, lp_stride, tail_ptr, counts_ptr, counts_stride,
    ce_out_ptr, kl_out_ptr, scale_ptr,
    V, K, ignore_index, ce_weight, kl_weight, tau, inv_tau,
    MODE: tl.constexpr, HAS_GRAD: tl.constexpr, TEMPERED: tl.constexpr, INPLACE: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    label = tl.load(labels_ptr + row)
    counted = label != ignore_index
    label_bad = (label < 0) | (label >= V)
    y = tl.where(counted & (label_bad == 0), label, 0)

    # ---- the sparse entries first: top-k ids and the label (read before K is masked)
    koffs = tl.arange(0, BLOCK_K)
    ids = tl.load(ids_ptr + row * ids_stride + koffs, mask=koffs < K, other=-1)
    ids = tl.where(counted, ids, -1)  # padding rows read no teacher data
    # unchecked input (validate=False on CUDA): an id or label outside [0, V) never touches memory outside
    # the row; the row's loss and gradient become NaN instead, so the error shows instead of training on
    ids_bad = tl.sum(((ids >= V) | (ids < -1)).to(tl.int32), 0) > 0
    bad_row = counted & (label_bad | ids_bad)
    ids = tl.where(ids < V, ids, -1)
    valid = ids >= 0
    z_k_raw = tl.load(z_row + ids, mask=valid, other=0.0)
    z_k = z_k_raw.to(tl.float32)
    z_y = tl.load(z_row + y).to(tl.float32)
    # ---- mask K: -inf at the k ids, so both passes see only the complement of K (its sums are the
    # student's tail, exact, no 1 - sum_K q). Restored from z_k_raw at the end unless z is overwritten.
    tl.debug_barrier()  # every gather above (repeated ids included) happens before any -inf lands
    tl.store(z_row + ids, tl.full([BLOCK_K], float("-inf"), tl.float32).to(z_ptr.dtype.element_ty), mask=valid)
    tl.debug_barrier()
    m_c, s_c1, s_ct = _complement_sums(z_row, V, inv_tau, TEMPERED, BLOCK_V)
    has_comp = s_ct > 0  # false when k = V (or every logit outside K is -inf)
    w, log_w, w_all, uniq, w_tail = _teacher_weights(row, ids, valid, koffs, counted, lp_ptr, lp_stride, tail_ptr,
                                                     counts_ptr, counts_stride, V, inv_tau, MODE)

    # ---- the row's sums: complement part + top-k part (positive terms only: no cancellation)
    m = tl.maximum(m_c, tl.max(tl.where(uniq, z_k, -1.0e30), 0))
    s1 = tl.exp(m_c - m) * s_c1 + tl.sum(tl.where(uniq, tl.exp(z_k - m), 0.0), 0)
    if TEMPERED:
        st = tl.exp((m_c - m) * inv_tau) * s_ct + tl.sum(tl.where(uniq, tl.exp((z_k - m) * inv_tau), 0.0), 0)
    else:
        st = s1
    log_st = tl.log(st)

    # ---- losses (fp32)
    log_q_k = (z_k - m) * inv_tau - log_st
    q_k = tl.exp(log_q_k)
    kl = tl.sum(tl.where(w > 0, w * (log_w - log_q_k), 0.0), 0)
    if MODE == 0:
        # log q^tau_tail = log of the complement's own sum - log of the row's: finite even if q_tail underflows
        log_q_tail = (m_c - m) * inv_tau + tl.log(tl.where(has_comp, s_ct, 1.0)) - log_st
        kl += tl.where(w_tail > 0, w_tail * (tl.log(tl.maximum(w_tail, 1e-38)) - log_q_tail), 0.0)
    kl = kl * tau * tau
    ce = m + tl.log(s1) - z_y
    ce = tl.where(bad_row, float("nan"), ce)
    tl.store(ce_out_ptr + row, tl.where(counted, ce, 0.0))
    tl.store(kl_out_ptr + row, tl.where(counted, kl, 0.0))

    if HAS_GRAD:
        # a = scale*ce_w*exp(m_c - m)/s1 and b = scale*kl_w*tau*(exp((m_c - m)/tau)/st - t_tail/s_ct):
        # ce_w q_j + kl_w tau (q^tau_j - t_tail q^tau_j/q^tau_tail) outside K, never dividing by q_tail itself
        scale = tl.where(counted, tl.load(scale_ptr).to(tl.float32), 0.0)
        scale = tl.where(bad_row, float("nan"), scale)
        a = scale * ce_weight * tl.exp(m_c - m) / s1
        b = scale * kl_weight * tau * (tl.exp((m_c - m) * inv_tau) / st
                                       - tl.where(has_comp, w_tail / tl.where(has_comp, s_ct, 1.0), 0.0))
        _write_gradient(z_row, g_ptr + row * g_stride, ids, valid, y, z_k, z_y, w_all, q_k, counted, a, b, m, m_c, s1,
                        scale, ce_weight, kl_weight, tau, inv_tau, V, TEMPERED, BLOCK_V)
    if not INPLACE:
        if not HAS_GRAD:
            tl.debug_barrier()  # pass 1's reads are done
        tl.store(z_row + ids, z_k_raw, mask=valid)  # the caller's logits, bit for bit


def _rows_are_separate(z: torch.Tensor) -> bool:
    """Unit column stride and rows that share no memory (the kernel writes, then restores, -inf at each row's ids)."""
    return z.stride(1) == 1 and (z.shape[0] <= 1 or z.stride(0) >= z.shape[1])


def _blocks(vocab: int, k: int, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_V, BLOCK_K, num_warps): a fixed heuristic, no autotune (it fails in the interpreter)."""
    block_v = min(triton.next_power_of_2(max(vocab, 16)), 256 if interpret else 4096)
    block_k = max(2, triton.next_power_of_2(max(k, 1)))
    num_warps = 4 if block_v <= 1024 else (8 if block_v <= 2048 else 16)
    return block_v, block_k, num_warps


def chunk_loss_and_grad(z, labels, teacher: Teacher, spec: LossSpec, row_scale, out=None, target=None):
    """The contract of chunked.chunk_loss_and_grad; the gradient is written in out's dtype, into z itself when
    out is z, and z is otherwise left exactly as it was."""
    z = z if _rows_are_separate(z) else z.contiguous()
    g = None if out is None else (z if out is z else out)
    (n, vocab), ids = z.shape, teacher.ids.contiguous()
    ce_rows = torch.zeros(n, dtype=torch.float32, device=z.device)
    kl_rows = torch.zeros(n, dtype=torch.float32, device=z.device)
    if n == 0:
        return ce_rows.sum(), kl_rows.sum(), g
    mode, tau = spec.mode, float(spec.temperature)
    lp = teacher.logprobs.contiguous() if mode != "sampled" else ce_rows  # ce_rows: a stand-in never read
    tail = teacher.tail.contiguous() if mode == "tail" else ce_rows
    counts = teacher.counts.contiguous() if mode == "sampled" else ids
    block_v, block_k, num_warps = _blocks(vocab, ids.shape[1], os.environ.get("TRITON_INTERPRET", "0") == "1")
    g_arg = z if g is None else g  # not written to without a gradient
    _distill_rows_kernel[(n,)](
        z, z.stride(0), g_arg, g_arg.stride(0),
        labels.contiguous(), ids, ids.stride(0), lp, lp.stride(0), tail,
        counts, counts.stride(0), ce_rows, kl_rows, row_scale.reshape(1).to(torch.float32),
        vocab, ids.shape[1], int(spec.ignore_index), float(spec.ce_weight), float(spec.kl_weight), tau, 1.0 / tau,
        MODE=MODE_IDS[mode], HAS_GRAD=g is not None, TEMPERED=tau != 1.0, INPLACE=g is z,
        BLOCK_V=block_v, BLOCK_K=block_k, num_warps=num_warps,
    )
    return ce_rows.sum(), kl_rows.sum(), g
