"""CPU tests of the distillation loss: chunked path and fused-linear variant vs the float64 reference."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from fastkd.errors import user_errors
from fastkd.kernels import (
    DistillLoss,
    HiddenProjector,
    LossInputError,
    LossSpec,
    LossTerms,
    Teacher,
    distill_loss,
    fused_linear_distill_loss,
    reference_loss,
)
from loss_cases import (
    hand_tail_case,
    hard_tail_case,
    independent_loss,
    loss_and_grad,
    make_case,
    student_tail,
    teacher_of,
)

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
    r = reference_loss(z, y, Teacher(ids, lp, tail))
    assert float(r.ce) == pytest.approx(ce, rel=1e-12)
    assert float(r.kl) == pytest.approx(kl_tail, rel=1e-12)
    kl_renorm = 0.625 * math.log(0.625 / 0.4) + 0.375 * math.log(0.375 / 0.2)
    r = reference_loss(z, y, Teacher(ids, lp), LossSpec(mode="renorm"))
    assert float(r.kl) == pytest.approx(kl_renorm, rel=1e-12)
    s_ids = torch.tensor([[2, 2, 0, -1]])
    counts = torch.tensor([[1, 2, 1, 5]])
    kl_sampled = 0.75 * math.log(0.75 / 0.3) + 0.25 * math.log(0.25 / 0.1)
    r = reference_loss(z, y, Teacher(s_ids, torch.zeros(1, 4), counts=counts), LossSpec(mode="sampled"))
    assert float(r.kl) == pytest.approx(kl_sampled, rel=1e-12)
    # tau = 2: student softmax(z/2); teacher p^(1/2), tail spread over V-k = 2 ids -> 2 * (0.2/2)^(1/2)
    qt = [math.sqrt(x) for x in (0.1, 0.2, 0.3, 0.4)]
    qt = [x / sum(qt) for x in qt]
    pt = [math.sqrt(0.5), math.sqrt(0.3), 2 * math.sqrt(0.1)]
    pt = [x / sum(pt) for x in pt]
    q_tail = 1 - qt[3] - qt[1]
    kl_t = pt[0] * math.log(pt[0] / qt[3]) + pt[1] * math.log(pt[1] / qt[1]) + pt[2] * math.log(pt[2] / q_tail)
    r = reference_loss(z, y, Teacher(ids, lp, tail), LossSpec(temperature=2.0))
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
    terms = distill_loss(z, case["labels"], teacher_of(case), inplace=True)
    terms.total.backward()
    assert terms.total.item() == pytest.approx(ref.total.item(), rel=1e-6)
    torch.testing.assert_close(buf, ref_grad)  # the logits buffer now holds the gradient
    torch.testing.assert_close(z.grad, ref_grad)


def test_backward_scales_by_upstream_gradient():
    case = make_case(n=6, v=89, k=3, seed=8)
    _, grad = loss_and_grad(distill_loss, case)
    z = case["logits"].clone().requires_grad_(True)
    terms = distill_loss(z, case["labels"], teacher_of(case))
    (terms.total * 2.5).backward()
    torch.testing.assert_close(z.grad, grad * 2.5)


def test_finite_difference_tiny_case():
    for mode in MODES:
        case = make_case(n=3, v=7, k=3, mode=mode, dtype=torch.float64, seed=4)

        def f(z):
            return distill_loss(z, case["labels"], teacher_of(case), LossSpec(mode=mode, temperature=1.5,
                                                                               kl_weight=0.8)).total

        z = case["logits"].clone().requires_grad_(True)
        assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7)


def test_no_grad_forward_matches():
    case = make_case(n=7, v=120, k=6, seed=9)
    before = case["logits"].clone()
    with torch.no_grad():
        terms = distill_loss(case["logits"], case["labels"], teacher_of(case), inplace=True)
    assert torch.equal(case["logits"], before)  # no gradient wanted: the logits are left alone
    ref = reference_loss(case["logits"], case["labels"], teacher_of(case))
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
        distill_loss(case["logits"], case["labels"], Teacher(ids, lp, case["tail"]))
    # a plain error of the kernels layer (which imports nothing from the app); the CLI prints it as one line
    assert issubclass(LossInputError, ValueError) and LossInputError in user_errors()


def test_sampled_mode_allows_more_draws_than_vocab():
    case = make_case(n=4, v=10, k=25, mode="sampled", seed=1)
    ref, ref_grad = loss_and_grad(reference_loss, case, mode="sampled")
    ours, grad = loss_and_grad(distill_loss, case, mode="sampled")
    assert_matches(ours, grad, ref, ref_grad, torch.float32)


@pytest.mark.parametrize("field", ["teacher_logprobs", "tail"])
def test_nan_in_teacher_values_is_a_clear_error(field):
    case = make_case(n=6, v=40, k=4, seed=1)
    case[field][0] = float("nan")  # row 0 counts (label not ignored)
    with pytest.raises(LossInputError, match=f"teacher.{field.removeprefix('teacher_')}"):
        distill_loss(case["logits"], case["labels"], teacher_of(case))


@pytest.mark.parametrize("bad", ["temperature_inf", "count_inf", "mass_over_one", "int_logits", "empty_vocab",
                                 "fused_mixed_dtype"])
def test_more_bad_inputs_are_clear_errors(bad):
    """Inputs that used to give NaN, a silently renormalised target or a raw torch error deep inside."""
    case = make_case(n=6, v=40, k=4, seed=1)
    args = [case["logits"], case["labels"], case["teacher_ids"], case["teacher_logprobs"], case["tail"]]
    kw, match = {}, None
    if bad == "temperature_inf":
        kw, match = dict(temperature=float("inf")), "temperature"
    elif bad == "count_inf":
        cases = make_case(n=6, v=40, k=4, mode="sampled", seed=1)
        counts = cases["counts"].clone().float()
        counts[0, 0] = float("inf")
        args = [cases["logits"], cases["labels"], cases["teacher_ids"], None, None]
        kw, match = dict(mode="sampled", counts=counts), "counts row 0"
    elif bad == "mass_over_one":
        args[3] = torch.zeros_like(case["teacher_logprobs"])  # logits of 0, not log-probs: the mass sums to k
        match = "sum to 4 > 1"
    elif bad == "int_logits":
        args[0] = case["logits"].long()
        match = "floating-point"
    elif bad == "empty_vocab":
        args[0] = torch.zeros(6, 0)
        args[2] = torch.full((6, 0), -1)
        args[3] = torch.zeros(6, 0)
        match = "vocabulary is empty"
    if bad == "fused_mixed_dtype":
        with pytest.raises(LossInputError, match="dtype"):
            fused_linear_distill_loss(torch.randn(6, 8, dtype=torch.bfloat16), torch.randn(40, 8), args[1],
                                      Teacher(*args[2:]))
        return
    with pytest.raises(LossInputError, match=match):  # a bad setting is refused as the LossSpec is made
        counts = kw.pop("counts", None)
        distill_loss(*args[:2], Teacher(*args[2:], counts=counts), LossSpec(**kw))


def test_teacher_mass_slightly_over_one_from_rounding_is_accepted():
    """bf16-rounded log-probs (top-k + tail about 1 + 1e-3) are a normal cache, not an error."""
    case = make_case(n=6, v=40, k=4, seed=3)
    lp = case["teacher_logprobs"].to(torch.bfloat16).float()
    lp[:, 0] += 2e-3
    distill_loss(case["logits"], case["labels"], Teacher(case["teacher_ids"], lp, case["tail"]))


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
        teacher = Teacher(case["teacher_ids"], case["teacher_logprobs"], kw.pop("tail"))
        distill_loss(case["logits"], case["labels"], teacher, LossSpec(**kw))


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
    args = (case["labels"], teacher_of(case), LossSpec(mode=mode, ce_weight=0.6, kl_weight=1.1, temperature=1.3))

    leaves = [t.clone().requires_grad_(True) for t in (h, w) + ((b,) if with_bias else ())]
    logits = leaves[0] @ leaves[1].t() + (leaves[2] if with_bias else 0)
    ref = reference_loss(logits, *args)
    ref_grads = torch.autograd.grad(ref.total, leaves)

    ours_leaves = [t.float().clone().requires_grad_(True) for t in (h, w) + ((b,) if with_bias else ())]
    ours = fused_linear_distill_loss(ours_leaves[0], ours_leaves[1], *args[:2], replace(args[2], chunk_size=4),
                                     bias=ours_leaves[2] if with_bias else None)
    grads = torch.autograd.grad(ours.total, ours_leaves)
    assert ours.total.item() == pytest.approx(ref.total.item(), rel=1e-5)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))


def test_fused_linear_bf16_and_upstream_scale():
    case = make_case(n=9, v=130, k=5, seed=2)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(9, 16, generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(130, 16, generator=g) * 0.3).bfloat16().requires_grad_(True)
    args = (case["labels"], teacher_of(case))
    ours = fused_linear_distill_loss(h, w, *args, LossSpec(chunk_size=2))
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
    module = DistillLoss(LossSpec(ce_weight=0.5, kl_weight=2.0, hidden_weight=0.3), projector=HiddenProjector(6, [10]))
    assert any(k.startswith("projector.") for k in module.state_dict())
    hs = [torch.randn(8, 6, requires_grad=True)]
    ht = [torch.randn(8, 10)]
    z = case["logits"].clone().requires_grad_(True)
    terms = module(z, case["labels"], teacher_of(case), student_hidden=hs, teacher_hidden=ht)
    ref = reference_loss(case["logits"], case["labels"], teacher_of(case))
    hid = module.projector(hs, ht, mask=case["labels"] != -100)
    assert terms.total.item() == pytest.approx(0.5 * float(ref.ce) + 2.0 * float(ref.kl) + 0.3 * float(hid), rel=1e-5)
    assert float(terms.hidden) == pytest.approx(float(hid), rel=1e-6)
    assert not terms.ce.requires_grad and not terms.kl.requires_grad and not terms.hidden.requires_grad
    terms.total.backward()
    assert z.grad is not None and hs[0].grad is not None
    assert module.projector.projections[0].weight.grad is not None
    with pytest.raises(LossInputError):
        DistillLoss(LossSpec(hidden_weight=1.0))
    with pytest.raises(LossInputError, match="were not given"):  # the hidden term needs both sides' states
        module(z, case["labels"], teacher_of(case))


def test_fused_linear_never_builds_more_than_one_chunk(monkeypatch):
    import fastkd.kernels.chunked as backend

    seen = []
    real = backend.chunk_loss_and_grad

    def recording(z, *args, **kw):
        seen.append(tuple(z.shape))
        return real(z, *args, **kw)

    monkeypatch.setattr(backend, "chunk_loss_and_grad", recording)
    case = make_case(n=10, v=64, k=4, seed=5)
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(64, 8, requires_grad=True)
    fused_linear_distill_loss(h, w, case["labels"], teacher_of(case), LossSpec(chunk_size=3)).total.backward()
    assert seen == [(3, 64), (3, 64), (3, 64), (1, 64)]


def test_int32_labels_and_ids_are_accepted():
    case = make_case(n=8, v=70, k=5, seed=13)
    ref, ref_grad = loss_and_grad(reference_loss, case)
    case["labels"] = case["labels"].int()
    case["teacher_ids"] = case["teacher_ids"].int()
    ours, grad = loss_and_grad(distill_loss, case)
    assert_matches(ours, grad, ref, ref_grad, torch.float32)


# ---------------------------------------------------------------- the student's tail: exact complement, no floor
# Every check below compares with tests/loss_cases.independent_loss (float64, row by row,
# the tail as a logsumexp over the complement), never with code from fastkd.kernels.

def assert_independent(ours, grad, case, dtype, loss_rel=1e-5, **kw):
    """Loss terms and the full [N, V] gradient (inside and outside K) against the independent float64 loss."""
    z = case["logits"].double().requires_grad_(True)
    ref = independent_loss(z, case["labels"], case["teacher_ids"], case["teacher_logprobs"], case["tail"],
                           case["counts"], **kw)
    ref_grad, = torch.autograd.grad(ref.total, z)
    for name in ("total", "ce", "kl"):
        a, b = float(getattr(ours, name).detach()), float(getattr(ref, name))
        assert math.isfinite(a) and abs(a - b) <= loss_rel * max(1.0, abs(b)), (name, a, b)
    assert int(ours.num_tokens) == ref.num_tokens
    assert torch.isfinite(grad).all()
    grad_tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    err = (grad.double() - ref_grad).abs()
    assert float(err.max()) <= grad_tol * float(ref_grad.abs().max()), (float(err.max()), float(ref_grad.abs().max()))
    # outside the top-k, row by row: the sum (q_tail - t_tail, the term the floor used to zero) and each entry
    outside = torch.ones_like(grad, dtype=torch.bool)
    for r in range(grad.shape[0]):
        outside[r, case["teacher_ids"][r][case["teacher_ids"][r] >= 0]] = False
    for r in range(grad.shape[0]):
        o = outside[r]
        got, want = grad[r, o].double(), ref_grad[r, o]
        assert abs(float(got.sum() - want.sum())) <= grad_tol * max(float(want.abs().sum()), 1e-6), (r, got.sum(), want.sum())
    return ref, ref_grad


CPU_PATHS = ["reference", "chunked", "fused_linear"]


def run_path(path, case, **kw):
    """(terms, dL/dlogits) from one CPU implementation. fused_linear: hidden = logits, weight = I (so dL/dh = dL/dz)."""
    if path == "reference":
        return loss_and_grad(reference_loss, case, **kw)
    if path == "chunked":
        return loss_and_grad(distill_loss, case, chunk_size=kw.pop("chunk_size", 2), **kw)
    kw.pop("chunk_size", None)
    h = case["logits"].clone().requires_grad_(True)
    eye = torch.eye(h.shape[1], dtype=h.dtype)
    terms = fused_linear_distill_loss(h, eye, case["labels"], teacher_of(case), LossSpec(chunk_size=4, **kw))
    terms.total.backward()
    return terms, h.grad


@pytest.mark.parametrize("path", CPU_PATHS)
def test_hand_computed_tail_case(path):
    """q_tail ~ 2e-9 (< the old 1e-6 floor), teacher tail 0.3: loss and gradient from math only."""
    case, want = hand_tail_case(torch.float64 if path == "reference" else torch.float32)
    terms, grad = run_path(path, case, ce_weight=0.0)
    assert float(terms.kl) == pytest.approx(want["kl"], rel=1e-6)
    assert float(terms.ce) == pytest.approx(want["ce"], rel=1e-6)
    torch.testing.assert_close(grad[0].double(), torch.tensor(want["grad_kl"], dtype=torch.float64), rtol=1e-5, atol=1e-7)
    assert float(grad[0, 2:].sum()) == pytest.approx(-0.3, rel=1e-5)  # q_tail - p_tail outside K
    terms, grad = run_path(path, case, kl_weight=0.0)
    torch.testing.assert_close(grad[0].double(), torch.tensor(want["grad_ce"], dtype=torch.float64), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_hard_tail_matches_independent(path, temperature):
    """Student top-k mass > 1 - 1e-6 (down to q_tail = 0 in fp32), teacher tail 0.3, padding row, labels in/out of K."""
    case = hard_tail_case()
    kw = dict(ce_weight=0.7, kl_weight=1.3, temperature=temperature)
    ours, grad = run_path(path, case, **kw)
    assert_independent(ours, grad, case, torch.float32, **kw)
    assert torch.all(grad[4] == 0)  # padding row


def test_hard_tail_exercises_the_old_floor():
    """The case is hard: the student's tail is below 1e-6 (and 0 in fp32 in row 2), and the loss sees it."""
    case = hard_tail_case()
    log_q_tail = student_tail(case["logits"], case["teacher_ids"])
    assert float(log_q_tail[1].exp()) < 1e-6 and float(log_q_tail[2]) < -150
    q32 = torch.softmax(case["logits"], 1).gather(1, case["teacher_ids"]).sum(1)
    assert float(1 - q32[2]) == 0.0  # by subtraction in fp32 the tail is exactly 0
    ours = distill_loss(case["logits"], case["labels"], teacher_of(case))
    floored = 0.3 * (log_q_tail[:4].clamp_min(math.log(1e-6)) - log_q_tail[:4]).sum() / 5  # what the floor drops
    assert float(floored) > 10
    ref = independent_loss(case["logits"], case["labels"], case["teacher_ids"], case["teacher_logprobs"], case["tail"])
    assert float(ours.total) == pytest.approx(float(ref.total), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["chunked", "fused_linear"])
