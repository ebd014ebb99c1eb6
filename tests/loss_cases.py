"""Random loss inputs with the edge cases where sparse-KL bugs hide (shared by the kernel tests)."""

from __future__ import annotations

from dataclasses import fields

import torch

from fastkd.kernels import LossSpec, Teacher

SPEC_FIELDS = {f.name for f in fields(LossSpec)}
TAIL_LEVELS = (1e-7, 0.3, 0.999)  # teacher tail mass: near 0, middle, near 1


def make_case(n=12, v=301, k=8, mode="tail", dtype=torch.float32, seed=0, ignore_index=-100, scale=3.0):
    """Student logits, labels (some ignored, some inside the top-k) and teacher top-k data for one mode."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * scale).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    if mode == "sampled":
        ids = torch.randint(0, v, (n, k), generator=g)
        if k >= 2:
            ids[::2, 1] = ids[::2, 0]  # repeated draws of the same id
            ids[1::3, -1] = -1  # unused slot
        counts = torch.randint(1, 6, (n, k), generator=g)
        logprobs = torch.zeros(n, k)
        tail = None
    else:
        ids = torch.rand(n, v, generator=g).argsort(dim=1)[:, :k]
        tail = torch.tensor([TAIL_LEVELS[i % len(TAIL_LEVELS)] for i in range(n)], dtype=torch.float32)
        p = torch.softmax(torch.randn(n, k, generator=g) * 2, dim=1) * (1 - tail.double())[:, None]
        logprobs = p.log().float()
        counts = None
        if k >= 3:
            ids[2, -1] = -1  # unused slot in a top-k row
    labels[::3] = ids[::3, 0].clamp_min(0)  # labels inside the top-k
    labels[1::4] = ignore_index  # padding rows
    if mode != "sampled":
        logprobs[1::4] = float("nan")  # garbage in padding rows must not leak
    return dict(logits=logits, labels=labels, teacher_ids=ids, teacher_logprobs=logprobs, tail=tail, counts=counts)


def teacher_of(case) -> Teacher:
    """The case's teacher rows as the loss takes them."""
    return Teacher(case["teacher_ids"], case["teacher_logprobs"], case["tail"], case["counts"])


def split_spec(kw: dict) -> tuple[LossSpec, dict]:
    """LossSpec fields out of keyword arguments (the rest: the entry point's own options)."""
    spec = LossSpec(**{k: v for k, v in kw.items() if k in SPEC_FIELDS})
    return spec, {k: v for k, v in kw.items() if k not in SPEC_FIELDS}


def loss_and_grad(fn, case, **kw):
    """Run a loss function on a fresh leaf copy of the case's logits; return (LossTerms, grad).
    kw: LossSpec fields and the entry point's own options (inplace, validate, backend)."""
    spec, options = split_spec(kw)
    z = case["logits"].clone().requires_grad_(True)
    terms = fn(z, case["labels"], teacher_of(case), spec, **options)
    terms.total.backward()
    return terms, z.grad


# ---------------------------------------------------------------- an independent float64 loss (not kernels/)

def independent_loss(logits, labels, ids, logprobs, tail=None, counts=None, *, mode="tail", temperature=1.0,
                     ce_weight=1.0, kl_weight=1.0, ignore_index=-100, **unused):
    """CE + KL in float64, one row at a time, written from DESIGN.md without any code from fastkd.kernels.

    The student's tail is log q^tau_tail = logsumexp(z/tau over the ids outside K) - logsumexp(z/tau):
    no subtraction, no floor. k = V (no id outside K): there is no tail bucket, the teacher's tail
    mass is dropped and the top-k renormalised. Differentiable w.r.t. logits (autograd = the gradient).
    """
    import math
    from types import SimpleNamespace

    z = logits.double()
    n, v = z.shape
    tau = float(temperature)
    ce_rows, kl_rows = [], []
    for r in range(n):
        y = int(labels[r])
        if y == ignore_index:
            continue
        zr = z[r]
        ce_rows.append(torch.logsumexp(zr, 0) - zr[y])
        log_q_t = zr / tau - torch.logsumexp(zr / tau, 0)
        slots = [s for s in range(ids.shape[1]) if int(ids[r, s]) >= 0]
        k_ids = [int(ids[r, s]) for s in slots]
        scores = {}  # id -> log of its unnormalised tempered target weight
        tail_score = None
        if mode == "sampled":
            agg = {}
            for s, i in zip(slots, k_ids):
                agg[i] = agg.get(i, 0.0) + float(counts[r, s])
            total = sum(agg.values())
            scores = {i: math.log(c / total) / tau for i, c in agg.items() if c > 0}
        else:
            for s, i in zip(slots, k_ids):
                scores[i] = float(logprobs[r, s]) / tau
            if mode == "renorm":
                pass
            else:
                outside = v - len(set(k_ids))
                p_tail = min(max(float(tail[r]), 0.0), 1.0)
                if outside > 0 and p_tail > 0:
                    tail_score = math.log(p_tail) / tau + (1.0 - 1.0 / tau) * math.log(outside)
        every = list(scores.values()) + ([tail_score] if tail_score is not None else [])
        kl = torch.zeros((), dtype=torch.float64)
        if every:
            log_norm = math.log(sum(math.exp(s - max(every)) for s in every)) + max(every)
            for i, s in scores.items():
                lt = s - log_norm
                kl = kl + math.exp(lt) * (lt - log_q_t[i])
            if tail_score is not None:
                comp = torch.ones(v, dtype=torch.bool)
                comp[k_ids] = False
                log_q_tail = torch.logsumexp(zr[comp] / tau, 0) - torch.logsumexp(zr / tau, 0)
                lt = tail_score - log_norm
                kl = kl + math.exp(lt) * (lt - log_q_tail)
        kl_rows.append(kl * tau * tau)
    count = len(ce_rows)
    zero = (z * 0).sum()
    ce = (torch.stack(ce_rows).sum() / count) if count else zero
    kl = (torch.stack(kl_rows).sum() / count) if count else zero
    total = ce_weight * ce + kl_weight * kl
    return SimpleNamespace(total=total, ce=ce.detach(), kl=kl.detach(), num_tokens=count)


