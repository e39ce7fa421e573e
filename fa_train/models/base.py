"""The Detector contract shared by every model (see DESIGN.md).

Everything above the model layer (attacks, objectives, training, evaluation, export) talks to a detector
only through these methods, so YOLOv3 and Faster R-CNN FPN are interchangeable.
"""
from __future__ import annotations

from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
from torch import nn

Detections = Dict[str, torch.Tensor]  # boxes [K,4] xyxy input pixels, scores [K], labels [K] (0-based)
Targets = List[Dict[str, torch.Tensor]]  # boxes [M,4] xyxy input pixels, labels [M], ignore [M] bool


def classwise_nms(boxes: torch.Tensor, scores: torch.Tensor, conf_thres: float, iou_thres: float, max_det: int,
                 pre_nms_topk: int, class_rows: Optional[torch.Tensor] = None) -> Detections:
    """One image's detections from per-anchor boxes [A, 4] (xyxy) and class scores [A, C]: every (anchor, class)
    above `conf_thres` a candidate, the `pre_nms_topk` highest kept, torchvision's class-wise NMS, the first
    `max_det`. `class_rows` [A, C'] adds each detection's row of it as "class_scores" (TOG-mislabel)."""
    import torchvision

    idx, cls = (scores > conf_thres).nonzero(as_tuple=True)
    sc = scores[idx, cls]
    if sc.numel() > pre_nms_topk:
        sc, order = sc.topk(pre_nms_topk)
        idx, cls = idx[order], cls[order]
    keep = torchvision.ops.batched_nms(boxes[idx], sc, cls, iou_thres)[:max_det]
    det = {"boxes": boxes[idx[keep]], "scores": sc[keep], "labels": cls[keep]}
    if class_rows is not None:
        det["class_scores"] = class_rows[idx[keep]]
    return det


class Detector(nn.Module):
    """Base class: the model name, class count and M-th layer description, plus the contract methods."""

    model_name: str = ""
    #: which loss keys belong to the classification and the localization domain (TOD attacks)
    loss_domains: Dict[str, Tuple[str, ...]] = {}
    #: channels and stride of the M-th layer (the aligned layer)
    mid_channels: int = 0
    mid_stride: int = 0
    #: the keys of `arch_config` that make the network (the rest are options such as score thresholds, which a
    #: checkpoint stores and restores but which never make it another model); None: every key (`_set_arch`)
    structural_arch: Optional[FrozenSet[str]] = None

    def __init__(self, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes

    def _set_arch(self, structural: dict, options: dict) -> None:
        """The arch config (`_arch`, what `arch_config` returns besides name and class count): the settings that make
        the network, which become `structural_arch`, and options that do not (score thresholds and kin)."""
        self._arch = {**structural, **options}
        self.structural_arch = frozenset({"name", "num_classes", *structural})

    def forward_train(self, images: torch.Tensor, targets: Targets) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- what the attacks need (fa_train/adversarial): each image's own losses, its objects' losses, the logits that
    # output slots hold an object. All are functions of each image alone: batching never changes an image's value,
    # and any sampling inside is deterministic (evaluation attacks must not depend on --batch-size or on the RNG).

    def loss_terms_per_image(self, images: torch.Tensor, targets: Targets) -> Dict[str, torch.Tensor]:
        """The `forward_train` loss terms by name, each [N]: image i's terms as if it were a batch of one (its own
        normalisers), against any `targets` (ground truth, the model's own detections, relabelled boxes, none)."""
        raise NotImplementedError

    def object_losses(self, images: torch.Tensor, targets: Targets) -> List[torch.Tensor]:
        """Per image, [M_i]: each target object's own classification + localization loss (the outputs assigned
        to it), in the order of `targets[i]`; NaN for ignored objects. The class-wise attack averages them."""
        raise NotImplementedError

    def objectness_logits(self, images: torch.Tensor) -> Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Per group of output slots, ([N, S] logits that the slot holds an object, [N, S] bool mask of valid slots
        or None when all are): TOG's vanishing and fabrication drive them down or up."""
        raise NotImplementedError

    def output_slots(self, images: torch.Tensor) -> Dict[str, object]:
        """The final outputs before NMS, one slot per candidate detection: "boxes" [N, S, 4] (input pixels,
        differentiable where the model's boxes are), "obj" [N, S] objectness logits, "cls" [N, S, C] class
        logits, "valid" [N, S] bool, and
        "cls_activation" ("sigmoid": independent class probabilities; "softmax": a distribution over classes).
        TOG-mislabel moves the slots that produce a detection to another class."""
        raise NotImplementedError

    def export_module(self) -> nn.Module:
        raise NotImplementedError

    def postprocess(self, raw: Sequence[torch.Tensor], **kw) -> List[Detections]:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, images: torch.Tensor, **kw) -> List[Detections]:
        """Detections after NMS; `with_class_scores=True` adds "class_scores" [K, C], each detection's probability
        per class (TOG-mislabel picks the most likely other class from it)."""
        raw = self.export_module()(images)
        if isinstance(raw, torch.Tensor):
            raw = (raw,)
        return self.postprocess(raw, **kw)

    def arch_config(self) -> dict:
        """What is needed to rebuild this model with create_model (stored in checkpoints)."""
        raise NotImplementedError

    # -- initial weights (fa_train/initial_weights.py: --init)
    def init_parts(self) -> list:
        """The parts of the model a state dict given to --init can initialise, most specific first
        (`initial_weights.InitPart`); a file is loaded into the one whose keys it holds exactly. Here: the whole
        model in its own layout."""
        from ..initial_weights import InitPart

        return [InitPart("model", self, f"fa-train {self.model_name} weights (a state dict of the whole model)",
                         "the whole model")]

    def input_normalization(self) -> Tuple[List[float], List[float]]:
        """(mean, std) per RGB channel the model normalises its [0, 1] input with."""
        raise NotImplementedError
