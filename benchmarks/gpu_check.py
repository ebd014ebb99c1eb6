"""One-shot GPU check of the distillation loss (called by benchmarks/gpu_check.sh).

    PYTHON=python bash benchmarks/gpu_check.sh             # from the repo root, one CUDA GPU, a few minutes
    python benchmarks/gpu_check.py --self-test-cpu         # the same code paths, tiny, Triton interpreted on CPU

1. Correctness on CUDA: the Triton kernel (through `distill_loss`, the public CUDA path) against
   the float64 reference (`reference_loss`, autograd) for every mode (tail/renorm/sampled), fp32
   and bf16 logits, tau 1 and 2, at V = 151,936 (rows with the student's tail below 1e-6 and rows
   where it is 0 in fp32 included), in place and not; the fused-linear variant; then the small
   hard cases of the tests (student top-k mass > 1 - 1e-6, teacher tail 0.3, k = V) against the
   tests' own independent float64 loss. Prints the max abs error of loss and gradient per case.
2. Time (CUDA events, median after warm-up), peak memory (torch.cuda.max_memory_allocated above
   the inputs) and bandwidth (logits read + gradient written / time, against the device's nominal
   bandwidth and a measured device copy) for the Triton loss vs a naive PyTorch loss (full
   log_softmax + gather + CE + KL, autograd), plain cross-entropy, and, from hidden states, the
   fused-linear loss and liger-kernel's LigerFusedLinearJSDLoss when it imports.

Output goes to stdout and, when $OUT is set, to $OUT/gpu_check.txt. Exit status: 0 when every
correctness check passed (or there is no GPU), 1 otherwise. Not collected by pytest (not in tests/).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
T0 = time.time()
V_BIG = 151_936


class Tee:
    """stdout and a file at once (line-flushed, so a killed run still leaves its output)."""

    def __init__(self, stream, path: Path | None):
        self.stream = stream
        self.file = open(path, "w", buffering=1) if path else None

    def write(self, text):
        self.stream.write(text)
        if self.file:
            self.file.write(text)
        return len(text)

    def flush(self):
        self.stream.flush()
        if self.file:
            self.file.flush()


def say(*parts):
    print(*parts, flush=True)


def elapsed() -> float:
    return time.time() - T0


def load_kernels():
    """fastkd.kernels from this checkout, installed or not.

    pyproject maps the folder kernels/ to fastkd.kernels; a plain sys.path entry cannot, so the
    package is loaded from its files here. fastkd itself comes from the checkout too (its
    __init__ drops the checkout root from sys.path again, see fastkd/__init__.py).
    """
    sys.path.insert(0, str(ROOT))
    import fastkd

    if "fastkd.kernels" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "fastkd.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastkd.kernels"] = module
        spec.loader.exec_module(module)
        fastkd.kernels = module
    for sub in ("tests", "benchmarks"):  # the tests' case builders and the CPU table's naive loss
        if str(ROOT / sub) not in sys.path:
            sys.path.append(str(ROOT / sub))
    import fastkd.kernels as kernels

    return fastkd, kernels


# ---------------------------------------------------------------- cases

def big_case(torch, n, v, k, mode, dtype, seed, dev):
    """Random rows plus hard ones: every 8th row puts > 1 - 1e-6 of its mass on K (margin +30), every
    8th from row 4 so much that the tail is 0 in fp32 (+300); labels in and outside K; padding rows
    with NaN teacher values; unused slots; repeated ids in mode sampled."""
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    logits = torch.randn(n, v, generator=g, device=dev) * 3
    labels = torch.randint(0, v, (n,), generator=g, device=dev)
    base = torch.randint(0, v, (n, 1), generator=g, device=dev)
    ids = (base + torch.arange(k, device=dev) * 7919) % v  # distinct: 7919 is prime and does not divide V
    boost = torch.zeros(n, device=dev)
    boost[0::8] = 30.0
    boost[4::8] = 300.0
    logits.scatter_add_(1, ids, boost[:, None].expand(n, k).contiguous())
    rows = torch.arange(n, device=dev)
    tail = counts = None
    if mode == "sampled":
        ids[::2, 1] = ids[::2, 0]  # repeated draws
        ids[1::3, -1] = -1
        counts = torch.randint(1, 6, (n, k), generator=g, device=dev)
        logprobs = torch.zeros(n, k, device=dev)
    else:
        levels = torch.tensor([0.3, 1e-7, 0.999, 0.05], device=dev)
        tail = levels[rows % 4]
        p = torch.softmax(torch.randn(n, k, generator=g, device=dev) * 2, 1) * (1 - tail)[:, None]
        logprobs = p.log()
        ids[2::16, -1] = -1  # an unused slot
    labels[::3] = ids[::3, 0].clamp_min(0)  # labels inside K
    labels[1::4] = -100  # padding
    if mode != "sampled":
        logprobs[1::4] = float("nan")  # padding rows' teacher values are never read
        tail[1::4] = float("nan")
    return dict(logits=logits.to(dtype), labels=labels, teacher_ids=ids, teacher_logprobs=logprobs, tail=tail,
                counts=counts)


def to_dev(case, dev):
    return {key: (val.to(dev) if val is not None else None) for key, val in case.items()}


# ---------------------------------------------------------------- error metrics

def outside_mask(torch, ids, v):
    """[N, V] bool: True outside the row's valid teacher ids."""
    n = ids.shape[0]
    m = torch.ones(n, v + 1, dtype=torch.bool, device=ids.device)
    m.scatter_(1, torch.where(ids >= 0, ids, v).long(), False)
    return m[:, :v]


