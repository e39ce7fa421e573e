"""Training objectives. Each objective's `step` runs the forward/backward passes of one training step and
returns the logged scalars; the optimizer step belongs to the training loop."""
from __future__ import annotations

import math
from typing import Dict

import torch


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


def build_objective(cfg: dict, model, device, log=print):
    name = cfg["method"]["name"]
    if name == "standard":
        return StandardObjective(device)
    raise ValueError(f"--method {name!r}: unknown method; available: standard")
