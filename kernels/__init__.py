"""Fused distillation loss: cross-entropy + sparse KL + hidden MSE (Triton on CUDA, PyTorch on CPU)."""
