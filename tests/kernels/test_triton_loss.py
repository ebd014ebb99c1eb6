"""The Triton kernel under TRITON_INTERPRET=1 on CPU tensors, against the float64 reference.

The interpreter must be switched on before triton is first imported (triton's own library
functions are bound at import). When this module is imported first in a CPU-only session it
sets TRITON_INTERPRET=1 and runs in process; otherwise (triton already imported, or a GPU
machine where the flag would leak into other tests) one test re-runs this file in a subprocess.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_INNER = os.environ.get("FASTKD_TRITON_INNER") == "1"
IN_PROCESS = _INNER or ("triton" not in sys.modules and not torch.cuda.is_available())
if IN_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from fastkd.kernels import LossSpec, distill_loss, fused_linear_distill_loss, reference_loss  # noqa: E402
from fastkd.kernels.chunked import chunk_loss_and_grad  # noqa: E402
from loss_cases import (hand_tail_case, hard_tail_case, independent_loss, loss_and_grad, make_case,  # noqa: E402
                        teacher_of)

pytestmark = [pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad"),
              pytest.mark.filterwarnings("ignore:All-NaN slice encountered")]
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-4, 2e-3), torch.bfloat16: (1e-4, 1.6e-2)}
MODES = ["tail", "renorm", "sampled"]


@pytest.fixture(scope="module")
def tri():
    """The triton_loss module with its kernel interpreted on CPU."""
    if not IN_PROCESS:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set: covered by the subprocess test")
    import fastkd.kernels.triton_loss as module

    return module


def triton_loss(z, labels, teacher, spec=LossSpec(), **kw):
    """distill_loss on the Triton backend (interpreted on CPU tensors), values unchecked as on CUDA."""
    return distill_loss(z, labels, teacher, spec, backend="triton", validate=False, **kw)


def test_triton_suite_in_subprocess():
    """Re-run this file in a fresh interpreter-mode process when it cannot run in this one."""
    if IN_PROCESS:
        pytest.skip("running in process")
    env = dict(os.environ, TRITON_INTERPRET="1", FASTKD_TRITON_INNER="1", CUDA_VISIBLE_DEVICES="")
    here = Path(__file__)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here)],
                          cwd=here.parents[2], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def check(ours, grad, ref, ref_grad, dtype):
    loss_tol, grad_tol = TOL[dtype]
    for name in ("total", "ce", "kl"):
        a, b = getattr(ours, name).item(), getattr(ref, name).item()
        assert math.isfinite(a) and abs(a - b) <= loss_tol * max(1.0, abs(b)), (name, a, b)
    assert int(ours.num_tokens) == int(ref.num_tokens)
    scale = float(ref_grad.abs().max())
    assert float((grad.double() - ref_grad.double()).abs().max()) <= grad_tol * scale


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 8, 128])
def test_triton_matches_reference(tri, mode, dtype, k):
    case = make_case(n=9, v=301, k=k, mode=mode, dtype=dtype, seed=k + 1)
    kw = dict(mode=mode, ce_weight=0.8, kl_weight=1.2)
    ref, ref_grad = loss_and_grad(reference_loss, case, **kw)
    ours, grad = loss_and_grad(triton_loss, case, **kw)
    assert grad.dtype == dtype
    check(ours, grad, ref, ref_grad, dtype)


@pytest.mark.parametrize("mode", MODES)
def test_triton_temperature_and_same_as_cpu_path(tri, mode):
    case = make_case(n=8, v=203, k=16, mode=mode, seed=7)
    kw = dict(mode=mode, temperature=2.0, kl_weight=0.9)
    ref, ref_grad = loss_and_grad(reference_loss, case, **kw)
    ours, grad = loss_and_grad(triton_loss, case, **kw)
    check(ours, grad, ref, ref_grad, torch.float32)
    cpu, cpu_grad = loss_and_grad(distill_loss, case, **kw)  # dispatch: chunked PyTorch on CPU tensors
    assert ours.total.item() == pytest.approx(cpu.total.item(), rel=1e-5)
    torch.testing.assert_close(grad, cpu_grad, rtol=1e-4, atol=1e-7)


def test_triton_inplace_and_upstream_scale(tri):
    case = make_case(n=6, v=150, k=5, dtype=torch.bfloat16, seed=3)
    ref, ref_grad = loss_and_grad(reference_loss, case)
    z = case["logits"].clone().requires_grad_(True)
    buf = z.detach()
    terms = triton_loss(z, case["labels"], teacher_of(case), inplace=True)
    (terms.total * 0.5).backward()
    # the gradient was written over the logits and scaled there by the upstream 0.5: no second [N, V] buffer
    assert z.grad.data_ptr() == buf.data_ptr()
    assert float((z.grad.double() - 0.5 * ref_grad.double()).abs().max()) <= 1.6e-2 * float(ref_grad.abs().max())


def test_triton_all_rows_ignored_and_no_grad(tri):
    case = make_case(n=4, v=64, k=4, seed=2)
    case["labels"][:] = -100
    terms, grad = loss_and_grad(triton_loss, case)
    assert terms.total.item() == 0.0 and torch.all(grad == 0)
    case = make_case(n=5, v=64, k=4, seed=2)
    before = case["logits"].clone()
    terms = triton_loss(case["logits"], case["labels"], teacher_of(case), inplace=True)
    ref = reference_loss(case["logits"], case["labels"], teacher_of(case))
    assert terms.total.item() == pytest.approx(ref.total.item(), rel=1e-5)
    assert torch.equal(case["logits"], before)  # no gradient wanted: logits untouched


@pytest.mark.parametrize("mode", MODES)
def test_triton_chunk_kernel_matches_cpu_chunk(tri, mode):
    """The per-chunk entry the fused-linear variant uses on CUDA."""
    case = make_case(n=7, v=130, k=6, mode=mode, seed=4)
    args = (case["labels"], teacher_of(case), LossSpec(mode=mode), torch.tensor(0.25))
    z_t, z_c = case["logits"].clone(), case["logits"].clone()
    ce_t, kl_t, g_t = tri.chunk_loss_and_grad(z_t, *args, out=z_t)
    ce_c, kl_c, g_c = chunk_loss_and_grad(z_c, *args, out=z_c)
    assert g_t is z_t  # the gradient overwrote the chunk's logits
    assert ce_t.item() == pytest.approx(ce_c.item(), rel=1e-5)
    assert kl_t.item() == pytest.approx(kl_c.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g_t, g_c, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
def test_triton_backend_on_the_fused_linear_path_and_in_row_chunks(tri, mode):
    """The one autograd path on the Triton backend: fused linear (chunks of h W^T), and logits in row chunks."""
    g = torch.Generator().manual_seed(9)
    case = make_case(n=10, v=97, k=6, mode=mode, seed=9)
    h = torch.randn(10, 16, generator=g).requires_grad_(True)
    w = (torch.randn(97, 16, generator=g) * 0.4).requires_grad_(True)
    spec = LossSpec(mode=mode, temperature=1.5, ce_weight=0.7, kl_weight=1.2, chunk_size=4)
    ours = fused_linear_distill_loss(h, w, case["labels"], teacher_of(case), spec, backend="triton", validate=False)
    got = torch.autograd.grad(ours.total, (h, w))
    h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = reference_loss(h64 @ w64.t(), case["labels"], teacher_of(case), spec)
    want = torch.autograd.grad(ref.total, (h64, w64))
    assert ours.total.item() == pytest.approx(ref.total.item(), rel=1e-5)
    for a, r in zip(got, want):
        assert float((a.double() - r).abs().max()) <= 1e-4 * float(r.abs().max())
    chunks, grad = loss_and_grad(triton_loss, case, mode=mode, chunk_size=3)
    whole, whole_grad = loss_and_grad(triton_loss, case, mode=mode)
    assert chunks.total.item() == pytest.approx(whole.total.item(), rel=1e-6)
    torch.testing.assert_close(grad, whole_grad, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- the student's tail: exact complement, no floor

def against_independent(ours, grad, case, dtype, **kw):
    """Loss terms and the full [N, V] gradient vs the tests' own float64 loss (tail = complement logsumexp)."""
    z = case["logits"].double().requires_grad_(True)
    ref = independent_loss(z, case["labels"], case["teacher_ids"], case["teacher_logprobs"], case["tail"],
                           case["counts"], **kw)
    ref_grad, = torch.autograd.grad(ref.total, z)
    loss_tol, grad_tol = TOL[dtype]
    for name in ("total", "ce", "kl"):
        a, b = getattr(ours, name).item(), float(getattr(ref, name))
        assert math.isfinite(a) and abs(a - b) <= loss_tol * max(1.0, abs(b)), (name, a, b)
    assert torch.isfinite(grad).all()
    assert float((grad.double() - ref_grad).abs().max()) <= grad_tol * float(ref_grad.abs().max())
    for r in range(grad.shape[0]):  # the mass outside the top-k, row by row (what the floor zeroed)
        out = torch.ones(grad.shape[1], dtype=torch.bool)
        out[case["teacher_ids"][r][case["teacher_ids"][r] >= 0]] = False
        want = ref_grad[r, out]
        assert abs(float(grad[r, out].double().sum() - want.sum())) <= grad_tol * max(float(want.abs().sum()), 1e-6)
    sums = grad.double().sum(1).abs()  # every row's gradient sums to 0
    assert float(sums.max()) <= max(grad_tol, 1e-6) * max(1.0, float(grad.double().abs().sum(1).max()))


