"""The distillation loss: CE + sparse KL + hidden MSE (Triton on CUDA, PyTorch on CPU); docs/kernels.md. Imported
as a top-level `kernels` (from a checkout's root) it hands over to the Hugging Face package of that name."""

if __name__ == "kernels":   # this module is replaced in sys.modules: its names go with it
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
else:
    from .hidden import HiddenProjector
    from .loss import DistillLoss, LinearDistillLoss, distill_loss, fused_linear_distill_loss, uld_loss
    from .reference import reference_loss
    from .spec import LossInputError, LossSpec, LossTerms, Teacher

    __all__ = ["LossSpec", "Teacher", "LossTerms", "LossInputError", "distill_loss", "fused_linear_distill_loss",
               "uld_loss", "DistillLoss", "LinearDistillLoss", "HiddenProjector", "reference_loss"]
