"""Fused ops for feature-alignment training: the pooled-cosine alignment loss, the PGD sign-step projection and the
APGD momentum step, with CPU (C++) and CUDA kernels, and pure-PyTorch twins in `reference`."""
from .ops import EPS, apgd_step, load, manifest, pooled_cosine_loss, sign_step, sign_step_

__all__ = ["EPS", "apgd_step", "load", "manifest", "pooled_cosine_loss", "sign_step", "sign_step_"]
