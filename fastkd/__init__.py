"""fastkd: cheap white-box distillation of chain-of-thought reasoning."""
__version__ = "0.1.0"