def compare(torch, ours, grad, ref, ref_grad, ids, dtype):
    """(ok, one line): loss and gradient errors against the reference, with the tolerances of the tests."""
    loss_tol, grad_tol = {torch.float64: (1e-6, 1e-6), torch.float32: (1e-5, 1e-5), torch.float16: (1e-4, 2e-3),
                          torch.bfloat16: (1e-4, 1.6e-2)}[dtype]
    d_loss = max(abs(float(getattr(ours, name)) - float(getattr(ref, name))) for name in ("total", "ce", "kl"))
    ref_total = float(ref.total)
    rel_loss = d_loss / max(1.0, abs(ref_total))
    g = grad.double()
    diff = g - ref_grad
    d_grad = float(diff.abs().max())
    g_max = float(ref_grad.abs().max())
    out = outside_mask(torch, ids, g.shape[1])
    row_abs = g.abs().sum(1)
    d_out = float((diff * out).sum(1).abs().max())  # error of the mass outside K, per row (the tail's pull)
    row_sum = float(g.sum(1).abs().max())  # each row's gradient must sum to 0
    finite = bool(torch.isfinite(grad).all()) and math.isfinite(float(ours.total))
    big = float(row_abs.max())
    ok = (finite and rel_loss <= loss_tol and d_grad <= grad_tol * g_max and d_out <= grad_tol * max(big, 1e-6)
          and row_sum <= max(grad_tol, 1e-6) * max(1.0, big))
    line = (f"loss {float(ours.total):.6g} vs {ref_total:.6g} max|d| {d_loss:.2e} (rel {rel_loss:.1e}) | "
            f"grad max|d| {d_grad:.2e} (/max|g| {d_grad / max(g_max, 1e-300):.1e}) | outside-K sum max|d| {d_out:.1e} | "
            f"max|row sum| {row_sum:.1e}")
    return ok, line


class Checks:
    def __init__(self):
        self.results = []

    def record(self, name, ok, line):
        self.results.append((name, ok))
        say(f"  [{'PASS' if ok else 'FAIL'}] {name:<44} {line}")

    def guard(self, name, fn):
        try:
            fn()
        except Exception as exc:  # a failing check must not stop the others
            self.results.append((name, False))
            say(f"  [FAIL] {name}: {type(exc).__name__}: {exc}")
            traceback.print_exc(file=sys.stdout)


# ---------------------------------------------------------------- correctness

