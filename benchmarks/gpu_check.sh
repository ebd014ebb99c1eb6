#!/usr/bin/env bash
# One-shot GPU check of the distillation loss: under 5 minutes on one CUDA GPU.
#   bash benchmarks/gpu_check.sh            # from the repo root (PYTHON=... to choose the interpreter)
# 1. the kernel tests on CUDA (benchmarks/gpu_check.py's correctness section): the Triton path vs
#    the float64 reference, fp32 and bf16, every mode, tau 1 and 2, V = 151,936, plus the hard
#    cases of tests/loss_cases.py against the tests' own float64 loss;
# 2. time, peak memory and achieved bandwidth of the fused loss vs the naive PyTorch loss and
#    liger-kernel's fused-linear JSD (when it imports), as ratios.
# Without a GPU it says so and exits 0. Nothing in the test suite needs it.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False): nothing to check"
    exit 0
fi
status=0
timeout 280 "$PY" benchmarks/gpu_check.py --budget "${GPU_CHECK_BUDGET_S:-200}" || status=1
echo "== gpu_check: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
exit $status
