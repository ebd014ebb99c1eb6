"""The checkout's kernels/ folder (installed as fastkd.kernels) must not hide the Hugging Face `kernels` package."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_running_from_the_checkout_root_keeps_hub_kernels_visible():
    # `python -c` puts the current folder (here the checkout root) first on sys.path, as `python -m pytest` does.
    code = (
        "import importlib.util, fastkd, fastkd.kernels\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec else 'absent')\n"
        "from transformers import LlamaConfig\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not run.stdout.strip().startswith(str(ROOT / "kernels")), run.stdout
