"""The inputs and tolerances the fused-op tests share: the CPU tests (test_kernels.py), the emulated CUDA tests
(test_cuda_emulated.py) and the GPU tests run the same cases against cuda_kernels/reference.py."""
from __future__ import annotations

import torch

from cuda_kernels import reference as R

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (atol, rtol) per dtype: the fused ops accumulate in float32 (float64 for double)
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3),
       torch.bfloat16: (1.6e-2, 1.6e-2)}
# On a GPU the CUDA sources are built with --use_fast_math: float32 sqrt and division are approximate (a few ulp)
# and float32 values below 2^-126 are flushed to zero; the pooling and cosine sums are tree reductions in another
# order than the CPU's. float64 is unaffected; float16 / bfloat16 errors are dominated by their own rounding.
CUDA_TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3),
            torch.bfloat16: (1.6e-2, 1.6e-2)}
# elementwise steps: one rounding of a float32 (or float64) result into the dtype, so half an ulp at most; the sign
# step is exact in float32 (x + step * sign is one rounding either way)
SIGN_TOL = {torch.float64: 0, torch.float32: 0, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# APGD: a * z + b * w may be contracted into a fused multiply-add by a compiler (CPU -ffp-contract, nvcc's fmad):
# one float32 ulp near 1 (1.2e-7) before the final rounding
APGD_TOL = {torch.float64: 1e-12, torch.float32: 5e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SHAPES = [(1, 3, 1, 1), (2, 3, 7, 9), (4, 16, 5, 5), (1, 64, 2, 3), (3, 5, 13, 13)]
# maps of 1 to 169 positions (every lane-group size of the CUDA pooling, the CPU's float32 fast path), C not a
# multiple of 8, H*W a multiple of 8 or not, one large map (a block per row on CUDA, ATen's pooling on the CPU)
MAP_SHAPES = [(5, 27, 4, 4), (3, 8, 2, 4), (2, 16, 8, 8), (64, 256, 4, 4), (2, 19, 7, 9), (3, 9, 3, 5), (2, 11, 1, 7),
              (2, 19, 13, 13), (2, 3, 1, 1), (2, 5, 37, 41)]
STEP_SHAPES = [(1, 3, 1, 1), (2, 3, 7, 9), (16, 3, 33, 31), (1, 1, 1, 1031)]
LAYOUTS = ("contiguous", "channels_last", "noncontig")


def layout(t, kind):
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "noncontig":  # a strided view: every other column of a wider tensor
        wide = torch.cat([t, t], dim=-1)
        return wide[..., ::2] if t.shape[-1] > 0 else t
    return t


def pooled_cosine_cases(dtype=torch.float32, device="cpu"):
    """(student, [target map, pooled target], weights) for every shape and layout."""
    g = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        for kind in LAYOUTS:
            n, c, h, w = shape
            s = layout(torch.randn(shape, generator=g).to(dtype), kind).to(device)
            t_map = layout(torch.randn(n, c, h + 1, max(1, w - 1), generator=g).to(dtype), kind).to(device)
            t_vec = torch.randn(n, c, generator=g).to(dtype).to(device)
            yield s, [t_map, t_vec], [0.7, 1.9]


def map_cases(shape):
    """float32 student and two same-shape targets, contiguous and channels_last."""
    g = torch.Generator().manual_seed(3)
    for kind in ("contiguous", "channels_last"):
        s = layout(torch.randn(shape, generator=g), kind)
        yield s, [layout(torch.randn(shape, generator=g), kind), torch.randn(shape, generator=g)], [10.0, 3.0]


def reference_loss_and_grad(student, targets, weights, upstream=-2.5):
    """reference.py's loss and d(upstream * loss)/d student (upstream not 1, so a missing scale shows)."""
    s = student.detach().clone().requires_grad_(True)
    loss = R.pooled_cosine_loss_ref(s, targets, weights)
    (g,) = torch.autograd.grad(loss * upstream, s)
    return loss.detach(), g


def check_pooled_cosine_outputs(outputs, student, targets, weights, tol=None, upstream=-2.5):
    """The op's raw outputs (loss, pooled student, pooled targets, coef) against reference.py: the loss, the pooled
    features, and the gradient the backward makes of coef (a scale and a broadcast)."""
    loss, ps, pt, coef = outputs
    atol, rtol = tol or TOL[student.dtype]
    ref_loss, ref_grad = reference_loss_and_grad(student, targets, weights, upstream)
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    assert loss.dtype == acc and ps.dtype == acc and coef.dtype == acc and coef.shape == student.shape[:2]
    torch.testing.assert_close(loss, ref_loss.to(acc), atol=atol, rtol=rtol)
    torch.testing.assert_close(ps, student.to(acc).mean((2, 3)), atol=atol, rtol=rtol)
    for j, t in enumerate(targets):
        torch.testing.assert_close(pt[j], t.to(acc) if t.dim() == 2 else t.to(acc).mean((2, 3)), atol=atol, rtol=rtol)
    grad = (coef * upstream).to(student.dtype)[:, :, None, None].expand(student.shape)
    torch.testing.assert_close(grad.float(), ref_grad.float(), atol=atol * 10, rtol=rtol * 10)


def sign_step_cases(dtype):
    """(x, grad, x_clean) for every step shape and layout; a fifth of the gradient is 0 (no move)."""
    g = torch.Generator().manual_seed(3)
    for shape in STEP_SHAPES:
        for kind in LAYOUTS:
            xc = layout(torch.rand(shape, generator=g).to(dtype), kind)
            x = layout((xc.float() + 0.02 * torch.randn(shape, generator=g)).clamp(0, 1).to(dtype), kind)
            grad = torch.randn(shape, generator=g)
            grad[grad.abs() < 0.2] = 0
            yield x, layout(grad.to(dtype), kind), xc


def apgd_cases(dtype):
    """(x, x_prev, grad, x_clean, step, eps, momentum, lo, hi): every step shape and layout, the paper's momentum and
    others, the [0, 1] box and a wider one, points on and off the ball's boundary."""
    g = torch.Generator().manual_seed(5)
    settings = [(0.01, 0.03, 0.75, 0.0, 1.0), (0.06, 0.03, 0.75, 0.0, 1.0), (0.02, 0.05, 0.3, -1.0, 1.0),
                (0.01, 0.03, 1.0, 0.0, 1.0), (0.01, 0.03, 0.0, 0.0, 1.0)]
    for i, shape in enumerate(STEP_SHAPES):
        for j, kind in enumerate(LAYOUTS):
            step, eps, momentum, lo, hi = settings[(i + j) % len(settings)]
            xc = torch.rand(shape, generator=g)
            x = (xc + eps * (2 * torch.rand(shape, generator=g) - 1)).clamp(lo, hi)
            x_prev = (xc + eps * (2 * torch.rand(shape, generator=g) - 1)).clamp(lo, hi)
            grad = torch.randn(shape, generator=g)
            grad[grad.abs() < 0.2] = 0
            yield tuple(layout(t.to(dtype), kind) for t in (x, x_prev, grad, xc)) + (step, eps, momentum, lo, hi)
