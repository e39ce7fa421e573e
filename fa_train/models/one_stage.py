"""torchvision's one-stage detectors (RetinaNet, FCOS) behind the Detector contract.

torchvision's backbone (ResNet with FrozenBatchNorm2d + FPN P3-P7), head, anchor generator, matcher and loss are
reused as they are: the wrapper holds the torchvision model as `detector`, so its parameters, module tree and
state-dict keys are torchvision's (its COCO checkpoints load unchanged). What the wrapper adds is one batched pass
that every method shares (`_pass`): torchvision's GeneralizedRCNNTransform done on the whole batch at once
(normalise, resize, pad to a multiple of 32: the same arithmetic, so a traced export keeps a dynamic batch),
the FPN and head, and the anchors of that input size.

- The M-th layer (KDFA/SSFA) is the last ResNet stage, `layer4` (C5: 2048 channels for ResNet-50, stride 32),
  as for Faster R-CNN in the paper: the deepest backbone feature before the detector-specific neck (FPN) and head,
  tapped from the same forward pass that computes the losses.
- Classes are 0-based with no background slot: the heads are sigmoid classifiers (one logit per class), so
  torchvision's `num_classes` is the dataset's class count.
- Losses are torchvision's own (`compute_loss`: focal classification, L1 (RetinaNet) or GIoU + centerness (FCOS)
  box terms); `loss_terms_per_image` calls it on each image as a batch of one.
- Neither family has an objectness output. What stands for it (TOG vanishing / fabrication, `objectness_logits`):
  RetinaNet, the largest class logit of each anchor (the logit of its detection score); FCOS, the logit of its
  detection score sqrt(sigmoid(best class logit) * sigmoid(centerness)), centerness folded in.
- Export: one network, images -> [N, anchors, 4 + C] (boxes in input pixels, clipped as torchvision clips them,
  then per-class scores), no NMS; `postprocess` is torchvision's `postprocess_detections` on it (score threshold,
  top-k candidates per FPN level, batched NMS, detections per image).
"""
from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from . import register_model
from .base import Detector
from .faster_rcnn import (IMAGENET_MEAN, IMAGENET_STD, WeightsMismatchError, _body_part, build_backbone,
                          read_torchvision_state, torchvision_options)

SIZE_DIVISIBLE = 32  # GeneralizedRCNNTransform's padding
LEVEL_STRIDES = (8, 16, 32, 64, 128)  # P3-P7 of the ResNet FPN with LastLevelP6P7


