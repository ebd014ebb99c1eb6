"""fastkd: cheap white-box distillation of chain-of-thought reasoning."""
import os
import sys
from pathlib import Path

__version__ = "0.1.0"


def _unshadow_hub_kernels() -> None:
    """Drop a source checkout's root from sys.path (`python -m` puts it there): its kernels/ folder would hide the
    Hugging Face `kernels` package that transformers >= 5.25 imports, and every model import would fail."""
    checkout = Path(__file__).resolve().parent.parent
    pyproject = checkout / "pyproject.toml"
    if not (checkout / "kernels" / "__init__.py").is_file() or not pyproject.is_file():
        return
    if 'name = "fastkd"' not in pyproject.read_text(encoding="utf-8", errors="replace"):
        return

    def is_checkout(entry: str) -> bool:
        try:
            return Path(entry or os.getcwd()).resolve() == checkout
        except OSError:
            return False

    sys.path[:] = [entry for entry in sys.path if not is_checkout(entry)]


_unshadow_hub_kernels()
