"""Print a CPU table: naive PyTorch loss vs our chunked loss vs the fused-linear loss (vs liger-kernel).

Every variant starts from the student's last hidden states [N, H] and output weight [V, H] and
runs forward + backward (so all pay the same matmuls); a second table runs the loss alone from
a logits leaf. Peak memory: each variant in its own subprocess, the peak RSS above what the
inputs already use (VmHWM after resetting it via /proc/self/clear_refs). Time: one subprocess
runs the variants round-robin, --repeats rounds after a warm-up, and reports each median, so a
shared machine's changing load hits all variants alike.

    python benchmarks/loss_table.py                 # both default configurations
    python benchmarks/loss_table.py --configs 4096x32000 --repeats 5

liger-kernel's LigerFusedLinearJSDLoss is a peer (DESIGN.md), measured when `liger_kernel`
imports; it computes the teacher's logits inside the loss (teacher hidden + weight as inputs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

DEFAULT_CONFIGS = ["4096x32000", "1024x151936"]
VARIANTS = ["ce_only", "naive", "chunked", "fused_linear", "liger_jsd"]
# the loss alone, from a logits leaf [N, V] (no matmuls): isolates what the loss itself costs
LOGITS_VARIANTS = ["ce_only@logits", "naive@logits", "chunked@logits", "chunked_inplace@logits"]


def make_inputs(n: int, v: int, h: int, k: int, seed: int = 0, dtype=torch.float32) -> dict:
    """Student hidden/weight, labels (5% padding) and a top-k teacher with its tail mass."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) / h**0.5).to(dtype)
    weight = (torch.randn(v, h, generator=g)).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.05] = -100
    ids = (torch.randint(0, v, (n, 1), generator=g) + torch.arange(k) * 7919) % v  # distinct per row
    tail = torch.rand(n, generator=g) * 0.5
    p = torch.softmax(torch.randn(n, k, generator=g) * 2, 1) * (1 - tail)[:, None]
    return dict(hidden=hidden, weight=weight, labels=labels, teacher_ids=ids, teacher_logprobs=p.log(), tail=tail)