def hand_tail_case(dtype=torch.float32):
    """One row, V = 4, K = {0, 1}: z = [0, 0, -20, -20], teacher p = [0.4, 0.3], tail 0.3, label 0.

    q_0 = q_1 = 1 / (2 + 2e^-20), q_tail = e^-20 / (1 + e^-20) ~ 2.06e-9 (< 1e-6). The numbers
    below are hand-derived with math only (no torch):
      CE = log(2 + 2e^-20)
      KL = 0.4 log(0.4 / q_0) + 0.3 log(0.3 / q_1) + 0.3 log(0.3 / q_tail)
      dKL/dz_j = q_j - p_j in K; q_j (1 - 0.3 / q_tail) = q_j - 0.15 outside K (the two sum to -0.3).
    """
    import math

    e = math.exp(-20.0)
    q0 = 1.0 / (2.0 + 2.0 * e)
    qo = e * q0  # each id outside K
    q_tail = 2.0 * qo
    ce = math.log(2.0 + 2.0 * e)
    kl = 0.4 * math.log(0.4 / q0) + 0.3 * math.log(0.3 / q0) + 0.3 * math.log(0.3 / q_tail)
    grad_kl = [q0 - 0.4, q0 - 0.3, qo * (1 - 0.3 / q_tail), qo * (1 - 0.3 / q_tail)]
    grad_ce = [q0 - 1.0, q0, qo, qo]
    case = dict(logits=torch.tensor([[0.0, 0.0, -20.0, -20.0]]).to(dtype), labels=torch.tensor([0]),
                teacher_ids=torch.tensor([[0, 1]]), teacher_logprobs=torch.tensor([[0.4, 0.3]]).log(),
                tail=torch.tensor([0.3]), counts=None)
    return case, dict(ce=ce, kl=kl, grad_ce=grad_ce, grad_kl=grad_kl)


def hard_tail_case(v=64, k=4, dtype=torch.float32, seed=0, ignore_index=-100):
    """Rows whose student puts more than 1 - 1e-6 of its mass on the teacher's top-k, teacher tail 0.3.

    Complement logits sit `margin` below the top-k: 14 (q_tail ~ 1e-6), 20 (~ 1e-8), 200 (q_tail
    underflows to exactly 0 in fp32, ~1e-87), 30; row 4 is padding (NaN teacher values); row 5 is
    an ordinary row (margin 0). The label is in K in rows 0, 2 and 5, outside K in rows 1 and 3.
    """
    g = torch.Generator().manual_seed(seed)
    margins = [14.0, 20.0, 200.0, 30.0, 20.0, 0.0]
    n = len(margins)
    ids = torch.rand(n, v, generator=g).argsort(dim=1)[:, :k]
    logits = torch.randn(n, v, generator=g) * 0.5
    labels = torch.zeros(n, dtype=torch.long)
    for r, margin in enumerate(margins):
        in_k = torch.zeros(v, dtype=torch.bool)
        in_k[ids[r]] = True
        logits[r, ~in_k] -= margin
        logits[r, ids[r]] += torch.linspace(2.0, 0.0, k)
        outside = (~in_k).nonzero()[:, 0]
        labels[r] = outside[r] if r in (1, 3) else ids[r, r % k]
    tail = torch.full((n,), 0.3)
    logprobs = (torch.softmax(torch.randn(n, k, generator=g), dim=1) * 0.7).log()
    labels[4] = ignore_index
    logprobs[4] = float("nan")
    tail[4] = float("nan")
    return dict(logits=logits.to(dtype), labels=labels, teacher_ids=ids, teacher_logprobs=logprobs.float(),
                tail=tail, counts=None)


def student_tail(logits, ids, temperature=1.0):
    """Per row, log q^tau_tail in float64: logsumexp of z/tau over the ids outside K minus logsumexp(z/tau)."""
    z = logits.double() / temperature
    out = []
    for r in range(z.shape[0]):
        comp = torch.ones(z.shape[1], dtype=torch.bool)
        comp[ids[r][ids[r] >= 0]] = False
        out.append(torch.logsumexp(z[r, comp], 0) - torch.logsumexp(z[r], 0))
    return torch.stack(out)
