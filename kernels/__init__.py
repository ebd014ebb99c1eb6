"""Fused distillation loss: cross-entropy + sparse KL + hidden MSE (Triton on CUDA, PyTorch on CPU).

Triton is imported only when a CUDA tensor reaches the loss, so CPU users never load it.

This folder is the package `fastkd.kernels`. Seen from a checkout's root (`python` started
there puts the folder first on sys.path) it would also be importable as top-level `kernels`,
the name of the Hugging Face package transformers imports: then it hands the import over to
that installed package, so it can never shadow it.
"""

if __name__ == "kernels":
    def _hand_over_to_the_installed_package() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != checkout]
        spec = importlib.machinery.PathFinder.find_spec("kernels", path)
        if spec is None:
            raise ImportError("No module named 'kernels' is installed (the fastkd checkout's kernels/ folder is "
                              "the package fastkd.kernels, not a top-level 'kernels')", name="kernels")
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module  # the import system returns what sys.modules holds
        spec.loader.exec_module(module)

    _hand_over_to_the_installed_package()
else:
    from .chunked import chunked_distill_loss
    from .fused_linear import fused_linear_distill_loss
    from .hidden import HiddenProjector
    from .loss import DistillLoss, LinearDistillLoss, distill_loss
    from .reference import reference_loss
    from .terms import LossTerms
    from .validate import LossInputError

    __all__ = [
        "LossTerms",
        "distill_loss",
        "DistillLoss",
        "LinearDistillLoss",
        "fused_linear_distill_loss",
        "HiddenProjector",
        "reference_loss",
        "chunked_distill_loss",
        "LossInputError",
    ]
