"""Pure-PyTorch twins of the fused ops: the test oracle, the fallback when no build is possible, and the
path ONNX export takes (plain ops only)."""
from __future__ import annotations

from typing import Sequence

import torch

EPS = 1e-8  # norm guard of the cosine: cos(s, t) = <s,t> / (max(|s|, EPS) * max(|t|, EPS))


def _pool(t: torch.Tensor, dtype) -> torch.Tensor:
    t = t.to(dtype)
    return t if t.dim() == 2 else t.mean(dim=(2, 3))


def pooled_cosine_loss_ref(student: torch.Tensor, targets: Sequence[torch.Tensor], weights: Sequence[float],
                           eps: float = EPS) -> torch.Tensor:
    """mean_n sum_j w_j * (1 - cos(avgpool(student)[n], pool(target_j)[n])); targets are detached."""
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    s = _pool(student, acc)
    ns = s.norm(dim=1).clamp_min(eps)
    loss = s.new_zeros(s.shape[0])
    for t, w in zip(targets, weights):
        t = _pool(t.detach(), acc)
        cos = (s * t).sum(1) / (ns * t.norm(dim=1).clamp_min(eps))
        loss = loss + w * (1 - cos)
    return loss.mean()


def sign_step_ref(x, grad, x_clean, step: float, eps: float, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """clamp(clamp(x + step * sign(grad), x_clean - eps, x_clean + eps), lo, hi), computed in float32 or wider."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa, ca = x.to(acc), x_clean.to(acc)
    y = xa + step * torch.sign(grad.to(acc))
    y = torch.minimum(torch.maximum(y, ca - eps), ca + eps)
    return y.clamp(lo, hi).to(x.dtype)


def sign_step_ref_(x, grad, x_clean, step: float, eps: float, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return x.copy_(sign_step_ref(x, grad, x_clean, step, eps, lo, hi))


def _project(v, c, eps: float, lo: float, hi: float):
    return torch.minimum(torch.maximum(v, c - eps), c + eps).clamp(lo, hi)


def apgd_step_ref(x, x_prev, grad, x_clean, step: float, eps: float, momentum: float = 0.75, lo: float = 0.0,
                  hi: float = 1.0) -> torch.Tensor:
    """P(a z + (1 - a)(x + (x - x_prev))), z = P(x + step * sign(grad)), P = clamp to x_clean +- eps then [lo, hi],
    a = momentum; computed in float32 or wider (ops.apgd_step states the formula)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa, pa, ca = x.to(acc), x_prev.to(acc), x_clean.to(acc)
    z = _project(xa + step * torch.sign(grad.to(acc)), ca, eps, lo, hi)
    y = momentum * z + (1 - momentum) * (xa + (xa - pa))
    return _project(y, ca, eps, lo, hi).to(x.dtype)