def teacher_of(kernels, case):
    return kernels.Teacher(case["teacher_ids"], case["teacher_logprobs"], case["tail"], case["counts"])


def run_ours(torch, kernels, loss_fn, case, inplace=False, **kw):
    z = case["logits"].clone().requires_grad_(True)
    terms = loss_fn(z, case["labels"], teacher_of(kernels, case), kernels.LossSpec(**kw), inplace=inplace)
    terms.total.backward()
    unchanged = True if inplace else bool(torch.equal(z.detach(), case["logits"]))
    return terms, z.grad, unchanged


def run_reference(kernels, case, **kw):
    z = case["logits"].double().requires_grad_(True)
    ref = kernels.reference_loss(z, case["labels"], teacher_of(kernels, case), kernels.LossSpec(**kw))
    ref.total.backward()
    return ref, z.grad


def correctness(torch, kernels, loss_fn, dev, sizes, checks: Checks, budget: float):
    n_main, n_big, v, k = sizes["n"], sizes["n_big"], sizes["v"], sizes["k"]
    say(f"\n== 1. correctness: Triton vs float64 reference, V={v}, k={k} "
        f"(rows: 1/8 with q_tail < 1e-6, 1/8 with q_tail = 0 in fp32, 1/4 padding)")
    configs = [(mode, dtype, tau, n_main, False) for mode in ("tail", "renorm", "sampled")
               for dtype in (torch.float32, torch.bfloat16) for tau in (1.0, 2.0)]
    configs += [("tail", torch.float32, 1.0, n_big, True), ("tail", torch.bfloat16, 1.0, n_big, True),
                ("sampled", torch.bfloat16, 2.0, n_main, True)]
    for seed, (mode, dtype, tau, n, inplace) in enumerate(configs):
        if elapsed() > budget:
            say(f"  [skip] time budget ({budget:.0f} s) spent: remaining configurations not run")
            break
        name = f"{mode} {str(dtype)[6:]} tau={tau:g} N={n}{' inplace' if inplace else ''}"

        def one():
            case = big_case(torch, n, v, k, mode, dtype, seed, dev)
            kw = dict(mode=mode, temperature=tau, ce_weight=0.7, kl_weight=1.3)
            ours, grad, unchanged = run_ours(torch, kernels, loss_fn, case, inplace=inplace, **kw)
            ref, ref_grad = run_reference(kernels, case, **kw)
            ok, line = compare(torch, ours, grad, ref, ref_grad, case["teacher_ids"], dtype)
            if not unchanged:
                line += " | LOGITS MODIFIED"
            checks.record(name, ok and unchanged, line)
            del case, ours, grad, ref, ref_grad

        checks.guard(name, one)
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    def no_grad_leaves_logits():
        case = big_case(torch, 64, v, k, "sampled", torch.bfloat16, 99, dev)
        before = case["logits"].clone()
        with torch.no_grad():
            terms = loss_fn(case["logits"], case["labels"], teacher_of(kernels, case), kernels.LossSpec(mode="sampled"),
                            inplace=True)
        ref = kernels.reference_loss(case["logits"].double(), case["labels"], teacher_of(kernels, case),
                                     kernels.LossSpec(mode="sampled"))
        same = bool(torch.equal(case["logits"], before))
        d = abs(float(terms.total) - float(ref.total))
        checks.record("no-grad forward (sampled, bf16)", same and d <= 1e-4 * max(1.0, abs(float(ref.total))),
                      f"loss |d| {d:.1e}, logits unchanged: {same}")

    checks.guard("no-grad forward", no_grad_leaves_logits)

    def fused_linear(dtype):
        n, h = sizes["n_fused"], 128
        g = torch.Generator(device=dev)
        g.manual_seed(7)
        case = big_case(torch, n, v, k, "tail", torch.float32, 11, dev)
        hid = (torch.randn(n, h, generator=g, device=dev) / h**0.5).to(dtype).requires_grad_(True)
        w = (torch.randn(v, h, generator=g, device=dev) * 2).to(dtype).requires_grad_(True)
        spec = kernels.LossSpec(temperature=1.5, ce_weight=0.8, kl_weight=1.2)
        args = (case["labels"], teacher_of(kernels, case), spec)
        ours = kernels.fused_linear_distill_loss(hid, w, *args)
        dh, dw = torch.autograd.grad(ours.total, (hid, w))
        h64, w64 = hid.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
        ref = kernels.reference_loss(h64 @ w64.t(), *args)
        rh, rw = torch.autograd.grad(ref.total, (h64, w64))
        tol = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
        d_loss = abs(float(ours.total) - float(ref.total))
        e_h = float((dh.double() - rh).abs().max()) / float(rh.abs().max())
        e_w = float((dw.double() - rw).abs().max()) / float(rw.abs().max())
        ok = d_loss <= tol * max(1.0, abs(float(ref.total))) and e_h <= tol and e_w <= tol and dh.dtype == dtype
        checks.record(f"fused_linear tail {str(dtype)[6:]} N={n} H={h}", ok,
                      f"loss |d| {d_loss:.2e} | dL/dh max|d|/max {e_h:.1e} | dL/dW max|d|/max {e_w:.1e}")

    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        if elapsed() > budget:
            break
        checks.guard(f"fused_linear {dtype}", lambda dtype=dtype: fused_linear(dtype))

    say("\n== 1b. the tests' hard cases on the device vs the tests' independent float64 loss (tail = complement logsumexp)")
    import loss_cases as cases

    def small(name, case_cpu, dtype, **kw):
        case = to_dev(case_cpu, dev)
        case["logits"] = case["logits"].to(dtype)
        for inplace in (False, True):
            ours, grad, unchanged = run_ours(torch, kernels, loss_fn, case, inplace=inplace, **kw)
            z = case["logits"].cpu().double().requires_grad_(True)
            ref = cases.independent_loss(z, case_cpu["labels"], case_cpu["teacher_ids"], case_cpu["teacher_logprobs"],
                                         case_cpu["tail"], case_cpu["counts"], **kw)
            ref_grad, = torch.autograd.grad(ref.total, z)
            ok, line = compare(torch, ours, grad.cpu(), ref, ref_grad, case_cpu["teacher_ids"], dtype)
            if not unchanged:
                line += " | LOGITS MODIFIED"
            checks.record(f"{name}{' inplace' if inplace else ''}", ok and unchanged, line)

    hand, want = cases.hand_tail_case()
    checks.guard("hand case", lambda: small(f"hand case (exact KL {want['kl']:.6f})", hand, torch.float32, ce_weight=0.0))
    for dtype in (torch.float32, torch.bfloat16):
        for tau in (1.0, 0.5, 2.0):
            checks.guard("hard case", lambda dtype=dtype, tau=tau: small(
                f"hard_tail_case {str(dtype)[6:]} tau={tau:g}", cases.hard_tail_case(), dtype,
                temperature=tau, ce_weight=0.7, kl_weight=1.3))
    cover = cases.make_case(n=4, v=16, k=16, seed=2)
    cover["tail"] = cover["tail"] * 0 + 0.3
    checks.guard("k = V", lambda: small("k = V (tail dropped)", cover, torch.float32))