def naive_loss(logits, labels, ids, logprobs, tail, ignore_index=-100):
    """Full log-softmax, gather, CE + dense top-k KL with the tail bucket: what one writes first."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    counted = labels != ignore_index
    n = counted.sum().clamp_min(1)
    ce = torch.nn.functional.nll_loss(logq, labels, ignore_index=ignore_index, reduction="sum") / n
    logq_k = logq.gather(1, ids)
    p = logprobs.exp()
    q_tail = (1 - logq_k.exp().sum(1)).clamp_min(1e-6)
    kl_rows = (p * (logprobs - logq_k)).sum(1) + torch.xlogy(tail, tail) - tail * q_tail.log()
    kl = (kl_rows * counted).sum() / n
    return ce + kl


def make_step(name: str, inp: dict):
    """A closure running forward + backward of one variant on fresh leaf tensors."""
    from fastkd.kernels import Teacher, distill_loss, fused_linear_distill_loss

    if name.endswith("@logits"):
        return _make_logits_step(name, inp)
    hidden = inp["hidden"].clone().requires_grad_(True)
    weight = inp["weight"].clone().requires_grad_(True)
    teach = (inp["labels"], inp["teacher_ids"], inp["teacher_logprobs"], inp["tail"])
    teacher = Teacher(inp["teacher_ids"], inp["teacher_logprobs"], inp["tail"])

    def clear():
        hidden.grad = None
        weight.grad = None

    if name == "ce_only":
        def step():  # plain cross-entropy, no teacher: the cost the distillation loss should approach
            clear()
            torch.nn.functional.cross_entropy(hidden @ weight.t(), inp["labels"]).backward()
    elif name == "naive":
        def step():
            clear()
            naive_loss(hidden @ weight.t(), *teach).backward()
    elif name == "chunked":
        def step():
            clear()
            distill_loss(hidden @ weight.t(), inp["labels"], teacher, inplace=True).total.backward()
    elif name == "fused_linear":
        def step():
            clear()
            fused_linear_distill_loss(hidden, weight, inp["labels"], teacher).total.backward()
    elif name == "liger_jsd":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, compiled=False)
        t_hidden = inp["hidden"].clone()
        t_weight = inp["weight"].clone()

        def step():
            clear()
            loss_fn(hidden, weight, t_hidden, t_weight, inp["labels"]).backward()
    else:
        raise ValueError(name)
    return step


def _make_logits_step(name: str, inp: dict):
    from fastkd.kernels import Teacher, distill_loss

    logits = inp["logits"]
    teach = (inp["labels"], inp["teacher_ids"], inp["teacher_logprobs"], inp["tail"])
    kind = name.split("@")[0]

    def step():
        z = logits.detach().requires_grad_(True)  # the same buffer each time (in place overwrites it: fine here)
        if kind == "ce_only":
            loss = torch.nn.functional.cross_entropy(z, inp["labels"])
        elif kind == "naive":
            loss = naive_loss(z, *teach)
        else:
            teacher = Teacher(inp["teacher_ids"], inp["teacher_logprobs"], inp["tail"])
            loss = distill_loss(z, inp["labels"], teacher, inplace=kind == "chunked_inplace").total
        loss.backward()
        return z.grad

    return step


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure_child(name: str, n: int, v: int, h: int, k: int, repeats: int) -> dict:
    """Run in a fresh process: peak extra memory of the first step, then median time of `repeats`."""
    inp = make_inputs(n, v, h, k)
    if name.endswith("@logits"):
        with torch.no_grad():
            inp["logits"] = inp["hidden"] @ inp["weight"].t()
    step = make_step(name, inp)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    base = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    peak = _rss_kb("VmHWM") - base
    times = [first]
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"variant": name, "seconds": statistics.median(times), "peak_mb": peak / 1024}


def time_round_robin(names: list[str], n: int, v: int, h: int, k: int, repeats: int) -> dict:
    """Median seconds per variant, running them in turn (one warm-up step each first)."""
    inp = make_inputs(n, v, h, k)
    if any(name.endswith("@logits") for name in names):
        with torch.no_grad():
            inp["logits"] = inp["hidden"] @ inp["weight"].t()
    steps = {name: make_step(name, inp) for name in names}
    times = {name: [] for name in names}
    for name in names:
        steps[name]()
    for _ in range(repeats):
        for name in names:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        return {"error": err[-1] if err else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_variants(names: list[str], n: int, v: int, h: int, k: int, repeats: int) -> list[dict]:
    """Peak memory per variant (one subprocess each), then times (one round-robin subprocess)."""
    if "liger_jsd" in names:
        probe = subprocess.run([sys.executable, "-c", "import liger_kernel.chunked_loss"], capture_output=True)
        if probe.returncode != 0:
            print("[liger_jsd: skipped, liger_kernel is not importable]", file=sys.stderr)
            names = [x for x in names if x != "liger_jsd"]
    shape = ["--n", str(n), "--v", str(v), "--h", str(h), "--k", str(k)]
    rows = []
    for name in names:
        r = _child(["--child", name, *shape, "--repeats", "1"])
        rows.append({"variant": name, **r})
    ok = [r["variant"] for r in rows if "error" not in r]
    if ok:
        timed = _child(["--time", *ok, *shape, "--repeats", str(repeats)])
        for r in rows:
            if "error" in timed:
                r["error"] = timed["error"]
            elif r["variant"] in timed:
                r["seconds"] = timed[r["variant"]]
    return rows


def print_table(rows: list[dict], n: int, v: int, h: int, k: int, what: str) -> None:
    print(f"\nN={n} V={v} H={h} k={k} fp32, forward+backward, {what}, {torch.get_num_threads()} threads")
    print("(x naive: ratio to the naive loss; ce_only is plain cross-entropy without a teacher)")
    print(f"{'variant':<24}{'time s':>10}{'x naive':>10}{'peak MB':>12}{'x naive':>10}")
    base = next((r for r in rows if r["variant"].split("@")[0] == "naive" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<24}  failed: {r['error']}")
            continue
        t_ratio = r["seconds"] / base["seconds"] if base else float("nan")
        m_ratio = r["peak_mb"] / base["peak_mb"] if base and base["peak_mb"] > 0 else float("nan")
        print(f"{r['variant']:<24}{r['seconds']:>10.3f}{t_ratio:>10.2f}{r['peak_mb']:>12.0f}{m_ratio:>10.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, help="NxV pairs, e.g. 4096x32000")
    parser.add_argument("--h", type=int, default=512, help="student hidden width H")
    parser.add_argument("--k", type=int, default=64, help="teacher top-k")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    parser.add_argument("--variants", nargs="*", default=VARIANTS, help="which variants to run (from hidden states)")
    parser.add_argument("--logits-variants", nargs="*", default=LOGITS_VARIANTS,
                        help="loss-only variants from a logits leaf (a second table per configuration)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--time", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--v", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.time:
        print(json.dumps(time_round_robin(args.time, args.n, args.v, args.h, args.k, args.repeats)))
        return 0
    if args.child:
        print(json.dumps(measure_child(args.child, args.n, args.v, args.h, args.k, args.repeats)))
        return 0
    for cfg in args.configs:
        n, v = (int(x) for x in cfg.lower().split("x"))
        for names, what in ((args.variants, "from hidden states (matmuls included)"),
                            (args.logits_variants, "loss only, from a logits leaf")):
            rows = run_variants(list(names), n, v, args.h, args.k, args.repeats)
            if rows:
                print_table(rows, n, v, args.h, args.k, what)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
