"""torchvision's SSDlite320 MobileNetV3-Large behind the Detector contract (`--model ssdlite320_mobilenet_v3_large`).

The network is torchvision's, built from its own parts as its `ssdlite320_mobilenet_v3_large` builder builds it
(MobileNetV3-Large with BatchNorm2d(eps 0.001, momentum 0.03), `_mobilenet_extractor` (C4 expansion + the body's end +
four extra blocks), `DefaultBoxGenerator`, `SSDLiteHead`, `SSD` with the builder's thresholds and [-1, 1] input
scaling), held as `detector`: its state-dict keys are torchvision's, so its COCO checkpoint loads unchanged. The
shared one-stage code (`OneStageDetector`) does the batched pass; what SSD changes:

- Input: torchvision's fixed-size resize (`size` x `size`, 320 by default; the tests use 64-128 px), no padding.
- Classes: a softmax over the classes plus torchvision's background at index 0; our labels are 0-based, so label
  c is torchvision's c + 1 and `num_classes` is the dataset's class count (torchvision's is one more).
- Losses: torchvision's `SSD.compute_loss` (Smooth-L1 box regression over the matched anchors; softmax cross-entropy
  over the matched anchors plus the hardest negatives, 3 per positive, per image), with torchvision's
  `SSDMatcher` assignment. Both are divided by the batch's total foreground count; `loss_terms_per_image` calls
  it on each image as a batch of one (its own count), so an image's terms never depend on the batch.
- The M-th layer (KDFA/SSFA) is the end of the MobileNetV3 body, the backbone extractor's second output
  (`detector.backbone.features[1]`: the last 1x1 conv of MobileNetV3, stride 32, 480 channels with torchvision's
  reduced tail at width 1.0, 960 with the full tail that ImageNet weights need): as layer4 for the ResNet
  detectors and Darknet-53's last stage for YOLOv3, the deepest backbone feature before the detector-specific part
  (the SSDlite extra blocks and the heads), tapped from the same forward pass that computes the losses.
- Objectness (TOG vanishing / fabrication): SSD has none; what stands for it is the logit of "not background",
  logsumexp(foreground logits) - background logit, whose sigmoid is 1 - P(background) = the sum of the anchor's
  class probabilities. `output_slots` gives it as "obj" with the foreground logits as "cls" under a softmax, so
  that sigmoid(obj) x softmax(cls) is exactly torchvision's class probability (TOG-mislabel's slot score is the
  anchor's detection score).
- Export: one network, images -> [N, anchors, 4 + C] (boxes in input pixels clipped as torchvision clips them,
  then the softmax probabilities of the C classes, background left out), no NMS; `postprocess` is torchvision's
  `postprocess_detections` on it (per class: scores above `score_thresh`, its `topk_candidates` best over all
  anchors; batched NMS; the first `detections_per_img`).
"""
from __future__ import annotations

from functools import partial
from typing import Dict, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteHead, _mobilenet_extractor, _normal_init
from torchvision.models.mobilenetv3 import mobilenet_v3_large
from torchvision.ops import boxes as box_ops

from . import register_model
from .base import Detector
from .faster_rcnn import WeightsMismatchError, read_torchvision_state
from .one_stage import ONE_STAGE, OneStageDetector

LEVELS = 6  # feature maps: C4 expansion, the body's end, four extra blocks
SSD_MEAN = SSD_STD = (0.5, 0.5, 0.5)  # the builder's: [0, 1] -> [-1, 1]


