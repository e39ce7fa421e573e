"""Fused ops for feature-alignment training: the pooled-cosine alignment loss and the PGD sign-step projection,
with CPU (C++) and CUDA kernels, and pure-PyTorch twins in `reference`."""
from .ops import EPS, load, manifest, pooled_cosine_loss, sign_step, sign_step_

__all__ = ["EPS", "load", "manifest", "pooled_cosine_loss", "sign_step", "sign_step_"]