# ---------------------------------------------------------------- timing

def nominal_bandwidth(torch, dev) -> tuple[float | None, str]:
    """Bytes/s from the datasheet by device name, else from the memory clock and bus width if torch exposes them."""
    if dev.type != "cuda":
        return None, "n/a"
    name = torch.cuda.get_device_name(dev)
    table = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("H800", 3.35e12),
             ("GH200", 4.0e12), ("B200", 8.0e12), ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12),
             ("A100", 1.555e12), ("L40S", 0.864e12), ("L40", 0.864e12), ("A10G", 0.6e12), ("A10", 0.6e12),
             ("L4", 0.3e12), ("RTX 4090", 1.008e12), ("RTX 3090", 0.936e12), ("V100", 0.9e12)]
    for key, bw in table:
        if key in name:
            return bw, f"datasheet for '{key}'"
    props = torch.cuda.get_device_properties(dev)
    clock = getattr(props, "memory_clock_rate", None)
    width = getattr(props, "memory_bus_width", None)
    if clock and width:
        return 2.0 * clock * 1e3 * width / 8, "memory clock x bus width (DDR)"
    return None, "unknown device"


class Timer:
    def __init__(self, torch, dev):
        self.torch, self.dev = torch, dev

    def median_ms(self, step, setup=None, reps=10, warmup=3):
        torch = self.torch
        for _ in range(warmup):
            if setup:
                setup()
            step()
        times = []
        for _ in range(reps):
            if setup:
                setup()
            if self.dev.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                step()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    def peak_bytes(self, step, setup=None):
        torch = self.torch
        if self.dev.type != "cuda":
            return float("nan")
        if setup:
            setup()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base