@contextlib.contextmanager
def _not_traced():
    """Tracing (torch.onnx.export) paused: tensors made inside are constants of the trace."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


class OneStageDetector(Detector):
    """Shared code of torchvision's anchor-based/anchor-free one-stage detectors on a ResNet-FPN P3-P7 backbone.
    A family sets `tv_class`, `loss_domains`, `head_predictors` and the four small methods marked per family."""

    tv_class = None
    default_alignment_weight = 1.0  # beta and gamma of equation (3): Faster R-CNN's (the paper has no one-stage
    mid_stride = 32                 # ResNet value)
    #: the head's prediction convolutions (module paths under `detector`); their outputs and the decode after them
    #: stay float32 in fp16/int8 exports; the class predictor is re-initialised for another class count
    head_predictors: Tuple[str, ...] = ()
    class_predictor = "head.classification_head.cls_logits"
    #: torchvision's padding of the resized input (GeneralizedRCNNTransform's size_divisible; SSD: 1, fixed size)
    size_divisible = SIZE_DIVISIBLE
    #: added to our 0-based labels for torchvision (1 where class 0 is torchvision's background: SSD)
    label_offset = 0
    #: the module scope of the M-th layer in an exported graph (the twin's `features` tap)
    twin_mid_scope = "body/layer4"  # the export calls the ResNet body as `body`

    def __init__(self, num_classes: int, backbone: str = "resnet50", fpn_channels: int = 256, min_size: int = 800,
                 max_size: int = 1333, trainable_layers: int = 3, weights: Optional[str] = None,
                 weights_backbone: Optional[str] = None, **tv_kw):
        super().__init__(num_classes)
        self._set_arch({"backbone": backbone, "fpn_channels": fpn_channels, "min_size": min_size,
                        "max_size": max_size, "trainable_layers": trainable_layers},
                       torchvision_options(self.model_name, tv_kw))
        body = build_backbone(backbone, trainable_layers, fpn_channels, weights_backbone, returned_layers=(2, 3, 4),
                              extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))
        self.detector = self.tv_class(body, num_classes=num_classes, min_size=min_size, max_size=max_size,
                                      image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, **tv_kw)
        self.mid_channels = body.body.layer4[-1].conv1.in_channels  # 2048 for ResNet-50
        self.export_keep_float32 = tuple(f"detector.{p}" for p in self.head_predictors)
        self._anchor_cache: Dict[tuple, torch.Tensor] = {}
        self._levels_seen: Dict[int, List[int]] = {}
        if weights:
            self.load_torchvision_detector(weights)

    def load_torchvision_detector(self, path: str) -> None:
        """A torchvision checkpoint of this detector (e.g. COCO); another class count re-initialises only the class
        predictor."""
        state = read_torchvision_state(path, f"{self.model_name} checkpoint",
                                       f"{self.model_name} COCO checkpoint (.pth)")
        own = self.detector.state_dict()
        skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        reinit = self.class_predictor_prefixes()
        if any(not k.startswith(reinit) for k in skipped):
            raise WeightsMismatchError(f"{path}: not a torchvision {self.model_name} checkpoint of this "
                                      f"configuration: shapes differ outside the class predictor: {skipped[:5]}")
        state = {k: v for k, v in state.items() if k not in skipped}
        missing, unexpected = self.detector.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(reinit)]
        if missing or unexpected:
            raise WeightsMismatchError(f"{path}: not a torchvision {self.model_name} checkpoint "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")

    def class_predictor_prefixes(self) -> Tuple[str, ...]:
        """State-dict key prefixes (under `detector`) of the parameters whose shape depends on the class count: those a
        torchvision checkpoint of another class count leaves at their initialisation."""
        return (self.class_predictor + ".",)

    def head_convs(self) -> Dict[str, object]:
        """The head's prediction convolutions by the head output they make (`cls_logits`, `bbox_regression`, ...):
        one module path under `detector` (a convolution shared by every level: one node per level in an export) or
        a tuple of paths, one per level. The twin reads their outputs in an exported graph."""
        return dict(zip(("cls_logits", "bbox_regression", "bbox_ctrness"), self.head_predictors))

    def head_width(self, key: str) -> int:
        """Values per anchor of the head output `key` (the class logits: the class count, with torchvision's
        background where it has one)."""
        return self.num_classes + self.label_offset if key == "cls_logits" else 4 if key == "bbox_regression" else 1

    def arch_config(self) -> dict:
        return {"name": self.model_name, "num_classes": self.num_classes, **self._arch}

    def init_parts(self) -> list:
        """--init state dicts: the ResNet body (torchvision's ResNet layout, ImageNet or adversarially pre-trained;
        `fc` ignored), a torchvision detector of this family (another class count re-initialises the class
        predictor), or this wrapper."""
        from ..initial_weights import InitPart

        name = self._arch["backbone"]
        return [_body_part(self.detector.backbone.body, name),
                InitPart("detector", self.detector, f"a torchvision {self.model_name} state dict ({name} FPN)",
                         "the whole detector", reinit=self.class_predictor_prefixes()),
                *super().init_parts()]

    def input_normalization(self):
        return list(IMAGENET_MEAN), list(IMAGENET_STD)

    # -- the one pass every method shares

    def resized_size(self, h: int, w: int) -> Tuple[int, int]:
        """(H, W) torchvision's transform resizes an h x w image to (its float32 scale, then floor)."""
        t = self.detector.transform
        lo, hi = np.float32(min(h, w)), np.float32(max(h, w))
        scale = min(np.float32(float(t.min_size[-1])) / lo, np.float32(float(t.max_size)) / hi)
        return int(math.floor(h * float(scale))), int(math.floor(w * float(scale)))

    def _prep(self, images: torch.Tensor, targets=None):
        """GeneralizedRCNNTransform on the whole batch: (normalised, resized, zero-padded tensor, the resized
        (H, W), torchvision targets with their boxes resized)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N,3,H,W] float RGB in [0,1], got shape {tuple(images.shape)}")
        t = self.detector.transform
        h, w = int(images.shape[-2]), int(images.shape[-1])
        rh, rw = self.resized_size(h, w)
        mean = torch.as_tensor(t.image_mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.as_tensor(t.image_std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        x = (images - mean) / std
        if (rh, rw) != (h, w):
            x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False)
        div = self.size_divisible
        ph, pw = (int(math.ceil(v / div) * div) for v in (rh, rw))
        if (ph, pw) != (rh, rw):
            x = F.pad(x, (0, pw - rw, 0, ph - rh))
        tv_targets = None
        if targets is not None:
            tv_targets = []
            for tt in targets:
                keep = ~tt["ignore"].bool() if "ignore" in tt else torch.ones(len(tt["boxes"]), dtype=torch.bool,
                                                                              device=tt["boxes"].device)
                # ignore regions have no torchvision equivalent: left out of the targets, as for Faster R-CNN
                boxes = tt["boxes"][keep].to(images.device, images.dtype)
                tv_targets.append({"boxes": resize_boxes(boxes, (h, w), (rh, rw)) if len(boxes) else boxes,
                                   "labels": tt["labels"][keep].to(images.device).long() + self.label_offset})
        return x, (rh, rw), tv_targets

    def _anchors(self, x: torch.Tensor, shapes: Sequence[Tuple[int, int]]) -> torch.Tensor:
        """[A, 4] anchors (transformed pixels) of one image of this padded size and these FPN level shapes: the same
        for every image."""
        hw = tuple(int(v) for v in x.shape[-2:])
        key = (hw, tuple(shapes), x.device, x.dtype)
        if key not in self._anchor_cache:
            if len(self._anchor_cache) > 16:
                self._anchor_cache.clear()
            # outside any trace: in an exported graph the anchors are one constant, not the generator's ops
            with torch.no_grad(), _not_traced():
                dummy = ImageList(torch.zeros(1, 3, *hw, dtype=x.dtype, device=x.device), [hw])
                self._anchor_cache[key] = self.detector.anchor_generator(
                    dummy, [torch.zeros(1, 1, h, w, dtype=x.dtype, device=x.device) for h, w in shapes])[0]
        return self._anchor_cache[key]

    def _network(self, images: torch.Tensor, x: torch.Tensor):
        """(the M-th layer, the head's outputs {name: [N, A, K]}, the FPN level shapes) of the transformed images
        `x` (a deployment twin runs its file on `images` here)."""
        fpn = self.detector.backbone
        body = fpn.body(x)
        mid = body[str(len(body) - 1)]  # layer4
        feats = list(fpn.fpn(body).values())
        return mid, self.detector.head(feats), [(int(f.shape[-2]), int(f.shape[-1])) for f in feats]

    def _pass(self, images: torch.Tensor, targets=None) -> SimpleNamespace:
        x, size, tv_targets = self._prep(images, targets)
        mid, head, shapes = self._network(images, x)
        anchors = self._anchors(x, shapes)
        per_loc = len(anchors) // sum(h * w for h, w in shapes)
        levels = [h * w * per_loc for h, w in shapes]
        self._levels_seen[len(anchors)] = levels
        return SimpleNamespace(x=x, size=size, orig=tuple(int(v) for v in images.shape[-2:]), targets=tv_targets,
                               mid=mid, shapes=shapes, head=head, anchors=anchors, levels=levels)

    def _boxes(self, p: SimpleNamespace) -> torch.Tensor:
        """[N, A, 4] every anchor's decoded box in input pixels, clipped to the image as torchvision clips it
        (in transformed pixels, then rescaled)."""
        reg = p.head["bbox_regression"]
        n = reg.shape[0]
        boxes = self._decode(reg.reshape(-1, 4), p.anchors.repeat(n, 1))
        boxes = box_ops.clip_boxes_to_image(boxes, p.size)
        return resize_boxes(boxes, p.size, p.orig).view(n, -1, 4)

    # -- per family
    def _tv_loss(self, p: SimpleNamespace, targets, head: dict, n: int) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def _decode(self, reg: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _class_scores(self, head: dict) -> torch.Tensor:
        """[N, A, C] the detection score of every anchor and class (what torchvision thresholds)."""
        raise NotImplementedError

    def _anchor_losses(self, p: SimpleNamespace, i: int, pos: torch.Tensor, gt: dict,
                       matched: torch.Tensor) -> torch.Tensor:
        """[P]: the classification + localization loss of each positive anchor `pos` of image i (as torchvision's
        loss terms sum it) against its matched object."""
        raise NotImplementedError

    def _object_logit(self, head: dict) -> torch.Tensor:
        raise NotImplementedError

    # -- Detector contract: training

    def forward_train(self, images, targets):
        p = self._pass(images, targets)
        n = len(images)
        return dict(self._tv_loss(p, p.targets, p.head, n)), p.mid

    def features(self, images):
        x, _, _ = self._prep(images)
        body = self.detector.backbone.body(x)
        return body[str(len(body) - 1)]

    # -- the attacks' view

    def loss_terms_per_image(self, images, targets):
        """torchvision's loss terms of each image as torchvision computes them for a batch of that image alone
        (its own foreground count as normaliser), from one batched forward."""
        p = self._pass(images, targets)
        terms: Dict[str, list] = {}
        for i in range(len(images)):
            head = {k: v[i:i + 1] for k, v in p.head.items()}
            for k, v in self._tv_loss(p, p.targets[i:i + 1], head, 1).items():
                terms.setdefault(k, []).append(v)
        return {k: torch.stack(v) for k, v in terms.items()}

    def _matches(self, p: SimpleNamespace) -> List[torch.Tensor]:
        """torchvision's own anchor-to-object assignment of every image (matched object index per anchor, < 0:
        background or between thresholds), captured from its `compute_loss`."""
        seen = []
        head = self.detector.head

        def capture(targets, head_outputs, anchors, matched_idxs):
            seen.extend(matched_idxs)
            return {}

        head.compute_loss = capture
        try:
            self._tv_loss(p, p.targets, {k: v.detach() for k, v in p.head.items()}, len(p.targets))
        finally:
            del head.compute_loss
        return seen

    def object_losses(self, images, targets):
        """Per object: the mean over the anchors torchvision assigns to it of their classification + localization
        loss (the terms of torchvision's loss, unnormalised); NaN for ignored objects and objects no anchor is
        assigned to."""
        p = self._pass(images, targets)
        matches = self._matches(p)
        out = []
        for i, (t, m) in enumerate(zip(targets, matches)):
            kept = torch.where(~t["ignore"].bool())[0] if "ignore" in t else torch.arange(len(t["boxes"]))
            kept = kept.to(m.device)
            total = p.head["cls_logits"].new_full((len(t["boxes"]),), float("nan"))
            pos = torch.where(m >= 0)[0]
            if len(pos):
                loss = self._anchor_losses(p, i, pos, p.targets[i], m[pos])
                obj = kept[m[pos]]
                s = loss.new_zeros(len(total)).index_add(0, obj, loss)
                c = loss.new_zeros(len(total)).index_add(0, obj, torch.ones_like(loss))
                total = torch.where(c > 0, s / c.clamp(min=1), total)
            out.append(total)
        return out

    def objectness_logits(self, images):
        p = self._pass(images)
        return {"score": (self._object_logit(p.head), None)}

    def output_slots(self, images):
        """Every anchor (location) of every FPN level: its decoded box (input pixels, differentiable), the logit that
        stands for objectness (see the family's `objectness_logits`), the class logits (sigmoid). The anchors are the
        same outputs for every input (`fixed`)."""
        p = self._pass(images)
        obj, cls = self._slot_logits(p.head)
        return {"boxes": self._boxes(p), "obj": obj, "cls": cls,
                "valid": torch.ones(obj.shape, dtype=torch.bool, device=obj.device), "cls_activation": "sigmoid",
                "fixed": True}

    def _slot_logits(self, head):
        return self._object_logit(head), head["cls_logits"]

    # -- deployment: one network, images -> [N, A, 4 + C]

    @property
    def max_detections(self) -> int:
        return int(self.detector.detections_per_img)

    def export_module(self) -> nn.Module:
        return _OneStageExport(self)

    def level_sizes(self, anchors: int) -> List[int]:
        """Anchors per FPN level of a raw output with `anchors` rows: as a pass of this model saw them, else those of
        a square input (the letterboxed inputs of this project), else a clear error."""
        if anchors in self._levels_seen:
            return self._levels_seen[anchors]
        m = min(int(self.detector.transform.min_size[-1]), int(self.detector.transform.max_size))
        per_loc = self.detector.anchor_generator.num_anchors_per_location()[0]
        tried = []
        for side in sorted({int(math.ceil(v / SIZE_DIVISIBLE) * SIZE_DIVISIBLE) for v in (m, m - 1)}):
            levels = [int(math.ceil(side / s)) ** 2 * per_loc for s in LEVEL_STRIDES]
            if sum(levels) == anchors:
                return levels
            tried.append(f"{sum(levels)} for {side}x{side}")
        raise ValueError(f"{self.model_name}: raw output with {anchors} anchors does not come from this model's "
                         f"square input size (expected {' or '.join(tried)})")

    def postprocess(self, raw, conf_thres: float = 0.0, with_class_scores: bool = False, **kw):
        """Shared by every backend: raw [N, A, 4 + C] (torch or numpy) -> per-image detections, as torchvision's
        `postprocess_detections`: scores above its `score_thresh`, the `topk_candidates` best per FPN level, batched
        NMS at `nms_thresh`, the first `detections_per_img`; then scores above `conf_thres`."""
        d = self.detector
        pred = torch.as_tensor(raw[0] if isinstance(raw, (list, tuple)) else raw)
        pred = pred if pred.dtype == torch.float64 else pred.float()
        levels = self.level_sizes(pred.shape[1])
        c = pred.shape[2] - 4
        out = []
        for p in pred:
            boxes, scores, labels, rows = [], [], [], []
            start = 0
            for n_l in levels:
                sc = p[start:start + n_l, 4:].flatten()
                keep = torch.where(sc > d.score_thresh)[0]
                sc = sc[keep]
                sc, idx = sc.topk(min(int(d.topk_candidates), len(keep)))
                flat = keep[idx]
                anchor = torch.div(flat, c, rounding_mode="floor") + start
                boxes.append(p[anchor, :4])
                scores.append(sc)
                labels.append(flat % c)
                rows.append(anchor)
                start += n_l
            boxes, scores, labels, rows = (torch.cat(v) for v in (boxes, scores, labels, rows))
            keep = box_ops.batched_nms(boxes, scores, labels, d.nms_thresh)[:self.max_detections]
            keep = keep[scores[keep] > conf_thres]
            det = {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
            if with_class_scores:
                det["class_scores"] = p[rows[keep], 4:]
            out.append(det)
        return out


class _OneStageExport(nn.Module):
    """images [N,3,H,W] in [0,1] -> [N, A, 4 + C]: each anchor's box (input pixels) and class scores; no NMS."""

    def __init__(self, model: OneStageDetector):
        super().__init__()
        self.model = model

    def forward(self, images):
        p = self.model._pass(images)
        return torch.cat([self.model._boxes(p), self.model._class_scores(p.head).to(images.dtype)], -1)


def _focal(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[P]: torchvision's sigmoid focal loss of each row against its one-hot class, summed over classes."""
    target = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
    return torchvision.ops.sigmoid_focal_loss(logits, target, reduction="none").sum(-1)


class RetinaNetFPN(OneStageDetector):
    """RetinaNet (torchvision `retinanet_resnet50_fpn`): 9 anchors per location, focal loss, L1 box loss."""

    model_name = "retinanet_resnet50_fpn"
    tv_class = RetinaNet
    loss_domains = {"cls": ("classification",), "loc": ("bbox_regression",)}
    head_predictors = ("head.classification_head.cls_logits", "head.regression_head.bbox_reg")

    def _tv_loss(self, p, targets, head, n):
        return self.detector.compute_loss(targets, head, [p.anchors] * n)

    def _decode(self, reg, anchors):
        return self.detector.box_coder.decode_single(reg, anchors)

    def _class_scores(self, head):
        return torch.sigmoid(head["cls_logits"])

    def _anchor_losses(self, p, i, pos, gt, matched):
        rh = self.detector.head.regression_head
        target = rh.box_coder.encode_single(gt["boxes"][matched], p.anchors[pos])
        box = F.l1_loss(p.head["bbox_regression"][i, pos], target, reduction="none").sum(-1)
        return _focal(p.head["cls_logits"][i, pos], gt["labels"][matched]) + box

    def _object_logit(self, head):
        """RetinaNet has no objectness: each anchor's largest class logit (the logit of its detection score)."""
        return head["cls_logits"].max(-1).values


class FCOSFPN(OneStageDetector):
    """FCOS (torchvision `fcos_resnet50_fpn`): one location per cell, focal loss, GIoU box loss, centerness."""

    model_name = "fcos_resnet50_fpn"
    tv_class = FCOS
    loss_domains = {"cls": ("classification",), "loc": ("bbox_regression", "bbox_ctrness")}
    head_predictors = ("head.classification_head.cls_logits", "head.regression_head.bbox_reg",
                       "head.regression_head.bbox_ctrness")

    def __init__(self, num_classes: int, fpn_channels: int = 256, **kw):
        if fpn_channels % 32:
            raise ValueError(f"fcos_resnet50_fpn: fpn_channels {fpn_channels} must be a multiple of 32 (the head's "
                             f"GroupNorm has 32 groups)")
        super().__init__(num_classes, fpn_channels=fpn_channels, **kw)

    def _tv_loss(self, p, targets, head, n):
        return self.detector.compute_loss(targets, head, [p.anchors] * n, [h * w for h, w in p.shapes])

    def _decode(self, reg, anchors):
        return self.detector.head.box_coder.decode(reg, anchors)

    def _class_scores(self, head):
        return torch.sqrt(torch.sigmoid(head["cls_logits"]) * torch.sigmoid(head["bbox_ctrness"]))

    def _anchor_losses(self, p, i, pos, gt, matched):
        coder = self.detector.head.box_coder
        anchors, boxes = p.anchors[pos].to(gt["boxes"].dtype), gt["boxes"][matched]
        pred = coder.decode(p.head["bbox_regression"][i, pos], anchors)
        giou = torchvision.ops.generalized_box_iou_loss(pred, boxes, reduction="none")
        reg = coder.encode(anchors, boxes)
        lr, tb = reg[:, [0, 2]], reg[:, [1, 3]]
        ctr = torch.sqrt((lr.min(-1)[0] / lr.max(-1)[0]) * (tb.min(-1)[0] / tb.max(-1)[0]))
        ctr_loss = F.binary_cross_entropy_with_logits(p.head["bbox_ctrness"][i, pos, 0], ctr, reduction="none")
        return _focal(p.head["cls_logits"][i, pos], gt["labels"][matched]) + giou + ctr_loss

    def _object_logit(self, head):
        """FCOS has no objectness: the logit of each location's detection score sqrt(sigmoid(best class logit) x
        sigmoid(centerness)), centerness folded in."""
        log_p = 0.5 * (F.logsigmoid(head["cls_logits"].max(-1).values) + F.logsigmoid(head["bbox_ctrness"][..., 0]))
        log_p = log_p.clamp(max=-1e-7)
        return log_p - torch.log(-torch.expm1(log_p))

    def _slot_logits(self, head):
        # TOG-mislabel's slot score sigmoid(obj) x max sigmoid(cls) is then FCOS's detection score squared
        return head["bbox_ctrness"][..., 0], head["cls_logits"]


ONE_STAGE = {cls.model_name: cls for cls in (RetinaNetFPN, FCOSFPN)}  # the twins' model classes by name


@register_model("retinanet_resnet50_fpn")
def retinanet_resnet50_fpn(num_classes: int = 91, **kw) -> RetinaNetFPN:
    return RetinaNetFPN(num_classes, **kw)


@register_model("fcos_resnet50_fpn")
def fcos_resnet50_fpn(num_classes: int = 91, **kw) -> FCOSFPN:
    return FCOSFPN(num_classes, **kw)
