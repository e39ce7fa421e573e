"""The fused ops as torch.library custom ops: thin typed wrappers, fake (meta) kernels, autograd.

    pooled_cosine_loss(student, targets, weights, eps=1e-8) -> scalar
        mean over the batch of sum_j w_j * (1 - cos(avgpool_hw(student), pool(target_j))); targets are
        [N,C,H',W'] maps or pooled [N,C]; they receive no gradient. One pass over the student: the forward also
        computes the [N,C] gradient coefficients (the gradient is constant over H, W), so the backward is a scale
        and a broadcast view (no pass, no second kernel). Zero vectors: norms are clamped to eps, so cos = 0 and
        the gradient stays finite.
    sign_step_(x, grad, x_clean, step, eps, lo=0, hi=1) -> x   (in place, one pass)
    sign_step(x, grad, x_clean, step, eps, lo=0, hi=1) -> new tensor
        clamp(clamp(x + step * sign(grad), x_clean - eps, x_clean + eps), lo, hi)
    apgd_step(x, x_prev, grad, x_clean, step, eps, momentum=0.75, lo=0, hi=1) -> new tensor
        APGD's momentum step (Croce & Hein 2020), one pass; see its docstring

The compiled library is loaded on first use (building it if needed). Where no build is possible, the
pure-PyTorch twins in reference.py are used after one warning.
"""
from __future__ import annotations

import threading
import warnings
from typing import Sequence

import torch

from . import reference

EPS = reference.EPS
_lock = threading.Lock()
_state = {"loaded": None, "manifest": None, "error": None}


def load(require: bool = False) -> bool:
    """Load (building when needed) the compiled ops; True when they are available."""
    if _state["loaded"] is not None and not require:  # fast path, also what torch.compile traces
        return _state["loaded"]
    with _lock:
        if _state["loaded"] is None:
            from .build import KernelBuildError, build

            try:
                _state["manifest"] = build()
                _register_python_side()
                _state["loaded"] = True
            except KernelBuildError as e:
                _state["loaded"], _state["error"] = False, str(e)
                warnings.warn(f"fused kernels unavailable, using the pure-PyTorch reference ops: {e}", stacklevel=3)
    if require and not _state["loaded"]:
        raise RuntimeError(_state["error"])
    return bool(_state["loaded"])


def manifest():
    load()
    return _state["manifest"]


def _acc_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _register_python_side():
    @torch.library.register_fake("fa_kernels::pooled_cosine_loss")
    def _(student, targets, weights, eps):
        n, c = student.shape[:2]
        acc = _acc_dtype(student)
        return (student.new_empty((), dtype=acc), student.new_empty((n, c), dtype=acc),
                student.new_empty((len(targets), n, c), dtype=acc), student.new_empty((n, c), dtype=acc))

    @torch.library.register_fake("fa_kernels::sign_step_")
    def _(x, grad, x_clean, step, eps, lo, hi):
        return None

    @torch.library.register_fake("fa_kernels::sign_step")
    def _(x, grad, x_clean, step, eps, lo, hi):
        return torch.empty_like(x)

    @torch.library.register_fake("fa_kernels::apgd_step")
    def _(x, x_prev, grad, x_clean, step, eps, momentum, lo, hi):
        return torch.empty_like(x)

    def setup_context(ctx, inputs, output):
        student, targets, weights, eps = inputs
        ctx.save_for_backward(output[3])
        ctx.shape, ctx.dtype, ctx.n_targets = student.shape, student.dtype, len(targets)

    def backward(ctx, grad_loss, _grad_ps, _grad_pt, _grad_coef):
        (coef,) = ctx.saved_tensors
        # the gradient is constant over H, W: a broadcast view, materialised only if a consumer needs it
        g = (coef * grad_loss).to(ctx.dtype)[:, :, None, None].expand(ctx.shape)
        return g, [None] * ctx.n_targets, None, None

    torch.library.register_autograd("fa_kernels::pooled_cosine_loss", backward, setup_context=setup_context)


class _PooledCosineFn(torch.autograd.Function):
    """Eager-mode autograd of the op: the same computation as the op's registered autograd, without the
    per-call cost of torch.library's generic Python wrapper (about 0.1 ms, a third of the whole op on the
    small [64,256,4,4] feature maps of a stride-32 backbone). torch.compile traces the registered path."""

    @staticmethod
    def forward(ctx, student, weights, eps, *targets):
        loss, _, _, coef = torch.ops.fa_kernels.pooled_cosine_loss(student, list(targets), weights, eps)
        ctx.save_for_backward(coef)
        ctx.shape, ctx.dtype, ctx.n_targets = student.shape, student.dtype, len(targets)
        return loss

    @staticmethod
    def backward(ctx, grad):
        (coef,) = ctx.saved_tensors
        return ((coef * grad).to(ctx.dtype)[:, :, None, None].expand(ctx.shape), None, None,
                *([None] * ctx.n_targets))


def pooled_cosine_loss(student: torch.Tensor, targets: Sequence[torch.Tensor], weights: Sequence[float],
                       eps: float = EPS) -> torch.Tensor:
    if not load():
        return reference.pooled_cosine_loss_ref(student, targets, weights, eps)
    targets = [t.detach() for t in targets]
    weights = [float(w) for w in weights]
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and student.requires_grad):
        return torch.ops.fa_kernels.pooled_cosine_loss(student, targets, weights, float(eps))[0]
    return _PooledCosineFn.apply(student, weights, float(eps), *targets)


def sign_step_(x, grad, x_clean, step: float, eps: float, lo: float = 0.0, hi: float = 1.0):
    if not load():
        return reference.sign_step_ref_(x, grad, x_clean, step, eps, lo, hi)
    torch.ops.fa_kernels.sign_step_(x, grad, x_clean, float(step), float(eps), float(lo), float(hi))
    return x


def sign_step(x, grad, x_clean, step: float, eps: float, lo: float = 0.0, hi: float = 1.0):
    if not load():
        return reference.sign_step_ref(x, grad, x_clean, step, eps, lo, hi)
    return torch.ops.fa_kernels.sign_step(x, grad, x_clean, float(step), float(eps), float(lo), float(hi))


def apgd_step(x, x_prev, grad, x_clean, step: float, eps: float, momentum: float = 0.75, lo: float = 0.0,
              hi: float = 1.0) -> torch.Tensor:
    """One iterate of APGD (Croce & Hein 2020, L-inf) in one fused pass; returns a new tensor, inputs unchanged.

        z      = P(x + step * sign(grad))
        x_next = P(x + a * (z - x) + (1 - a) * (x - x_prev)),   a = momentum (0.75 in the paper)
        P(v)   = clamp(clamp(v, x_clean - eps, x_clean + eps), lo, hi)

    The second line is computed as P(a * z + (1 - a) * (x + (x - x_prev))) in float32 (float64 for float64
    tensors), so momentum = 1 gives z, the plain projected sign step (`sign_step`), exactly; the first iterate, which
    has no previous point, passes x_prev = x. grad is the gradient of the loss being maximised at x. All four tensors
    have one shape, dtype and device; the result has x's layout.
    """
    if not load():
        return reference.apgd_step_ref(x, x_prev, grad, x_clean, step, eps, momentum, lo, hi)
    return torch.ops.fa_kernels.apgd_step(x, x_prev, grad, x_clean, float(step), float(eps), float(momentum),
                                          float(lo), float(hi))