def test_hard_tail_dtypes(path, dtype):
    case = hard_tail_case(dtype=dtype)
    ours, grad = run_path(path, case, temperature=1.5)
    assert grad.dtype == dtype
    assert_independent(ours, grad, case, dtype, loss_rel=1e-4 if dtype == torch.bfloat16 else 1e-5, temperature=1.5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("which", ["random", "hard"])
def test_every_row_gradient_sums_to_zero(mode, temperature, which):
    """CE and KL gradients each sum to 0 over a row's V entries (softmax invariance), so their sum does."""
    case = hard_tail_case() if which == "hard" else make_case(n=12, v=301, k=8, mode=mode, seed=3)
    if which == "hard" and mode != "tail":
        case["counts"] = torch.randint(1, 4, case["teacher_ids"].shape)
    for path in ("chunked", "fused_linear"):
        _, grad = run_path(path, case, mode=mode, temperature=temperature, ce_weight=0.6, kl_weight=1.4)
        sums = grad.double().sum(1).abs()
        assert float(sums.max()) <= 1e-6 * max(1.0, float(grad.abs().sum(1).max())), (path, sums)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_tail_underflow_is_finite_and_exact(path):
    """q_tail underflows to 0 in fp32 (logit margin 200): log q_tail comes from the complement's logsumexp (~ -200)."""
    case = hard_tail_case()
    rows = torch.tensor([2])
    sub = {key: (val[rows] if val is not None else None) for key, val in case.items()}
    if path == "reference":
        sub["logits"] = sub["logits"].double()
    ours, grad = run_path(path, sub, ce_weight=0.0)
    assert math.isfinite(float(ours.total)) and torch.isfinite(grad).all()
    assert float(ours.kl) > 50  # 0.3 * (log 0.3 + ~200) - the top-k's small terms
    assert_independent(ours, grad, sub, torch.float64 if path == "reference" else torch.float32, ce_weight=0.0)
    outside = torch.ones(grad.shape[1], dtype=torch.bool)
    outside[sub["teacher_ids"][0]] = False
    assert float(grad[0, outside].sum()) == pytest.approx(-0.3, rel=1e-5)  # q_tail - t_tail with q_tail ~ 1e-87


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("tail", [0.3, 1e-7])
def test_topk_covering_the_vocabulary_drops_the_tail(path, tail):
    """k = V: the complement is empty; the tail bucket is dropped (top-k renormalised), loss and gradient finite."""
    case = make_case(n=6, v=16, k=16, seed=2)
    missing = sorted(set(range(16)) - set(case["teacher_ids"][2].tolist()))
    case["teacher_ids"][2, -1] = missing[0]  # make_case left one slot unused: every id valid, all 16 in K
    case["tail"] = torch.full((6,), tail)
    if path == "reference":
        case["logits"] = case["logits"].double()
    ours, grad = run_path(path, case)
    assert math.isfinite(float(ours.total)) and torch.isfinite(grad).all()
    assert_independent(ours, grad, case, torch.float64 if path == "reference" else torch.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_chunked_matches_independent_on_random_cases(mode, temperature):
    case = make_case(n=12, v=211, k=8, mode=mode, seed=17)
    kw = dict(mode=mode, temperature=temperature, ce_weight=0.8, kl_weight=1.1)
    for path in CPU_PATHS:
        if path == "reference":
            c = dict(case, logits=case["logits"].double())
            ours, grad = run_path(path, c, **kw)
            assert_independent(ours, grad, c, torch.float64, **kw)
        else:
            ours, grad = run_path(path, case, **kw)
            assert_independent(ours, grad, case, torch.float32, **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_fused_linear_dtypes_match_independent(dtype, mode):
    """float64 hidden/weight used to raise a scatter dtype error; fp32 and bf16 must keep working."""
    g = torch.Generator().manual_seed(31)
    case = make_case(n=10, v=97, k=6, mode=mode, seed=31)
    h = torch.randn(10, 16, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    w = (torch.randn(97, 16, generator=g, dtype=torch.float64) * 0.4).to(dtype).requires_grad_(True)
    b = torch.randn(97, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    kw = dict(mode=mode, temperature=1.3, ce_weight=0.9, kl_weight=1.2)
    args = (case["labels"], case["teacher_ids"], case["teacher_logprobs"], case["tail"])
    ours = fused_linear_distill_loss(h, w, case["labels"], teacher_of(case), LossSpec(chunk_size=3, **kw), bias=b)
    grads = torch.autograd.grad(ours.total, (h, w, b))
    leaves = [t.detach().double().requires_grad_(True) for t in (h, w, b)]
    ref = independent_loss(leaves[0] @ leaves[1].t() + leaves[2], *args, case["counts"], **kw)
    ref_grads = torch.autograd.grad(ref.total, leaves)
    rel = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert float(ours.total) == pytest.approx(float(ref.total), rel=rel)
    for a, r in zip(grads, ref_grads):
        assert a.dtype == dtype
        assert float((a.double() - r).abs().max()) <= (rel if dtype != torch.bfloat16 else 3e-2) * 10 * float(r.abs().max())


def _graph_and_reference(path: str, **shape):
    """(leaf logits, the loss terms of one graph through `path`, the float64 reference gradient)."""
    case = make_case(**shape)
    z = case["logits"].double().requires_grad_(True)
    ref = reference_loss(z, case["labels"], teacher_of(case))
    want, = torch.autograd.grad(ref.total, z)
    x = case["logits"].clone().requires_grad_(True)
    if path == "chunked":
        return x, distill_loss(x, case["labels"], teacher_of(case), LossSpec(chunk_size=3)), want
    return x, fused_linear_distill_loss(x, torch.eye(shape["v"]), case["labels"], teacher_of(case),
                                        LossSpec(chunk_size=4)), want


@pytest.mark.parametrize("path", ["chunked", "fused_linear"])
def test_upstream_gradient_scales_without_a_second_buffer_and_survives_retain_graph(path):
    """The stored gradient is scaled in place by the first backward (no host sync on a GPU); a second
    backward through the same graph (retain_graph) with another factor still gives factor x gradient."""
    x, terms, want = _graph_and_reference(path, n=10, v=97, k=6, seed=41)
    (terms.total * 0.25).backward(retain_graph=True)
    torch.testing.assert_close(x.grad.double(), 0.25 * want, rtol=1e-5, atol=1e-7)
    x.grad = None
    (terms.total * 3.0).backward()
    torch.testing.assert_close(x.grad.double(), 3.0 * want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("path", ["chunked", "fused_linear"])
@pytest.mark.parametrize("first", [1.0, 0.5])
def test_repeated_backward_accumulates_exactly_or_refuses(path, first):
    """Backwards through one graph (retain_graph) into a leaf that keeps its .grad: autograd may adopt the
    stored buffer as .grad and accumulate into it, so each later backward gives the summed factors times
    the gradient, or a clear refusal; never a silently wrong sum (a third backward once gave 4x for 3x)."""
    x, terms, want = _graph_and_reference(path, n=8, v=61, k=5, seed=43)
    applied = 0.0
    for factor in (first, 2.0, 1.0, 3.0):
        try:
            (terms.total * factor).backward(retain_graph=True)
        except RuntimeError as err:
            assert "later backward" in str(err) and applied > 0
            break
        applied += factor
        torch.testing.assert_close(x.grad.double(), applied * want, rtol=1e-5, atol=1e-7)
    assert applied >= first + 2.0  # the second backward, the common case, is always served
