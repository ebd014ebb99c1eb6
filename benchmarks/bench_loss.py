"""pytest-benchmark runs of the distillation loss (forward + backward), grouped for side-by-side reading.

    pytest benchmarks/bench_loss.py --benchmark-enable                 # CPU groups; GPU ones skip without CUDA
    pytest benchmarks/bench_loss.py --benchmark-enable -k gpu          # on a CUDA machine

CPU groups compare, from the same hidden states and output weight: plain cross-entropy, the
naive loss, our chunked loss and the fused-linear loss (and liger-kernel's fused JSD when it
imports). The GPU group times the Triton kernel on bf16 logits and reports the bandwidth it
achieves against the bytes that must move (extra_info).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from loss_table import make_inputs, make_step  # noqa: E402

CPU_SHAPES = {"32k": (1024, 32000), "152k": (256, 151936)}
CPU_VARIANTS = ["ce_only", "naive", "chunked", "fused_linear", "liger_jsd"]


@pytest.fixture(scope="module", params=list(CPU_SHAPES))
def cpu_inputs(request):
    n, v = CPU_SHAPES[request.param]
    return request.param, make_inputs(n, v, h=512, k=64)


@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_cpu_loss(benchmark, cpu_inputs, variant):
    shape, inp = cpu_inputs
    if variant == "liger_jsd":
        pytest.importorskip("liger_kernel.chunked_loss")
    benchmark.group = f"cpu-loss-{shape}"
    step = make_step(variant, inp)
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)


# ---------------------------------------------------------------- GPU: Triton kernel bandwidth

GPU_SHAPES = [(4096, 32000), (8192, 151936)]


def _gpu_case(n, v, k=64):
    inp = make_inputs(n, v, h=8, k=k)
    dev = torch.device("cuda")
    logits = torch.randn(n, v, device=dev, dtype=torch.bfloat16) * 3
    rest = {key: inp[key].to(dev) for key in ("labels", "teacher_ids", "teacher_logprobs", "tail")}
    return logits, rest


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,v", GPU_SHAPES)
@pytest.mark.parametrize("variant", ["triton_inplace", "torch_cross_entropy"])
def test_gpu_loss(benchmark, n, v, variant):
    from fastkd.kernels import LossSpec, Teacher
    from fastkd.kernels.triton_loss import chunk_loss_and_grad

    logits, rest = _gpu_case(n, v)
    benchmark.group = f"gpu-loss-{n}x{v}-bf16"
    if variant == "triton_inplace":
        scale = torch.tensor(1.0 / n, device=logits.device)

        teacher = Teacher(rest["teacher_ids"], rest["teacher_logprobs"], rest["tail"])

        def step():  # the kernel alone, one launch over every row: forward + gradient written into the logits
            chunk_loss_and_grad(logits, rest["labels"], teacher, LossSpec(), scale, out=logits)
            torch.cuda.synchronize()
    else:
        z = logits.clone().requires_grad_(True)

        def step():  # torch's fused CE forward + backward: the "CE alone" yardstick
            z.grad = None
            torch.nn.functional.cross_entropy(z.float(), rest["labels"]).backward()
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    seconds = benchmark.stats.stats.median
    floor_bytes = 2 * n * v * logits.element_size()  # one read + one write of the logits
    kernel_bytes = 3 * n * v * logits.element_size()  # two reads (lse pass, gradient pass) + one write
    benchmark.extra_info.update(
        floor_GBps=floor_bytes / seconds / 1e9,
        kernel_traffic_GBps=kernel_bytes / seconds / 1e9,
        floor_bytes=floor_bytes,
    )
