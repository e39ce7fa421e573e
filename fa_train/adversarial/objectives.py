"""Training objectives. Each objective's `step` runs the forward/backward passes of one training step and
returns the logged scalars; the optimizer step belongs to the training loop.

Equation (3) of the paper, with beta on SSFA and gamma on KDFA (the paper's code base names its flags the other
way round; here the flags say what they weigh: `--ssfa-weight` = beta, `--kdfa-weight` = gamma):

    (1 - alpha) * l(f(x + d), y) + alpha * l(f(x), y)
      + beta  * (1 - cos(pool(mid(x + d)), pool(mid(x))))         [SSFA, target detached]
      + gamma * (1 - cos(pool(mid(x + d)), pool(teacher_mid(x))))  [KDFA, teacher frozen, eval mode]

Gradient reuse: the first PGD iteration is the clean forward/backward. It puts alpha * grad(clean loss) into the
parameters, gives the attack its first input gradient, and gives SSFA its (detached) target. PGD-k training
therefore costs k + 1 forward/backward passes plus one no-grad teacher forward.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, Optional

import torch

import cuda_kernels

from .attacks import pgd_attack, tod_attack

METHODS = ("standard", "at", "tod", "kdfa", "ssfa", "fa")


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda")


def _scalar_logs(total: torch.Tensor, losses: Dict[str, torch.Tensor]) -> Dict[str, float]:
    out = {"loss": float(total.detach())}
    out.update({k: float(v.detach()) for k, v in losses.items()})
    return out


class StandardObjective:
    """Clean training: the sum of the detector's loss terms."""

    name = "standard"

    def __init__(self, device):
        self.device = device

    def step(self, model, images, targets, scaler, amp: bool) -> Dict[str, float]:
        with _autocast(self.device, amp):
            losses, _ = model.forward_train(images, targets)
        total = sum(losses.values())
        logs = _scalar_logs(total, losses)
        if math.isfinite(logs["loss"]):
            scaler.scale(total).backward()
        return logs


def _pooled_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().mean((2, 3)), b.detach().float().mean((2, 3))
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=cuda_kernels.EPS).mean())


