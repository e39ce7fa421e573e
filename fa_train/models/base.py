"""The Detector contract shared by every model (see DESIGN.md).

Everything above the model layer (attacks, objectives, training, evaluation, export) talks to a detector
only through these methods, so YOLOv3 and Faster R-CNN FPN are interchangeable.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

Detections = Dict[str, torch.Tensor]  # boxes [K,4] xyxy input pixels, scores [K], labels [K] (0-based)
Targets = List[Dict[str, torch.Tensor]]  # boxes [M,4] xyxy input pixels, labels [M], ignore [M] bool


class Detector(nn.Module):
    """Base class: the model name, class count and M-th layer description, plus the contract methods."""

    model_name: str = ""
    #: which loss keys belong to the classification and the localization domain (TOD attacks)
    loss_domains: Dict[str, Tuple[str, ...]] = {}
    #: channels and stride of the M-th layer (the aligned layer)
    mid_channels: int = 0
    mid_stride: int = 0

    def __init__(self, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes

    def forward_train(self, images: torch.Tensor, targets: Targets) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def export_module(self) -> nn.Module:
        raise NotImplementedError

    def postprocess(self, raw: Sequence[torch.Tensor], **kw) -> List[Detections]:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, images: torch.Tensor, **kw) -> List[Detections]:
        raw = self.export_module()(images)
        if isinstance(raw, torch.Tensor):
            raw = (raw,)
        return self.postprocess(raw, **kw)

    def arch_config(self) -> dict:
        """What is needed to rebuild this model with create_model (stored in checkpoints)."""
        raise NotImplementedError
