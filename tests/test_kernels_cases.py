"""Random loss inputs with the edge cases where sparse-KL bugs hide (shared by the kernel tests)."""

from __future__ import annotations

import torch

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


def loss_and_grad(fn, case, **kw):
    """Run a loss function on a fresh leaf copy of the case's logits; return (LossTerms, grad)."""
    z = case["logits"].clone().requires_grad_(True)
    terms = fn(z, case["labels"], case["teacher_ids"], case["teacher_logprobs"], case["tail"], counts=case["counts"], **kw)
    terms.total.backward()
    return terms, z.grad
