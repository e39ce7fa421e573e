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
               loss_keys: Optional[Sequence[str]] = None, first_grad: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PGD-k against the detection loss on ground truth (or only the `loss_keys` terms: one TOD domain).
    `step_size` defaults to eps / steps (the paper's evaluation protocol). `first_grad`, when given, is the
    input gradient of the first iteration, already computed by the caller (gradient reuse in training: the
    clean forward/backward). Returns new adversarial images; `images` is not modified."""
    if steps < 0 or eps < 0:
        raise ValueError(f"pgd_attack: steps ({steps}) and eps ({eps}) must be >= 0")
    step_size = eps / max(steps, 1) if step_size is None else step_size
    x_clean = images.detach()
    x_adv = x_clean.clone()
    if random_start and eps > 0:
        noise = torch.rand(x_adv.shape, generator=generator, device="cpu").to(x_adv) * 2 - 1
        x_adv = (x_adv + eps * noise).clamp_(0, 1)
    with frozen_batchnorm(model), torch.enable_grad():  # callers may be under no_grad
        for i in range(steps):
            grad = first_grad if (i == 0 and first_grad is not None) else input_gradient(model, x_adv, targets,
                                                                                           loss_keys)
            projected_sign_step(x_adv, grad, x_clean, step_size, eps)
    return x_adv


def per_image_losses(model, images, targets) -> torch.Tensor:
    """[N] total detection loss per image: the model's batched version when it has one, else one forward each."""
    if hasattr(model, "per_image_losses"):
        return model.per_image_losses(images, targets)
    return torch.stack([detection_loss(model, images[i:i + 1], targets[i:i + 1]) for i in range(len(images))])


def choose_larger_loss(model, targets, candidates: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per image, the candidate with the larger total detection loss (no gradient, BatchNorm frozen)."""
    with torch.no_grad(), frozen_batchnorm(model):
        scores = torch.stack([per_image_losses(model, c, targets) for c in candidates])
    pick = scores.argmax(0)  # [N]
    return torch.stack([candidates[int(p)][i] for i, p in enumerate(pick)])


def tod_attack(model, images: torch.Tensor, targets, eps: float, steps: int, step_size: Optional[float] = None,
               first_domain_grads: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """Task-oriented-domain PGD: at each step one candidate from each loss domain's gradient (classification,
    localization: the model's `loss_domains`), keeping per image the candidate with the larger total loss."""
    step_size = eps / max(steps, 1) if step_size is None else step_size
    x_clean = images.detach()
    x_adv = x_clean.clone()
    with frozen_batchnorm(model), torch.enable_grad():
        for i in range(steps):
            candidates = []
            for dom, keys in sorted(model.loss_domains.items()):
                if i == 0 and first_domain_grads is not None:
                    grad = first_domain_grads[dom]
                else:
                    grad = input_gradient(model, x_adv, targets, keys)
                c = x_adv.clone()
                projected_sign_step(c, grad, x_clean, step_size, eps)
                candidates.append(c)
            x_adv = choose_larger_loss(model, targets, candidates)
    return x_adv
