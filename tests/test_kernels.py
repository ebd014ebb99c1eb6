"""CPU tests of the distillation loss: chunked path and fused-linear variant vs the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from fastkd.errors import UserError
from fastkd.kernels import (
    DistillLoss,
    HiddenProjector,
    LossTerms,
    distill_loss,
    fused_linear_distill_loss,
    reference_loss,
)
from fastkd.kernels.validate import LossInputError
from test_kernels_cases import loss_and_grad, make_case

# loss: relative tolerance; gradient: absolute tolerance relative to the largest gradient entry
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-4, 2e-3), torch.bfloat16: (1e-4, 1.6e-2)}
MODES = ["tail", "renorm", "sampled"]
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def assert_matches(ours: LossTerms, grad, ref: LossTerms, ref_grad, dtype):
    loss_tol, grad_tol = TOL[dtype]
    for name in ("total", "ce", "kl"):
        a, b = float(getattr(ours, name).detach()), float(getattr(ref, name).detach())
        assert math.isfinite(a)
        assert abs(a - b) <= loss_tol * max(1.0, abs(b)), (name, a, b)
    assert int(ours.num_tokens) == int(ref.num_tokens)
    assert grad.dtype == ref_grad.dtype
    scale = float(ref_grad.abs().max())
    err = float((grad.double() - ref_grad.double()).abs().max())
    assert err <= grad_tol * scale, (err, scale)


# ---------------------------------------------------------------- reference vs hand-computed values

def _hand_inputs():
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    return q.log(), torch.tensor([0]), torch.tensor([[3, 1]]), torch.tensor([[0.5, 0.3]], dtype=torch.float64).log()


def test_reference_matches_hand_computed_values():
    z, y, ids, lp = _hand_inputs()
    tail = torch.tensor([0.2], dtype=torch.float64)
    ce = -math.log(0.1)
    kl_tail = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.4)
    r = reference_loss(z, y, ids, lp, tail)
    assert float(r.ce) == pytest.approx(ce, rel=1e-12)
    assert float(r.kl) == pytest.approx(kl_tail, rel=1e-12)
    kl_renorm = 0.625 * math.log(0.625 / 0.4) + 0.375 * math.log(0.375 / 0.2)
    assert float(reference_loss(z, y, ids, lp, mode="renorm").kl) == pytest.approx(kl_renorm, rel=1e-12)
    s_ids = torch.tensor([[2, 2, 0, -1]])
    counts = torch.tensor([[1, 2, 1, 5]])
    kl_sampled = 0.75 * math.log(0.75 / 0.3) + 0.25 * math.log(0.25 / 0.1)
    r = reference_loss(z, y, s_ids, torch.zeros(1, 4), counts=counts, mode="sampled")
    assert float(r.kl) == pytest.approx(kl_sampled, rel=1e-12)
    # tau = 2: student softmax(z/2); teacher p^(1/2), tail spread over V-k = 2 ids -> 2 * (0.2/2)^(1/2)
    qt = [math.sqrt(x) for x in (0.1, 0.2, 0.3, 0.4)]
    qt = [x / sum(qt) for x in qt]
    pt = [math.sqrt(0.5), math.sqrt(0.3), 2 * math.sqrt(0.1)]
    pt = [x / sum(pt) for x in pt]
    q_tail = 1 - qt[3] - qt[1]
    kl_t = pt[0] * math.log(pt[0] / qt[3]) + pt[1] * math.log(pt[1] / qt[1]) + pt[2] * math.log(pt[2] / q_tail)
    r = reference_loss(z, y, ids, lp, tail, temperature=2.0)
    assert float(r.kl) == pytest.approx(4 * kl_t, rel=1e-12)
    assert float(r.ce) == pytest.approx(ce, rel=1e-12)  # CE stays at tau = 1


def test_gradient_outside_topk_follows_the_closed_form():
    """DESIGN.md: dKL/dz_j = q_j - p_j in K and q_j (1 - p_tail/q_tail) outside K."""
    case = make_case(n=6, v=97, k=5, mode="tail", seed=3)
    terms, grad = loss_and_grad(distill_loss, case, ce_weight=0.0)
    counted = case["labels"] != -100
    q = torch.softmax(case["logits"].double(), 1)
    ids = case["teacher_ids"]
    p = case["teacher_logprobs"].double().exp()
    for r in range(6):
        if not counted[r]:
            assert torch.all(grad[r] == 0)
            continue
        valid = ids[r] >= 0
        k_ids = ids[r][valid]
        p_r = p[r][valid]
        p_tail = 1 - p_r.sum()  # the tail consistent with the stored top-k
        q_tail = 1 - q[r, k_ids].sum()
        expected = q[r] * (1 - p_tail / q_tail)
        expected[k_ids] = q[r, k_ids] - p_r
        torch.testing.assert_close(grad[r].double() * int(counted.sum()), expected, rtol=2e-4, atol=1e-6)


# ---------------------------------------------------------------- chunked path vs reference

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 8, 128])
def test_chunked_matches_reference(mode, dtype, k):
    case = make_case(n=12, v=301, k=k, mode=mode, dtype=dtype, seed=k)
    kw = dict(mode=mode, ce_weight=0.7, kl_weight=1.3)
    ref, ref_grad = loss_and_grad(reference_loss, case, **kw)
    ours, grad = loss_and_grad(distill_loss, case, chunk_size=5, **kw)
    assert_matches(ours, grad, ref, ref_grad, dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_matches_reference(mode, temperature):
    case = make_case(n=10, v=211, k=16, mode=mode, seed=11)
    kw = dict(mode=mode, temperature=temperature, kl_weight=0.9)
    ref, ref_grad = loss_and_grad(reference_loss, case, **kw)
    ours, grad = loss_and_grad(distill_loss, case, **kw)
    assert_matches(ours, grad, ref, ref_grad, torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_chunk_sizes_agree(mode):
    case = make_case(n=13, v=157, k=9, mode=mode, seed=5)
    results = [loss_and_grad(distill_loss, case, mode=mode, chunk_size=c) for c in (1, 4, 13, None)]
    for terms, grad in results[1:]:
        assert terms.total.item() == pytest.approx(results[0][0].total.item(), rel=1e-6)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-5, atol=1e-8)


def test_inplace_writes_gradient_into_logits():
    case = make_case(n=8, v=101, k=4, seed=2)
    ref, ref_grad = loss_and_grad(distill_loss, case)
    z = case["logits"].clone().requires_grad_(True)
    buf = z.detach()
    terms = distill_loss(z, case["labels"], case["teacher_ids"], case["teacher_logprobs"], case["tail"], inplace=True)
    terms.total.backward()
    assert terms.total.item() == pytest.approx(ref.total.item(), rel=1e-6)
    torch.testing.assert_close(buf, ref_grad)  # the logits buffer now holds the gradient
    torch.testing.assert_close(z.grad, ref_grad)


def test_backward_scales_by_upstream_gradient():
    case = make_case(n=6, v=89, k=3, seed=8)
    _, grad = loss_and_grad(distill_loss, case)
    z = case["logits"].clone().requires_grad_(True)
    terms = distill_loss(z, case["labels"], case["teacher_ids"], case["teacher_logprobs"], case["tail"])
    (terms.total * 2.5).backward()
    torch.testing.assert_close(z.grad, grad * 2.5)


def test_finite_difference_tiny_case():
    for mode in MODES:
        case = make_case(n=3, v=7, k=3, mode=mode, dtype=torch.float64, seed=4)

        def f(z):
            return distill_loss(z, case["labels"], case["teacher_ids"], case["teacher_logprobs"], case["tail"],
                                counts=case["counts"], mode=mode, temperature=1.5, kl_weight=0.8).total

        z = case["logits"].clone().requires_grad_(True)
        assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7)


def test_no_grad_forward_matches():
    case = make_case(n=7, v=120, k=6, seed=9)
    before = case["logits"].clone()
    with torch.no_grad():
        terms = distill_loss(case["logits"], case["labels"], case["teacher_ids"], case["teacher_logprobs"], case["tail"],
                             inplace=True)
    assert torch.equal(case["logits"], before)  # no gradient wanted: the logits are left alone
    ref = reference_loss(case["logits"], case["labels"], case["teacher_ids"], case["teacher_logprobs"], case["tail"])
    assert terms.total.item() == pytest.approx(ref.total.item(), rel=1e-6)


# ---------------------------------------------------------------- degenerate inputs

@pytest.mark.parametrize("fn", [distill_loss, reference_loss])
def test_all_rows_ignored_gives_zero_loss_and_zero_grad(fn):
    case = make_case(n=5, v=50, k=4, seed=1)
    case["labels"][:] = -100
    terms, grad = loss_and_grad(fn, case)
    assert terms.total.item() == 0.0 and int(terms.num_tokens) == 0
    assert torch.all(grad == 0)


def test_k_larger_than_vocab_is_a_clear_error():
    case = make_case(n=4, v=10, k=10, seed=1)
    ids = torch.cat([case["teacher_ids"], case["teacher_ids"][:, :2]], 1)
    lp = torch.cat([case["teacher_logprobs"], case["teacher_logprobs"][:, :2]], 1)
    with pytest.raises(LossInputError, match="k=12"):
        distill_loss(case["logits"], case["labels"], ids, lp, case["tail"])
    assert issubclass(LossInputError, UserError)


def test_sampled_mode_allows_more_draws_than_vocab():
    case = make_case(n=4, v=10, k=25, mode="sampled", seed=1)
    ref, ref_grad = loss_and_grad(reference_loss, case, mode="sampled")
    ours, grad = loss_and_grad(distill_loss, case, mode="sampled")
    assert_matches(ours, grad, ref, ref_grad, torch.float32)


@pytest.mark.parametrize("field", ["teacher_logprobs", "tail"])
def test_nan_in_teacher_values_is_a_clear_error(field):
    case = make_case(n=6, v=40, k=4, seed=1)
    case[field][0] = float("nan")  # row 0 counts (label not ignored)
    with pytest.raises(LossInputError, match=f"{field}"):
        distill_loss(case["logits"], case["labels"], case["teacher_ids"], case["teacher_logprobs"], case["tail"])


@pytest.mark.parametrize("bad", ["label", "id", "dup", "mode", "missing_tail", "missing_counts"])
def test_bad_inputs_are_clear_errors(bad):
    case = make_case(n=6, v=40, k=4, seed=1)
    kw = dict(tail=case["tail"])
    if bad == "label":
        case["labels"][0] = 40
    elif bad == "id":
        case["teacher_ids"][0, 0] = 40
    elif bad == "dup":
        case["teacher_ids"][0, 1] = case["teacher_ids"][0, 0]
    elif bad == "mode":
        kw["mode"] = "dense"
    elif bad == "missing_tail":
        kw["tail"] = None
    else:
        kw["mode"] = "sampled"
    with pytest.raises(LossInputError):
        distill_loss(case["logits"], case["labels"], case["teacher_ids"], case["teacher_logprobs"], **kw)


def test_extreme_logits_stay_finite():
    case = make_case(n=6, v=64, k=4, seed=6, scale=200.0)
    ref, ref_grad = loss_and_grad(reference_loss, case)
    ours, grad = loss_and_grad(distill_loss, case)
    assert torch.isfinite(grad).all() and math.isfinite(ours.total.item())
    assert ours.total.item() == pytest.approx(ref.total.item(), rel=1e-4)


# ---------------------------------------------------------------- fused linear

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_linear_matches_explicit_matmul(mode, with_bias):
    g = torch.Generator().manual_seed(21)
    case = make_case(n=11, v=173, k=7, mode=mode, seed=21)
    h = torch.randn(11, 24, generator=g, dtype=torch.float64)
    w = torch.randn(173, 24, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(173, generator=g, dtype=torch.float64) if with_bias else None
    kw = dict(counts=case["counts"], mode=mode, ce_weight=0.6, kl_weight=1.1, temperature=1.3)
    args = (case["labels"], case["teacher_ids"], case["teacher_logprobs"], case["tail"])

    leaves = [t.clone().requires_grad_(True) for t in (h, w) + ((b,) if with_bias else ())]
    logits = leaves[0] @ leaves[1].t() + (leaves[2] if with_bias else 0)
    ref = reference_loss(logits, *args, **kw)
    ref_grads = torch.autograd.grad(ref.total, leaves)

    ours_leaves = [t.float().clone().requires_grad_(True) for t in (h, w) + ((b,) if with_bias else ())]
    ours = fused_linear_distill_loss(ours_leaves[0], ours_leaves[1], *args, bias=ours_leaves[2] if with_bias else None,
                                     chunk_size=4, **kw)
    grads = torch.autograd.grad(ours.total, ours_leaves)
    assert ours.total.item() == pytest.approx(ref.total.item(), rel=1e-5)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))


def test_fused_linear_bf16_and_upstream_scale():
    case = make_case(n=9, v=130, k=5, seed=2)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(9, 16, generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(130, 16, generator=g) * 0.3).bfloat16().requires_grad_(True)
    args = (case["labels"], case["teacher_ids"], case["teacher_logprobs"], case["tail"])
    ours = fused_linear_distill_loss(h, w, *args, chunk_size=2)
    (ours.total * 3).backward()
    h2, w2 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = reference_loss(h2 @ w2.t(), *args)
    (ref.total * 3).backward()
    assert ours.total.item() == pytest.approx(ref.total.item(), rel=2e-2)
    for a, r in ((h.grad, h2.grad), (w.grad, w2.grad)):
        assert a.dtype == torch.bfloat16
        assert float((a.double() - r).abs().max()) <= 3e-2 * float(r.abs().max())


# ---------------------------------------------------------------- hidden term and the module

def test_hidden_projector_matches_formula_and_mask():
    torch.manual_seed(0)
    proj = HiddenProjector(8, [12, 20])
    hs = [torch.randn(6, 8), torch.randn(6, 8)]
    ht = [torch.randn(6, 12), torch.randn(6, 20)]
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    got = proj(hs, ht, mask=mask)
    expected = 0.0
    for p, a, b in zip(proj.projections, hs, ht):
        d = a.double() @ p.weight.double().t() - b.double()
        expected += float((d.pow(2).sum(1) / b.shape[1])[mask].mean())
    assert float(got) == pytest.approx(expected / 2, rel=1e-5)
    assert float(proj(hs, ht, mask=torch.zeros(6, dtype=torch.bool))) == 0.0
    with pytest.raises(LossInputError):
        proj(hs[:1], ht)


def test_distill_loss_module_combines_terms_and_saves_projector():
    case = make_case(n=8, v=90, k=5, seed=12)
    torch.manual_seed(1)
    module = DistillLoss(ce_weight=0.5, kl_weight=2.0, hidden_weight=0.3, projector=HiddenProjector(6, [10]))
    assert any(k.startswith("projector.") for k in module.state_dict())
    hs = [torch.randn(8, 6, requires_grad=True)]
    ht = [torch.randn(8, 10)]
    z = case["logits"].clone().requires_grad_(True)
    terms = module(z, case["labels"], case["teacher_ids"], case["teacher_logprobs"], case["tail"],
                   student_hidden=hs, teacher_hidden=ht)
    ref = reference_loss(case["logits"], case["labels"], case["teacher_ids"], case["teacher_logprobs"], case["tail"])
    hid = module.projector(hs, ht, mask=case["labels"] != -100)
    assert terms.total.item() == pytest.approx(0.5 * float(ref.ce) + 2.0 * float(ref.kl) + 0.3 * float(hid), rel=1e-5)
    assert float(terms.hidden) == pytest.approx(float(hid), rel=1e-6)
    assert not terms.ce.requires_grad and not terms.kl.requires_grad and not terms.hidden.requires_grad
    terms.total.backward()
    assert z.grad is not None and hs[0].grad is not None
    assert module.projector.projections[0].weight.grad is not None
    with pytest.raises(LossInputError):
        DistillLoss(hidden_weight=1.0)


def test_fused_linear_never_builds_more_than_one_chunk(monkeypatch):
    import fastkd.kernels.fused_linear as fl

    seen = []
    real = fl.chunk_loss_and_grad

    def recording(z, *args, **kw):
        seen.append(tuple(z.shape))
        return real(z, *args, **kw)

    monkeypatch.setattr(fl, "chunk_loss_and_grad", recording)
    case = make_case(n=10, v=64, k=4, seed=5)
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(64, 8, requires_grad=True)
    fused_linear_distill_loss(h, w, case["labels"], case["teacher_ids"], case["teacher_logprobs"], case["tail"],
                              chunk_size=3).total.backward()
    assert seen == [(3, 64), (3, 64), (3, 64), (1, 64)]


def test_int32_labels_and_ids_are_accepted():
    case = make_case(n=8, v=70, k=5, seed=13)
    ref, ref_grad = loss_and_grad(reference_loss, case)
    case["labels"] = case["labels"].int()
    case["teacher_ids"] = case["teacher_ids"].int()
    ours, grad = loss_and_grad(distill_loss, case)
    assert_matches(ours, grad, ref, ref_grad, torch.float32)