class AdversarialObjective:
    """AT, TOD, KDFA, SSFA and FA (= KDFA + SSFA), all on equation (3) with gradient reuse."""

    def __init__(self, name: str, device, pgd_steps: int = 1, train_eps: float = 0.01, step_size: float = 0.01,
                 alpha: float = 0.5, ssfa_weight: float = 0.0, kdfa_weight: float = 0.0,
                 teacher: Optional[torch.nn.Module] = None):
        if pgd_steps < 1:
            raise ValueError(f"--pgd-steps must be >= 1, got {pgd_steps}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"--alpha must be in [0, 1], got {alpha}")
        self.name, self.device = name, device
        self.steps, self.eps, self.step_size, self.alpha = pgd_steps, train_eps, step_size, alpha
        self.ssfa_weight, self.kdfa_weight = ssfa_weight, kdfa_weight
        self.tod = name == "tod"
        self.teacher = teacher
        if kdfa_weight and teacher is None:
            raise ValueError("KDFA needs a teacher")
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    # -- phase 1: the clean pass (first PGD iteration)
    def clean_pass(self, model, images, targets, scaler, amp):
        x = images.detach().clone().requires_grad_(True)
        with _autocast(self.device, amp):
            losses, mid = model.forward_train(x, targets)
        clean = sum(losses.values())
        domain_grads = None
        if self.tod:  # one input gradient per loss domain, from the same graph
            domain_grads = {}
            for dom, keys in model.loss_domains.items():
                part = sum(losses[k] for k in keys)
                (domain_grads[dom],) = torch.autograd.grad(part, x, retain_graph=True)
        if not math.isfinite(float(clean.detach())):
            return clean, mid.detach(), None, domain_grads
        if self.alpha > 0:
            scaler.scale(self.alpha * clean).backward()
            grad = x.grad  # = scale * alpha * d clean / dx: same sign
        else:
            (grad,) = torch.autograd.grad(clean, x)
        return clean, mid.detach(), grad, domain_grads

    def attack(self, model, x_clean, targets, first_grad, domain_grads):
        """The same attacks as evaluation, their first step from the clean pass's gradients."""
        if self.tod:
            return tod_attack(model, x_clean, targets, eps=self.eps, steps=self.steps, step_size=self.step_size,
                              first_domain_grads=domain_grads)
        return pgd_attack(model, x_clean, targets, eps=self.eps, steps=self.steps, step_size=self.step_size,
                          first_grad=first_grad)

    def step(self, model, images, targets, scaler, amp: bool) -> Dict[str, float]:
        x_clean = images.detach()
        clean, mid_clean, grad, domain_grads = self.clean_pass(model, x_clean, targets, scaler, amp)
        if grad is None:  # non-finite clean loss: nothing was back-propagated; the loop skips the step
            return {"loss": float("nan"), "clean": float(clean.detach())}
        x_adv = self.attack(model, x_clean, targets, grad, domain_grads)
        teacher_mid = None
        if self.kdfa_weight:
            with torch.no_grad(), _autocast(self.device, amp):
                teacher_mid = self.teacher.features(x_clean)
        with _autocast(self.device, amp):
            adv_losses, mid_adv = model.forward_train(x_adv, targets)
        adv = sum(adv_losses.values())
        total = (1.0 - self.alpha) * adv
        align_targets, align_weights = [], []
        if self.ssfa_weight:
            align_targets.append(mid_clean)
            align_weights.append(self.ssfa_weight)
        if self.kdfa_weight:
            align_targets.append(teacher_mid)
            align_weights.append(self.kdfa_weight)
        if align_targets:  # SSFA and KDFA together are one fused call
            total = total + cuda_kernels.pooled_cosine_loss(mid_adv.float(), [t.float() for t in align_targets],
                                                            align_weights)
        logs = {"adv": float(adv.detach()), "clean": float(clean.detach()),
                **{f"adv_{k}": float(v.detach()) for k, v in adv_losses.items()}}
        if self.ssfa_weight:
            c = _pooled_cos(mid_adv, mid_clean)
            logs.update(ssfa=self.ssfa_weight * (1 - c), cos_ssfa=c)
        if self.kdfa_weight:
            c = _pooled_cos(mid_adv, teacher_mid)
            logs.update(kdfa=self.kdfa_weight * (1 - c), cos_kdfa=c)
        logs["loss"] = float(total.detach()) + self.alpha * logs["clean"]
        if math.isfinite(logs["loss"]):
            scaler.scale(total).backward()
        return logs


def build_objective(cfg: dict, model, device, log=print):
    m = cfg["method"]
    name = m.get("name", "standard")
    if name not in METHODS:
        raise ValueError(f"--method {name!r}: unknown method; available: {', '.join(METHODS)}")
    if name == "standard":
        return StandardObjective(device)
    default_w = getattr(model, "default_alignment_weight", 1.0)
    ssfa_w = m.get("ssfa_weight") if m.get("ssfa_weight") is not None else default_w
    kdfa_w = m.get("kdfa_weight") if m.get("kdfa_weight") is not None else default_w
    ssfa_w = ssfa_w if name in ("ssfa", "fa") else 0.0
    kdfa_w = kdfa_w if name in ("kdfa", "fa") else 0.0
    teacher = None
    if kdfa_w:
        if m.get("teacher"):
            from ..checkpoint import load_model

            teacher, _ = load_model(m["teacher"])
            teacher = teacher.to(device)
            log(f"KDFA teacher: {m['teacher']}")
        else:  # the paper: the clean-trained base model is both the initial weights and the teacher
            teacher = copy.deepcopy(model)
            log("KDFA teacher: the initial weights (pass --teacher to use another checkpoint)")
    return AdversarialObjective(name, device, pgd_steps=int(m.get("pgd_steps", 1)),
                                train_eps=float(m.get("train_eps", 0.01)), step_size=float(m.get("step_size", 0.01)),
                                alpha=float(m.get("alpha", 0.5)), ssfa_weight=float(ssfa_w),
                                kdfa_weight=float(kdfa_w), teacher=teacher)