def test_triton_hand_computed_tail_case(tri):
    case, want = hand_tail_case()
    terms, grad = loss_and_grad(triton_loss, case, ce_weight=0.0)
    assert terms.kl.item() == pytest.approx(want["kl"], rel=1e-6)
    torch.testing.assert_close(grad[0].double(), torch.tensor(want["grad_kl"], dtype=torch.float64), rtol=1e-5, atol=1e-7)
    assert grad[0, 2:].sum().item() == pytest.approx(-0.3, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_triton_hard_tail_matches_independent(tri, temperature, dtype, inplace):
    """Student top-k mass > 1 - 1e-6 down to q_tail = 0 in fp32, teacher tail 0.3, padding row, labels in/out of K."""
    case = hard_tail_case(dtype=dtype)
    kw = dict(ce_weight=0.7, kl_weight=1.3, temperature=temperature)
    z = case["logits"].clone().requires_grad_(True)
    terms = triton_loss(z, case["labels"], teacher_of(case), LossSpec(**kw), inplace=inplace)
    terms.total.backward()
    assert z.grad.dtype == dtype
    against_independent(terms, z.grad, case, dtype, **kw)
    assert torch.all(z.grad[4] == 0)
    if not inplace:
        assert torch.equal(z.detach(), case["logits"])  # the caller's logits are left exactly as they were


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_triton_random_cases_match_independent(tri, mode, temperature):
    case = make_case(n=9, v=150, k=8, mode=mode, seed=5)
    kw = dict(mode=mode, temperature=temperature, ce_weight=0.8, kl_weight=1.1)
    ours, grad = loss_and_grad(triton_loss, case, **kw)
    against_independent(ours, grad, case, torch.float32, **kw)


@pytest.mark.parametrize("tail", [0.3, 1e-7])
def test_triton_topk_covering_the_vocabulary_drops_the_tail(tri, tail):
    case = make_case(n=4, v=16, k=16, seed=2)
    case["tail"] = torch.full((4,), tail)
    ours, grad = loss_and_grad(triton_loss, case)
    against_independent(ours, grad, case, torch.float32)


def test_triton_chunk_kernel_hard_tail(tri):
    """The per-chunk entry the fused-linear variant uses on CUDA, on the hard case, vs the independent loss."""
    case = hard_tail_case()
    z = case["logits"].clone()
    ce_t, kl_t, g_t = tri.chunk_loss_and_grad(z, case["labels"], teacher_of(case), LossSpec(), torch.tensor(1 / 5),
                                              out=z)
    terms = type("T", (), {})()
    terms.ce, terms.kl = ce_t / 5, kl_t / 5
    terms.total = terms.ce + terms.kl
    against_independent(terms, g_t, case, torch.float32)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_triton_empty_rows_of_a_selective_capture_cache(tri, temperature):
    """Rows with every id -1, log-prob -inf and tail 1 (cache-teacher --capture-share): CE alone there."""
    case = make_case(n=9, v=97, k=6, seed=11)
    empty = torch.tensor([i % 3 != 0 for i in range(9)])
    case["teacher_ids"][empty] = -1
    case["teacher_logprobs"][empty] = float("-inf")
    case["tail"][empty] = 1.0
    kw = dict(ce_weight=0.6, kl_weight=1.4, temperature=temperature)
    z = case["logits"].clone().requires_grad_(True)
    terms = triton_loss(z, case["labels"], teacher_of(case), LossSpec(**kw))
    terms.total.backward()
    against_independent(terms, z.grad, case, torch.float32, **kw)
    rows = int((case["labels"] != -100).sum())
    for r in torch.nonzero(empty & (case["labels"] != -100)).flatten().tolist():
        want = torch.softmax(case["logits"][r].double(), -1)
        want[case["labels"][r]] -= 1
        torch.testing.assert_close(z.grad[r].double(), 0.6 * want / rows, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("field", ["label", "teacher_id"])
def test_triton_unchecked_out_of_range_input_poisons_its_row_only(tri, field):
    """On CUDA the value checks are off by default (no host sync): a label or teacher id >= V must not read or
    write the next row's memory; its row's loss and gradient are NaN instead, so the error cannot train on."""
    case = make_case(n=4, v=64, k=4, seed=5)
    case["labels"][1] = 7 if field == "teacher_id" else 64
    if field == "teacher_id":
        case["teacher_ids"][1, 0] = 64
    z = case["logits"].clone().requires_grad_(True)
    terms = triton_loss(z, case["labels"], teacher_of(case))
    terms.total.backward()
    grad = z.grad
    assert math.isnan(terms.total.item())
    assert torch.isnan(grad[1]).all()
    clean = dict(case, labels=case["labels"].clone())
    clean["labels"][1] = -100
    _, want = loss_and_grad(triton_loss, clean)
    others = [0, 2, 3]
    torch.testing.assert_close(grad[others] * 4, want[others] * 3, rtol=1e-5, atol=1e-7)  # 4 counted rows vs 3
    assert torch.equal(z.detach(), case["logits"])  # no -inf left in, or written into, another row
