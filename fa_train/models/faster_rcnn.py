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
from typing import Callable, Optional, Sequence

import numpy as np

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from . import register_model
from .base import Detector

FPN_LEVELS = ("0", "1", "2", "3", "pool")
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

    def _features(self, image_list):
        """The FPN levels and the M-th layer from one backbone pass (a deployment twin runs its network here)."""
        body, mid = self._backbone(image_list)
        return self.detector.backbone.fpn(body), mid

    def forward_train(self, images, targets):
        d = self.detector
        with _loss_mode(d):
            image_list, tv_targets = d.transform(list(images), self._tv_targets(targets))
            feats, mid = self._features(image_list)
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

    # -- deployment: the raw output is [N, max_det, 6] detections (x1, y1, x2, y2 in input pixels, score, label),
    # zero rows past each image's detections; deployed as two networks with torchvision's own code as the glue
    export_parts = ("backbone", "roi_heads")

    @property
    def max_detections(self) -> int:
        return int(self.detector.roi_heads.detections_per_img)

    def export_module(self) -> nn.Module:
        """The source model with the raw output every backend produces (torch's own eval forward, padded)."""
        return _RawDetections(self)

    def postprocess(self, raw, conf_thres: float = 0.0, **kw):
        """Shared by every backend: [N, max_det, 6] -> per-image detections (rows with a score above
        `conf_thres` and above 0: the padding is all zero)."""
        dets = torch.as_tensor(raw[0] if isinstance(raw, (list, tuple)) else raw).float()
        out = []
        for d in dets:
            keep = d[:, 4] > max(conf_thres, 0.0)
            d = d[keep]
            out.append({"boxes": d[:, :4], "scores": d[:, 4], "labels": d[:, 5].round().long()})
        return out

    def part_modules(self) -> dict:
        """The two deployed networks: `backbone` (normalised, resized images -> FPN features and the RPN head's
        objectness and box deltas per level) and `roi_heads` (pooled RoI features -> class logits, box deltas).
        Everything between them (anchors, proposal decoding, NMS, multi-scale RoIAlign) and after them
        (detection decoding, NMS, rescaling) runs in torchvision's own code: `run_split`."""
        return {"backbone": _BackbonePart(self), "roi_heads": _BoxPart(self)}

    def transformed_size(self, img_size: int) -> tuple:
        """(H, W) of the tensor torchvision's transform makes from an img_size x img_size input."""
        image_list, _ = self.detector.transform([torch.zeros(3, img_size, img_size)])
        return tuple(image_list.tensors.shape[-2:])

    def run_split(self, images, run_backbone: Callable, run_roi_heads: Callable) -> np.ndarray:
        """Detections [N, max_det, 6] with the two networks replaced by `run_backbone(x) -> 15 arrays` and
        `run_roi_heads(x) -> 2 arrays` (numpy in, numpy out: ONNX Runtime sessions, TensorRT engines or the
        torch parts). The rest is torchvision's eval forward, unchanged."""
        d = self.detector
        stash = {}

        def backbone(x):
            outs = [torch.from_numpy(np.asarray(o, dtype=np.float32)) for o in run_backbone(x.numpy())]
            if len(outs) != 3 * len(FPN_LEVELS):
                raise RuntimeError(f"backbone part returned {len(outs)} outputs, expected {3 * len(FPN_LEVELS)}")
            stash["rpn"] = (outs[5:10], outs[10:15])
            return OrderedDict(zip(FPN_LEVELS, outs[:5]))

        def box_head(x):
            if x.shape[0] == 0:
                k = self.num_classes + 1
                return x.new_zeros(0, k), x.new_zeros(0, 4 * k)
            logits, deltas = run_roi_heads(x.numpy())
            return (torch.from_numpy(np.asarray(logits, dtype=np.float32)),
                    torch.from_numpy(np.asarray(deltas, dtype=np.float32)))

        swaps = [(d, "backbone", _Call(backbone)), (d.rpn, "head", _Call(lambda feats: stash["rpn"])),
                 (d.roi_heads, "box_head", _Call(box_head)), (d.roi_heads, "box_predictor", nn.Identity())]
        was = d.training
        d.eval()
        old = [getattr(m, name) for m, name, _ in swaps]
        try:
            for m, name, new in swaps:
                setattr(m, name, new)
            with torch.inference_mode():
                out = d(list(torch.as_tensor(np.asarray(images, dtype=np.float32))))
        finally:
            for (m, name, _), o in zip(swaps, old):
                setattr(m, name, o)
            d.train(was)
        return pad_detections(out, self.max_detections).numpy()


class _Call(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def pad_detections(dets: Sequence[dict], max_det: int) -> torch.Tensor:
    """torchvision detections -> [N, max_det, 6] (labels 0-based, as floats), zero rows after the last one.
    Concatenate-then-slice keeps the shape fixed in a traced graph too."""
    rows = []
    for o in dets:
        b = o["boxes"].float()
        d = torch.cat([b, o["scores"].float()[:, None], (o["labels"] - 1).to(b.dtype)[:, None]], 1)
        rows.append(torch.cat([d, d.new_zeros(max_det, 6)])[:max_det])
    return torch.stack(rows)


class _RawDetections(nn.Module):
    def __init__(self, model: FasterRCNNFPN):
        super().__init__()
        self.model = model

    def forward(self, images):
        d = self.model.detector
        was = d.training
        d.eval()
        try:
            out = d(list(images))
        finally:
            d.train(was)
        return pad_detections(out, self.model.max_detections)


class _BackbonePart(nn.Module):
    """images as torchvision's transform leaves them [N,3,H,W] -> 5 FPN levels, 5 objectness maps, 5 delta maps."""

    def __init__(self, model: FasterRCNNFPN):
        super().__init__()
        self.backbone = model.detector.backbone
        self.head = model.detector.rpn.head

    def forward(self, x):
        feats = self.backbone(x)
        objectness, deltas = self.head(list(feats.values()))
        return (*feats.values(), *objectness, *deltas)


class _BoxPart(nn.Module):
    """pooled RoI features [R, C, 7, 7] -> class logits [R, K+1], box deltas [R, 4(K+1)]."""

    def __init__(self, model: FasterRCNNFPN):
        super().__init__()
        self.box_head = model.detector.roi_heads.box_head
        self.box_predictor = model.detector.roi_heads.box_predictor

    def forward(self, x):
        return self.box_predictor(self.box_head(x))


@register_model("fasterrcnn_resnet50_fpn")
def fasterrcnn_resnet50_fpn(num_classes: int = 91, **kw) -> FasterRCNNFPN:
    return FasterRCNNFPN(num_classes, **kw)