class _Body(nn.Module):
    """MobileNetV3's `features` in torchvision's MobileNetV3 layout (`features.N.*` keys), sharing its modules with
    the SSD extractor: a MobileNetV3 state dict (ImageNet, robust ImageNet) loads into the detector through it."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features


class SSDLite320(OneStageDetector):
    """SSDlite320 MobileNetV3-Large (torchvision `ssdlite320_mobilenet_v3_large`): 6 feature maps, 6 default boxes
    per location, softmax classes with a background, hard negative mining."""

    model_name = "ssdlite320_mobilenet_v3_large"
    tv_class = SSD
    loss_domains = {"cls": ("classification",), "loc": ("bbox_regression",)}
    head_predictors = tuple(f"head.{h}.module_list.{i}.1" for h in ("classification_head", "regression_head")
                            for i in range(LEVELS))
    class_predictor = "head.classification_head.module_list"
    size_divisible = 1
    label_offset = 1
    twin_mid_scope = "backbone/features.1"  # node names of the export: /backbone/features.1/...

    def __init__(self, num_classes: int, size: int = 320, width_mult: float = 1.0, trainable_layers: int = 6,
                 reduced_tail: Optional[bool] = None, weights: Optional[str] = None,
                 weights_backbone: Optional[str] = None, score_thresh: float = 0.001, nms_thresh: float = 0.55,
                 detections_per_img: int = 300, topk_candidates: int = 300):
        Detector.__init__(self, num_classes)  # not OneStageDetector's: no ResNet-FPN here
        size, trainable_layers = int(size), int(trainable_layers)
        if size < 1:
            raise ValueError(f"{self.model_name}: size {size} must be >= 1 (the square input side, torchvision: 320)")
        if not 0 <= trainable_layers <= 6:
            raise ValueError(f"{self.model_name}: trainable_layers {trainable_layers} must be in 0..6")
        if not width_mult > 0:
            raise ValueError(f"{self.model_name}: width_mult {width_mult} must be > 0")
        # torchvision halves the last stage ("reduced tail") unless ImageNet backbone weights are loaded
        reduced_tail = weights_backbone is None if reduced_tail is None else bool(reduced_tail)
        self._set_arch({"size": size, "width_mult": float(width_mult), "trainable_layers": trainable_layers,
                        "reduced_tail": reduced_tail},
                       {"score_thresh": float(score_thresh), "nms_thresh": float(nms_thresh),
                        "detections_per_img": int(detections_per_img), "topk_candidates": int(topk_candidates)})
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
        mnv3 = mobilenet_v3_large(weights=None, norm_layer=norm, reduced_tail=reduced_tail, width_mult=width_mult)
        body = _Body(mnv3.features)
        if weights_backbone:
            self._load_backbone(body, weights_backbone)
        else:
            _normal_init(mnv3)
        extractor = _mobilenet_extractor(mnv3, trainable_layers, norm)
        anchors = DefaultBoxGenerator([[2, 3] for _ in range(LEVELS)], min_ratio=0.2, max_ratio=0.95)
        with torch.no_grad():
            channels = det_utils.retrieve_out_channels(extractor, (size, size))
        head = SSDLiteHead(channels, anchors.num_anchors_per_location(), num_classes + 1, norm)
        self.detector = SSD(extractor, anchors, (size, size), num_classes + 1, image_mean=list(SSD_MEAN),
                            image_std=list(SSD_STD), head=head, score_thresh=score_thresh, nms_thresh=nms_thresh,
                            detections_per_img=detections_per_img, topk_candidates=topk_candidates)
        self.__dict__["_body"] = body  # not a submodule: its parameters are the extractor's (no duplicate keys)
        self.size = size
        self.mid_channels = int(extractor.features[1][-1].out_channels)
        self.export_keep_float32 = tuple(f"detector.{p}" for p in self.head_predictors)
        self._anchor_cache = {}
        self._levels_seen = {}
        if weights:
            self.load_torchvision_detector(weights)

    def _load_backbone(self, body: _Body, path: str) -> None:
        state = read_torchvision_state(path, "MobileNetV3-Large backbone weights",
                                       "mobilenet_v3_large state dict (.pth)", flag="model.weights_backbone")
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        own = body.state_dict()
        bad = sorted(k for k in own if k in state and own[k].shape != state[k].shape)
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if bad or missing or unexpected:
            raise WeightsMismatchError(
                f"{path}: not a torchvision mobilenet_v3_large state dict of this configuration (width_mult "
                f"{self._arch['width_mult']}, reduced_tail {self._arch['reduced_tail']}): shapes differ {bad[:3]}, "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        body.load_state_dict(state)

    def class_predictor_prefixes(self) -> Tuple[str, ...]:
        return tuple(f"head.classification_head.module_list.{i}.1." for i in range(LEVELS))

    def head_convs(self) -> Dict[str, object]:
        return {"cls_logits": self.head_predictors[:LEVELS], "bbox_regression": self.head_predictors[LEVELS:]}

    def init_parts(self) -> list:
        """--init state dicts: a torchvision MobileNetV3-Large (`features.*`, ImageNet or robust; `classifier`
        ignored; the full tail needs `reduced_tail: false`), a torchvision SSDlite320 (another class count
        re-initialises the class predictors), or this wrapper."""
        from ..initial_weights import InitPart

        tail = "reduced tail" if self._arch["reduced_tail"] else "full tail"
        return [InitPart("backbone", self._body, f"a torchvision mobilenet_v3_large state dict ({tail}, width "
                                                 f"{self._arch['width_mult']:g})",
                         "the MobileNetV3-Large body; the extra blocks and the heads keep their initialisation",
                         file_extra=("classifier.",)),
                InitPart("detector", self.detector, f"a torchvision {self.model_name} state dict",
                         "the whole detector", reinit=self.class_predictor_prefixes()),
                *Detector.init_parts(self)]

    def input_normalization(self):
        return list(SSD_MEAN), list(SSD_STD)

    def resized_size(self, h: int, w: int) -> Tuple[int, int]:
        return self.size, self.size  # torchvision's fixed_size

    # -- the network

    def _network(self, images, x):
        feats = self.detector.backbone(x)
        mid = feats["1"]  # the end of the MobileNetV3 body
        feats = list(feats.values())
        return mid, self.detector.head(feats), [(int(f.shape[-2]), int(f.shape[-1])) for f in feats]

    def features(self, images):
        x, _, _ = self._prep(images)
        for block in self.detector.backbone.features:
            x = block(x)
        return x

    def _match(self, anchors: torch.Tensor, target: dict) -> torch.Tensor:
        """torchvision's SSD assignment (its `SSDMatcher` on the IoU matrix; no object: every anchor background)."""
        if target["boxes"].numel() == 0:
            return torch.full((anchors.size(0),), -1, dtype=torch.int64, device=anchors.device)
        return self.detector.proposal_matcher(box_ops.box_iou(target["boxes"], anchors))

    def _matches(self, p):
        return [self._match(p.anchors, t) for t in p.targets]

    def _tv_loss(self, p, targets, head, n):
        return self.detector.compute_loss(targets, head, [p.anchors] * n, [self._match(p.anchors, t) for t in targets])

    def _decode(self, reg, anchors):
        return self.detector.box_coder.decode_single(reg, anchors)

    def _class_scores(self, head):
        return F.softmax(head["cls_logits"], dim=-1)[..., 1:]

    def _anchor_losses(self, p, i, pos, gt, matched):
        """Per positive anchor: softmax cross-entropy against its object's class + Smooth-L1 of its box encoding,
        the terms torchvision's loss sums over the positives (the mined negatives belong to no object)."""
        target = self.detector.box_coder.encode_single(gt["boxes"][matched], p.anchors[pos])
        box = F.smooth_l1_loss(p.head["bbox_regression"][i, pos], target, reduction="none").sum(-1)
        return F.cross_entropy(p.head["cls_logits"][i, pos], gt["labels"][matched], reduction="none") + box

    def _object_logit(self, head):
        """SSD has no objectness: the logit of "not background", logsumexp(foreground logits) - background logit
        (its sigmoid is 1 - P(background), the sum of the anchor's class probabilities)."""
        cls = head["cls_logits"]
        return torch.logsumexp(cls[..., 1:], -1) - cls[..., 0]

    def output_slots(self, images):
        """Every default box: its decoded box (input pixels, differentiable), "obj" the not-background logit, "cls"
        the foreground logits under a softmax: sigmoid(obj) x softmax(cls) is torchvision's class probability."""
        slots = super().output_slots(images)
        return {**slots, "cls_activation": "softmax"}

    def _slot_logits(self, head):
        return self._object_logit(head), head["cls_logits"][..., 1:]

    def level_sizes(self, anchors: int):
        raise NotImplementedError  # SSD's top-k runs over every anchor, not per level

    def postprocess(self, raw, conf_thres: float = 0.0, with_class_scores: bool = False, **kw):
        """Shared by every backend: raw [N, A, 4 + C] (torch or numpy) -> per-image detections, as torchvision's SSD
        `postprocess_detections`: per class, scores above `score_thresh` and the `topk_candidates` best over all
        anchors; batched NMS at `nms_thresh`; the first `detections_per_img`; then scores above `conf_thres`."""
        d = self.detector
        pred = torch.as_tensor(raw[0] if isinstance(raw, (list, tuple)) else raw)
        pred = pred if pred.dtype == torch.float64 else pred.float()
        if pred.dim() != 3 or pred.shape[2] != 4 + self.num_classes:
            raise ValueError(f"{self.model_name}: raw output of shape {tuple(pred.shape)}, expected [N, anchors, "
                             f"{4 + self.num_classes}] (4 box values + {self.num_classes} class scores)")
        out = []
        for p in pred:
            boxes, scores, labels, rows = [], [], [], []
            for c in range(self.num_classes):
                keep = torch.where(p[:, 4 + c] > d.score_thresh)[0]
                sc, idx = p[keep, 4 + c].topk(min(int(d.topk_candidates), len(keep)))
                rows.append(keep[idx])
                scores.append(sc)
                labels.append(torch.full_like(idx, c))
            rows, scores, labels = (torch.cat(v) for v in (rows, scores, labels))
            boxes = p[rows, :4]
            keep = box_ops.batched_nms(boxes, scores, labels, d.nms_thresh)[:self.max_detections]
            keep = keep[scores[keep] > conf_thres]
            det = {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
            if with_class_scores:
                det["class_scores"] = p[rows[keep], 4:]
            out.append(det)
        return out


ONE_STAGE[SSDLite320.model_name] = SSDLite320  # the twins' model classes by name


@register_model("ssdlite320_mobilenet_v3_large")
def ssdlite320_mobilenet_v3_large(num_classes: int = 90, **kw) -> SSDLite320:
    return SSDLite320(num_classes, **kw)
