"""PGD-k (equation 4 of the paper) on any Detector, for training and evaluation alike.

x^{t+1} = Proj_{x+S}(x^t + step * sign(grad_x loss(f(x^t), y))), projected onto the eps-ball around the clean
images and onto [0, 1] by one function, `projected_sign_step`, backed by the fused kernel.

Attack steps never update BatchNorm running statistics (the model runs in eval mode for BN, whatever its mode)
and never leave gradients in the parameters: gradients are taken with respect to the images only.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional, Sequence

import torch
from torch import nn

import cuda_kernels


def projected_sign_step(x_adv: torch.Tensor, grad: torch.Tensor, x_clean: torch.Tensor, step: float,
                        eps: float) -> torch.Tensor:
    """In place: x_adv <- clamp(clamp(x_adv + step * sign(grad), x_clean - eps, x_clean + eps), 0, 1)."""
    return cuda_kernels.sign_step_(x_adv, grad, x_clean, step, eps, 0.0, 1.0)


@contextlib.contextmanager
def frozen_batchnorm(model: nn.Module):
    """BatchNorm layers in eval mode (running statistics used, not updated); other modules keep their mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in bns]
    try:
        for m in bns:
            m.eval()
        yield
    finally:
        for m, was in zip(bns, modes):
            m.train(was)


def detection_loss(model, images, targets, keys: Optional[Sequence[str]] = None) -> torch.Tensor:
    losses, _ = model.forward_train(images, targets)
    return sum(v for k, v in losses.items() if keys is None or k in keys)


def input_gradient(model, images, targets, keys=None) -> torch.Tensor:
    """d loss / d images, with no gradient left in the parameters."""
    x = images.detach().requires_grad_(True)
    loss = detection_loss(model, x, targets, keys)
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def pgd_attack(model, images: torch.Tensor, targets, eps: float, steps: int, step_size: Optional[float] = None,
               random_start: bool = False, generator: Optional[torch.Generator] = None,
               loss_keys: Optional[Sequence[str]] = None) -> torch.Tensor:
    """PGD-k against the detection loss on ground truth (or only the `loss_keys` terms: one TOD domain).
    `step_size` defaults to eps / steps (the paper's evaluation protocol). Returns new adversarial images;
    `images` is not modified."""
    if steps < 0 or eps < 0:
        raise ValueError(f"pgd_attack: steps ({steps}) and eps ({eps}) must be >= 0")
    step_size = eps / max(steps, 1) if step_size is None else step_size
    x_clean = images.detach()
    x_adv = x_clean.clone()
    if random_start and eps > 0:
        noise = torch.rand(x_adv.shape, generator=generator, device="cpu").to(x_adv) * 2 - 1
        x_adv = (x_adv + eps * noise).clamp_(0, 1)
    with frozen_batchnorm(model), torch.enable_grad():  # callers may be under no_grad
        for _ in range(steps):
            grad = input_gradient(model, x_adv, targets, loss_keys)
            projected_sign_step(x_adv, grad, x_clean, step_size, eps)
    return x_adv
