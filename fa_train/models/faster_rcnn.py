"""Faster R-CNN FPN (ResNet-50) on torchvision's implementation, behind the Detector contract.

torchvision's backbone, FPN, RPN, RoI heads and transform are reused as they are (the wrapper holds the
torchvision model as `detector`, so its parameters and module tree are torchvision's). The M-th layer of the
paper is the last ResNet stage (`layer4`, 2048 channels for ResNet-50, stride 32), tapped from the same
forward pass that computes the losses. BatchNorm is torchvision's FrozenBatchNorm2d, so attacks and
evaluation never change it; the losses are computed in eval mode too, by running the RPN and RoI heads in their
training branch for the duration of `forward_train` (torchvision only returns losses in train mode).
Input normalisation (ImageNet mean/std) happens in torchvision's transform, inside the model, so attack budgets
stay in [0, 1] pixel units.
"""
from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import Optional

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from . import register_model
from .base import Detector

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")


class WeightsFileError(FileNotFoundError):
    pass


def _load_state(path: str, what: str, expected: str) -> dict:
    if not os.path.isfile(path):
        raise WeightsFileError(f"{path}: {what} not found (nothing is downloaded: place torchvision's "
                               f"{expected} there, or leave the option unset)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return state


def build_backbone(name: str, trainable_layers: int, fpn_channels: int, weights_backbone: Optional[str]):
    """torchvision's ResNet with FrozenBatchNorm2d and torchvision's BackboneWithFPN (layers 1-4 + max-pool)."""
    if name not in BACKBONES:
        raise ValueError(f"backbone {name!r}: expected one of {BACKBONES}")
    resnet = torchvision.models.__dict__[name](weights=None, norm_layer=misc_nn_ops.FrozenBatchNorm2d)
    if weights_backbone:
        missing, unexpected = resnet.load_state_dict(
            _load_state(weights_backbone, f"ImageNet {name} weights", f"{name} ImageNet checkpoint (.pth)"),
            strict=False)
        if [k for k in missing if not k.startswith("fc.")] or unexpected:
            raise ValueError(f"{weights_backbone}: not a torchvision {name} state dict "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    # which stages train, as torchvision's _resnet_fpn_extractor does
    layers = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers.append("bn1")
    for pname, p in resnet.named_parameters():
        if all(not pname.startswith(layer) for layer in layers):
            p.requires_grad_(False)
    c = resnet.inplanes // 8  # layer1 channels (256 for ResNet-50, 64 for ResNet-18)
    in_channels = [c, c * 2, c * 4, c * 8]
    return BackboneWithFPN(resnet, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}, in_channels,
                           fpn_channels, extra_blocks=LastLevelMaxPool())


@contextlib.contextmanager
def _loss_mode(detector: FasterRCNN):
    """RPN, RoI heads and transform in their training branch (losses, proposal sampling); BN is frozen anyway."""
    mods = [detector.transform, detector.rpn, detector.roi_heads]
    modes = [m.training for m in mods]
    try:
        for m in mods:
            m.training = True
        yield
    finally:
        for m, was in zip(mods, modes):
            m.training = was


class FasterRCNNFPN(Detector):
    model_name = "fasterrcnn_resnet50_fpn"
    loss_domains = {"cls": ("loss_objectness", "loss_classifier"), "loc": ("loss_rpn_box_reg", "loss_box_reg")}
    default_alignment_weight = 1.0  # beta and gamma of equation (3) for Faster R-CNN in the paper
    mid_stride = 32

    def __init__(self, num_classes: int, backbone: str = "resnet50", fpn_channels: int = 256, min_size: int = 800,
                 max_size: int = 1333, trainable_layers: int = 3, weights: Optional[str] = None,
                 weights_backbone: Optional[str] = None, **frcnn_kw):
        super().__init__(num_classes)
        self._arch = {"backbone": backbone, "fpn_channels": fpn_channels, "min_size": min_size,
                      "max_size": max_size, "trainable_layers": trainable_layers}
        body = build_backbone(backbone, trainable_layers, fpn_channels, weights_backbone)
        self.detector = FasterRCNN(body, num_classes=num_classes + 1, min_size=min_size, max_size=max_size,
                                   image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, **frcnn_kw)
        self.mid_channels = body.body.layer4[-1].conv1.in_channels  # 2048 for ResNet-50
        if weights:
            self.load_torchvision_detector(weights)

    def load_torchvision_detector(self, path: str) -> None:
        """A torchvision Faster R-CNN checkpoint (e.g. COCO); a different class count re-initialises only the
        box predictor."""
        state = _load_state(path, "Faster R-CNN checkpoint", "fasterrcnn_resnet50_fpn COCO checkpoint (.pth)")
        own = self.detector.state_dict()
        skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        if any(not k.startswith("roi_heads.box_predictor.") for k in skipped):
            raise ValueError(f"{path}: shapes differ outside the box predictor: {skipped[:5]}")
        state = {k: v for k, v in state.items() if k not in skipped}
        missing, unexpected = self.detector.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("roi_heads.box_predictor.")]
        if missing or unexpected:
            raise ValueError(f"{path}: not a matching torchvision Faster R-CNN state dict "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")

    def arch_config(self) -> dict:
        return {"name": self.model_name, "num_classes": self.num_classes, **self._arch}

    @staticmethod
    def _tv_targets(targets):
        out = []
        for t in targets:
            keep = ~t["ignore"].bool() if "ignore" in t else torch.ones(len(t["boxes"]), dtype=torch.bool,
                                                                       device=t["boxes"].device)
            # ignore regions have no torchvision equivalent: they are left out of the training targets
            out.append({"boxes": t["boxes"][keep].float(), "labels": t["labels"][keep].long() + 1})
        return out

    def _backbone(self, image_list):
        body = self.detector.backbone.body(image_list.tensors)
        return body, body["3"]

    def forward_train(self, images, targets):
        d = self.detector
        with _loss_mode(d):
            image_list, tv_targets = d.transform(list(images), self._tv_targets(targets))
            body, mid = self._backbone(image_list)
            feats = d.backbone.fpn(body)
            proposals, rpn_losses = d.rpn(image_list, feats, tv_targets)
            _, det_losses = d.roi_heads(feats, proposals, image_list.image_sizes, tv_targets)
        losses = OrderedDict()
        losses.update(rpn_losses)
        losses.update(det_losses)
        return dict(losses), mid

    def features(self, images):
        image_list, _ = self.detector.transform(list(images))
        return self._backbone(image_list)[1]

    @torch.no_grad()
    def predict(self, images, **kw):
        was = self.detector.training
        self.detector.eval()
        try:
            out = self.detector(list(images))
        finally:
            self.detector.train(was)
        return [{"boxes": o["boxes"], "scores": o["scores"], "labels": o["labels"] - 1} for o in out]

    def export_module(self) -> nn.Module:
        raise NotImplementedError("Faster R-CNN export (ONNX / TensorRT) is not implemented yet (issue 6)")

    def postprocess(self, raw, **kw):
        raise NotImplementedError("Faster R-CNN export (ONNX / TensorRT) is not implemented yet (issue 6)")


@register_model("fasterrcnn_resnet50_fpn")
def fasterrcnn_resnet50_fpn(num_classes: int = 91, **kw) -> FasterRCNNFPN:
    return FasterRCNNFPN(num_classes, **kw)