def measure_variant(torch, timer, dev, leaf: dict, name: str, step, setup, **timing) -> dict:
    """One table row: peak memory, then the median time, of `step` after `setup`; an error becomes the row."""
    try:
        peak = timer.peak_bytes(step, setup)
        leaf.clear()
        ms = timer.median_ms(step, setup, **timing)
        return dict(name=name, ms=ms, peak=peak)
    except Exception as exc:  # one variant failing (e.g. out of memory) must not stop the others
        return dict(name=name, error=f"{type(exc).__name__}: {exc}")
    finally:
        leaf.clear()
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def copy_bandwidth(torch, dev, timer) -> float | None:
    if dev.type != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = timer.median_ms(lambda: dst.copy_(src), reps=10, warmup=3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / (ms / 1e3)


def print_rows(rows, base_name, floor_bytes=None, traffic=None, nominal=None, copy_bw=None):
    base = next((r for r in rows if r["name"] == base_name and "error" not in r), None)
    head = f"  {'variant':<26}{'ms':>9}{'x naive':>9}{'peak MB':>10}{'x naive':>9}"
    if floor_bytes:
        head += f"{'floor GB/s':>12}{'% nominal':>11}{'% copy':>8}{'traffic GB/s':>14}"
    say(head)
    for r in rows:
        if "error" in r:
            say(f"  {r['name']:<26}  skipped/failed: {r['error']}")
            continue
        t_x = r["ms"] / base["ms"] if base else float("nan")
        m_x = r["peak"] / base["peak"] if base and base["peak"] > 0 else float("nan")
        line = f"  {r['name']:<26}{r['ms']:>9.3f}{t_x:>9.2f}{r['peak'] / 2**20:>10.0f}{m_x:>9.2f}"
        if floor_bytes:
            bw = floor_bytes / (r["ms"] / 1e3)
            pct = f"{100 * bw / nominal:.0f}%" if nominal else "n/a"
            pct_c = f"{100 * bw / copy_bw:.0f}%" if copy_bw else "n/a"
            tr = f"{traffic[r['name']] / (r['ms'] / 1e3) / 1e9:.0f}" if r["name"] in traffic else "-"
            line += f"{bw / 1e9:>12.0f}{pct:>11}{pct_c:>8}{tr:>14}"
        say(line)


def timing(torch, kernels, loss_fn, dev, sizes, budget: float):
    from loss_table import naive_loss

    timer = Timer(torch, dev)
    nominal, how = nominal_bandwidth(torch, dev)
    copy_bw = copy_bandwidth(torch, dev, timer)
    say(f"\n== 2. time / memory / bandwidth ({'CUDA events' if dev.type == 'cuda' else 'perf_counter'}, "
        f"median of 10 after 3 warm-ups; peak = max_memory_allocated above the inputs)")
    say(f"  nominal bandwidth: {nominal / 1e9:.0f} GB/s ({how})" if nominal else f"  nominal bandwidth: {how}")
    if copy_bw:
        say(f"  measured device copy (1 GiB, read + write): {copy_bw / 1e9:.0f} GB/s")
    say("  floor GB/s = (logits read once + gradient written once) / time; traffic GB/s counts the Triton "
        "kernel's own bytes (2 reads + 1 write)")

    for n, dtype in sizes["timing"]:
        if elapsed() > budget:
            say(f"  [skip] time budget ({budget:.0f} s) spent: timing of N={n} {dtype} not run")
            continue
        v, k = sizes["v"], sizes["k"]
        say(f"\n  loss only, from a logits leaf: N={n} V={v} k={k} {str(dtype)[6:]} logits, mode tail, forward + backward")
        g = torch.Generator(device=dev)
        g.manual_seed(0)
        logits0 = (torch.randn(n, v, generator=g, device=dev) * 3).to(dtype)
        labels = torch.randint(0, v, (n,), generator=g, device=dev)
        labels[torch.rand(n, generator=g, device=dev) < 0.05] = -100
        ids = (torch.randint(0, v, (n, 1), generator=g, device=dev) + torch.arange(k, device=dev) * 7919) % v
        tail = torch.rand(n, generator=g, device=dev) * 0.5
        lp = (torch.softmax(torch.randn(n, k, generator=g, device=dev) * 2, 1) * (1 - tail)[:, None]).log()
        teach = (labels, ids, lp, tail)  # the naive loss's arguments
        ours = (labels, kernels.Teacher(ids, lp, tail))
        buf = logits0.clone()
        leaf = {}

        def fresh():  # a new leaf on logits0 (gradients of the previous step freed)
            leaf["z"] = logits0.detach().requires_grad_(True)

        def fresh_inplace():  # the in-place variant overwrites its buffer: refill it, untimed
            buf.copy_(logits0)
            leaf["z"] = buf.detach().requires_grad_(True)

        variants = {
            "ce_only (fp32 upcast)": (lambda: torch.nn.functional.cross_entropy(leaf["z"].float(), labels).backward(), fresh),
            "naive": (lambda: naive_loss(leaf["z"], *teach).backward(), fresh),
            "triton": (lambda: loss_fn(leaf["z"], *ours).total.backward(), fresh),
            "triton_inplace": (lambda: loss_fn(leaf["z"], *ours, inplace=True).total.backward(), fresh_inplace),
        }
        rows = []
        for name, (step, setup) in variants.items():
            rows.append(measure_variant(torch, timer, dev, leaf, name, step, setup))
        b = logits0.element_size()
        print_rows(rows, "naive", floor_bytes=2 * n * v * b,
                   traffic={"triton": 3 * n * v * b, "triton_inplace": 3 * n * v * b}, nominal=nominal, copy_bw=copy_bw)
        del logits0, buf, leaf
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    if elapsed() > budget:
        say(f"  [skip] time budget ({budget:.0f} s) spent: the from-hidden-states table not run")
        return
    n, h, v, k = sizes["hidden"]
    dtype = torch.bfloat16
    say(f"\n  from hidden states (output matmuls included): N={n} H={h} V={v} k={k} bf16, mode tail, forward + backward")
    g = torch.Generator(device=dev)
    g.manual_seed(1)
    hidden = (torch.randn(n, h, generator=g, device=dev) / h**0.5).to(dtype)
    weight = torch.randn(v, h, generator=g, device=dev).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g, device=dev)
    ids = (torch.randint(0, v, (n, 1), generator=g, device=dev) + torch.arange(k, device=dev) * 7919) % v
    tail = torch.rand(n, generator=g, device=dev) * 0.5
    lp = (torch.softmax(torch.randn(n, k, generator=g, device=dev) * 2, 1) * (1 - tail)[:, None]).log()
    teach = (labels, ids, lp, tail)  # the naive loss's arguments
    ours = (labels, kernels.Teacher(ids, lp, tail))
    leaf = {}

    def fresh():
        leaf["h"] = hidden.detach().requires_grad_(True)
        leaf["w"] = weight.detach().requires_grad_(True)

    variants = {
        "ce_only (fp32 upcast)": lambda: torch.nn.functional.cross_entropy(
            (leaf["h"] @ leaf["w"].t()).float(), labels).backward(),
        "naive": lambda: naive_loss(leaf["h"] @ leaf["w"].t(), *teach).backward(),
        "triton_inplace (logits)": lambda: loss_fn(leaf["h"] @ leaf["w"].t(), *ours, inplace=True).total.backward(),
        "fused_linear": lambda: kernels.fused_linear_distill_loss(leaf["h"], leaf["w"], *ours).total.backward(),
    }
    liger_note = None
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        compiled = os.environ.get("LIGER_COMPILED", "0") == "1"
        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, compiled=compiled)
        t_hidden, t_weight = hidden.clone(), weight.clone()
        variants[f"liger_jsd (compiled={compiled})"] = lambda: liger(
            leaf["h"], leaf["w"], t_hidden, t_weight, labels).backward()
        liger_note = ("liger-kernel's LigerFusedLinearJSDLoss computes the teacher's logits from its hidden states "
                      "and weight inside the loss (JSD beta=0.5, hard CE 0.5): more work by design, the online cost "
                      "the cache removes")
    except Exception as exc:
        liger_note = f"liger_kernel not importable ({type(exc).__name__}: {exc}): LigerFusedLinearJSDLoss skipped"
    rows = []
    for name, step in variants.items():
        if elapsed() > budget + 60:
            rows.append(dict(name=name, error="time budget spent"))
            continue
        rows.append(measure_variant(torch, timer, dev, leaf, name, step, fresh, reps=5, warmup=2))
    print_rows(rows, "naive")
    say(f"  note: {liger_note}")


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--self-test-cpu", action="store_true",
                        help="run every section on CPU, tiny sizes, Triton under TRITON_INTERPRET=1 (no GPU needed)")
    parser.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", 200)),
                        help="seconds after which remaining sections are skipped (default 200)")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args(argv)
    out_dir = os.environ.get("OUT")
    out_path = Path(out_dir) / "gpu_check.txt" if out_dir else None
    if out_path:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout = Tee(sys.stdout, out_path)

    if args.self_test_cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    import torch

    if not args.self_test_cpu and not torch.cuda.is_available():
        say("no GPU: nothing to check")
        return 0
    fastkd, kernels = load_kernels()
    import triton

    if args.self_test_cpu:
        dev = torch.device("cpu")
        # CPU tensors: the Triton backend named, its values unchecked as on CUDA
        loss_fn = functools.partial(kernels.distill_loss, backend="triton", validate=False)
        sizes = dict(n=12, n_big=16, n_fused=10, v=301, k=8, timing=[(16, torch.float32)], hidden=(16, 32, 301, 8))
        say(f"self-test on CPU (TRITON_INTERPRET=1): torch {torch.__version__}, triton {triton.__version__}")
    else:
        dev = torch.device("cuda", torch.cuda.current_device())
        loss_fn = kernels.distill_loss  # the public entry: CUDA tensors go to the Triton kernel
        props = torch.cuda.get_device_properties(dev)
        sizes = dict(n=512, n_big=2048, n_fused=384, v=V_BIG, k=64,
                     timing=[(8192, torch.bfloat16), (4096, torch.float32)], hidden=(4096, 2048, V_BIG, 64))
        say(f"device: {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
            f"{props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, triton {triton.__version__}")
    say(f"fastkd.kernels from {Path(kernels.__file__).parent}")
    checks = Checks()
    try:
        correctness(torch, kernels, loss_fn, dev, sizes, checks, args.budget * 0.6)
    except Exception:
        checks.results.append(("correctness section", False))
        traceback.print_exc(file=sys.stdout)
    if not args.skip_timing:
        try:
            timing(torch, kernels, loss_fn, dev, sizes, args.budget)
        except Exception:
            say("timing section failed (does not change the exit status):")
            traceback.print_exc(file=sys.stdout)
    failed = [name for name, ok in checks.results if not ok]
    say(f"\n== summary: {len(checks.results) - len(failed)}/{len(checks.results)} correctness checks passed"
        f"{' (FAILED: ' + '; '.join(failed) + ')' if failed else ''}; {elapsed():.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
