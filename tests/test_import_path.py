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


def test_plain_python_in_the_checkout_root_imports_transformers_models():
    """No fastkd import first: the folder itself hands `import kernels` over to the installed package."""
    code = (
        "import transformers.models.llama.modeling_llama\n"
        "from transformers import LlamaForCausalLM\n"
        "import importlib.util, kernels, sys\n"
        "print(kernels.__file__)\n"
        "import fastkd.kernels\n"
        "assert fastkd.kernels.distill_loss and sys.modules['kernels'] is kernels\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not run.stdout.strip().startswith(str(ROOT / "kernels")), run.stdout
