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
import warnings
from collections import OrderedDict
from typing import Callable, Optional, Sequence

import numpy as np

import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.rpn import concat_box_prediction_layers
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


class WeightsMismatchError(ValueError):
    """A local weights file that is not the torchvision state dict the option asks for."""


def _load_state(path: str, what: str, expected: str) -> None:
    if not os.path.isfile(path):
        raise WeightsFileError(f"{path}: {what} not found (nothing is downloaded: place torchvision's "
                               f"{expected} there, or leave the option unset)")


def read_torchvision_state(path: str, what: str, expected: str, flag: str = "model.weights") -> dict:
    """A local torchvision state dict, read safely (`initial_weights.read_weights`, published prefixes stripped);
    a fa-train checkpoint is refused naming --init, the way to continue from one."""
    from ..initial_weights import read_weights, state_dict_of

    _load_state(path, what, expected)
    obj = read_weights(path, flag)
    if isinstance(obj, dict) and isinstance(obj.get("arch"), dict):
        raise WeightsMismatchError(f"{path}: a fa-train checkpoint of {obj['arch'].get('name')}, not torchvision's "
                                   f"{expected}: continue from it with --init (same detector) instead")
    return state_dict_of(obj, path, flag)[0]


def _body_part(body, name: str):
    from ..initial_weights import InitPart

    return InitPart("backbone", body, f"a torchvision {name} state dict (ResNet layout, ImageNet or robust ImageNet)",
                    f"the {name} body (conv1 to layer4); the FPN, the RPN and the RoI heads keep their initialisation",
                    file_extra=("fc.",))


def torchvision_options(model_name: str, options: dict) -> dict:
    """Keyword options passed on to torchvision's detector class (`box_score_thresh`, `score_thresh`, `nms_thresh`,
    `detections_per_img`, ...), kept in the model's `arch_config` so that a checkpoint rebuilds the model it was
    trained as; only plain values can be stored, anything else is refused naming the option."""
    bad = sorted(k for k, v in options.items() if not isinstance(v, (bool, int, float, str)))
    if bad:
        raise ValueError(f"{model_name}: model options {bad} are not plain numbers or strings; a checkpoint stores a "
                         f"model's options, so only such values can be given")
    return dict(options)


def build_backbone(name: str, trainable_layers: int, fpn_channels: int, weights_backbone: Optional[str],
                   returned_layers: Sequence[int] = (1, 2, 3, 4), extra_blocks: Optional[nn.Module] = None):
    """torchvision's ResNet with FrozenBatchNorm2d and torchvision's BackboneWithFPN, as torchvision's
    `_resnet_fpn_extractor` makes it: the FPN over `returned_layers` (named "0", "1", ... in that order) plus
    `extra_blocks` (default: layers 1-4 + max-pool, Faster R-CNN's; RetinaNet and FCOS take layers 2-4 + P6/P7).
    `weights_backbone`: a local torchvision ResNet state dict (read as --init reads one: prefixes stripped)."""
    if name not in BACKBONES:
        raise ValueError(f"backbone {name!r}: expected one of {BACKBONES}")
    resnet = torchvision.models.__dict__[name](weights=None, norm_layer=misc_nn_ops.FrozenBatchNorm2d)
    # which stages train, as torchvision's _resnet_fpn_extractor does
    layers = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers.append("bn1")
    for pname, p in resnet.named_parameters():
        if all(not pname.startswith(layer) for layer in layers):
            p.requires_grad_(False)
    c = resnet.inplanes // 8  # layer1 channels (256 for ResNet-50, 64 for ResNet-18)
    in_channels = [c * 2 ** (k - 1) for k in returned_layers]
    fpn = BackboneWithFPN(resnet, {f"layer{k}": str(i) for i, k in enumerate(returned_layers)}, in_channels,
                          fpn_channels, extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks)
    if weights_backbone:
        from ..initial_weights import load_weights_file

        _load_state(weights_backbone, f"ImageNet {name} weights", f"{name} ImageNet checkpoint (.pth)")
        load_weights_file(None, weights_backbone, "model.weights_backbone", [_body_part(fpn.body, name)])
    return fpn


@contextlib.contextmanager
def _branch(detector: FasterRCNN, training: bool):
    """RPN, RoI heads and transform in their training branch (losses, proposal sampling) or their inference branch
    (test-time proposal counts, no resize jitter), whatever mode the detector is in; BN is frozen anyway."""
    mods = [detector.transform, detector.rpn, detector.roi_heads]
    modes = [m.training for m in mods]
    try:
        for m in mods:
            m.training = training
        yield
    finally:
        for m, was in zip(mods, modes):
            m.training = was


def _loss_mode(detector: FasterRCNN):
    return _branch(detector, True)


def _eval_branch(detector: FasterRCNN):
    return _branch(detector, False)


class SeededSampler:
    """torchvision's balanced positive/negative sampler (same counts, same uniform choice) drawing from a generator
    seeded afresh for every image: which anchors and proposals an image's loss uses depends on that image alone,
    never on the batch it is in or on the global RNG. Used by the attacks' losses; training keeps torchvision's."""

    def __init__(self, base, seed: int = 0):
        self.batch_size_per_image, self.positive_fraction = base.batch_size_per_image, base.positive_fraction
        self.seed = seed

    def __call__(self, matched_idxs):
        pos_idx, neg_idx = [], []
        for m in matched_idxs:
            g = torch.Generator().manual_seed(self.seed)
            positive = torch.where(m >= 1)[0]
            negative = torch.where(m == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            perm1 = torch.randperm(positive.numel(), generator=g)[:num_pos].to(m.device)
            perm2 = torch.randperm(negative.numel(), generator=g)[:num_neg].to(m.device)
            pos_mask = torch.zeros_like(m, dtype=torch.uint8)
            neg_mask = torch.zeros_like(m, dtype=torch.uint8)
            pos_mask[positive[perm1]] = 1
            neg_mask[negative[perm2]] = 1
            pos_idx.append(pos_mask)
            neg_idx.append(neg_mask)
        return pos_idx, neg_idx


@contextlib.contextmanager
def _seeded_sampling(detector: FasterRCNN, seed: int = 0):
    rpn, roi = detector.rpn, detector.roi_heads
    old = rpn.fg_bg_sampler, roi.fg_bg_sampler
    try:
        rpn.fg_bg_sampler, roi.fg_bg_sampler = SeededSampler(old[0], seed), SeededSampler(old[1], seed)
        yield
    finally:
        rpn.fg_bg_sampler, roi.fg_bg_sampler = old


class FasterRCNNFPN(Detector):
    model_name = "fasterrcnn_resnet50_fpn"
    loss_domains = {"cls": ("loss_objectness", "loss_classifier"), "loc": ("loss_rpn_box_reg", "loss_box_reg")}
    default_alignment_weight = 1.0  # beta and gamma of equation (3) for Faster R-CNN in the paper
    mid_stride = 32

    def __init__(self, num_classes: int, backbone: str = "resnet50", fpn_channels: int = 256, min_size: int = 800,
                 max_size: int = 1333, trainable_layers: int = 3, weights: Optional[str] = None,
                 weights_backbone: Optional[str] = None, **frcnn_kw):
        super().__init__(num_classes)
        self._set_arch({"backbone": backbone, "fpn_channels": fpn_channels, "min_size": min_size,
                        "max_size": max_size, "trainable_layers": trainable_layers},
                       torchvision_options(self.model_name, frcnn_kw))
        body = build_backbone(backbone, trainable_layers, fpn_channels, None)
        self.detector = FasterRCNN(body, num_classes=num_classes + 1, min_size=min_size, max_size=max_size,
                                   image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, **frcnn_kw)
        self.mid_channels = body.body.layer4[-1].conv1.in_channels  # 2048 for ResNet-50
        if weights_backbone:  # loaded here rather than in build_backbone: the messages name the model
            from ..initial_weights import load_weights_file

            _load_state(weights_backbone, f"ImageNet {backbone} weights", f"{backbone} ImageNet checkpoint (.pth)")
            report = load_weights_file(self, weights_backbone, "model.weights_backbone", [self.init_parts()[0]])
            for note in report.notes:  # no log here: a warning, never silent
                warnings.warn(f"model.weights_backbone: {note}", stacklevel=2)
        if weights:
            self.load_torchvision_detector(weights)

    def load_torchvision_detector(self, path: str) -> None:
        """A torchvision Faster R-CNN checkpoint (e.g. COCO); a different class count re-initialises only the
        box predictor."""
        from ..initial_weights import load_weights_file

        _load_state(path, "Faster R-CNN checkpoint", "fasterrcnn_resnet50_fpn COCO checkpoint (.pth)")
        load_weights_file(self, path, "model.weights", [self.init_parts()[1]])

    def arch_config(self) -> dict:
        return {"name": self.model_name, "num_classes": self.num_classes, **self._arch}

    def init_parts(self) -> list:
        """--init state dicts: the ResNet body (torchvision's ResNet layout, the ImageNet classifier `fc` ignored),
        a torchvision Faster R-CNN (another class count re-initialises the box predictor), or this wrapper."""
        from ..initial_weights import InitPart

        name = self._arch["backbone"]
        return [_body_part(self.detector.backbone.body, name),
                InitPart("detector", self.detector, f"a torchvision Faster R-CNN state dict ({name} FPN)",
                         "the whole detector", reinit=("roi_heads.box_predictor.",)),
                *super().init_parts()]

    def input_normalization(self):
        return list(self.detector.transform.image_mean), list(self.detector.transform.image_std)

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

    # -- the attacks' view (Detector contract): per-image losses with seeded sampling, object losses, objectness

    def _attack_pass(self, images, targets):
        """One forward of `forward_train`'s training branch with per-image bookkeeping: per image, the RPN's and
        the RoI head's sampled outputs, their labels, regression targets and matched objects. Sampling is
        `SeededSampler`'s, so each image's terms depend on that image alone."""
        d = self.detector
        rpn, roi = d.rpn, d.roi_heads
        tv_targets = self._tv_targets(targets)
        kept = [torch.where(~t["ignore"].bool())[0] if "ignore" in t else torch.arange(len(t["boxes"]))
                for t in targets]  # index of each torchvision target in the caller's targets
        with _loss_mode(d), _seeded_sampling(d):
            image_list, tv_targets = d.transform(list(images), tv_targets)
            feats = d.backbone(image_list.tensors)
            levels = list(feats.values())
            objectness, deltas = rpn.head(levels)
            anchors = rpn.anchor_generator(image_list, levels)
            n = len(anchors)
            per_level = [o[0].numel() for o in objectness]
            objectness, deltas = concat_box_prediction_layers(objectness, deltas)
            proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(n, -1, 4)
            boxes, _ = rpn.filter_proposals(proposals, objectness, image_list.image_sizes, per_level)
            rpn_parts = []
            objectness, deltas = objectness.view(n, -1), deltas.view(n, -1, 4)
            for i, (a, t) in enumerate(zip(anchors, tv_targets)):
                if t["boxes"].numel():
                    matched = rpn.proposal_matcher(rpn.box_similarity(t["boxes"], a))
                else:
                    matched = torch.full((len(a),), -1, dtype=torch.int64, device=a.device)
                labels, matched_boxes = rpn.assign_targets_to_anchors([a], [t])
                reg = rpn.box_coder.encode(matched_boxes, [a])[0]
                pos, neg = rpn.fg_bg_sampler(labels)
                pos, neg = torch.where(pos[0])[0], torch.where(neg[0])[0]
                rpn_parts.append({"logits": objectness[i], "deltas": deltas[i], "labels": labels[0], "reg": reg,
                                  "pos": pos, "sampled": torch.cat([pos, neg]), "obj": kept[i].to(a.device)[
                                      matched[pos].clamp(min=0)] if len(kept[i]) else matched[pos]})
            props, matched_idxs, labels, reg_targets = roi.select_training_samples(boxes, tv_targets)
            feats_roi = roi.box_head(roi.box_roi_pool(feats, props, image_list.image_sizes))
            class_logits, box_reg = roi.box_predictor(feats_roi)
        sizes = [len(p) for p in props]
        roi_parts = []
        for i, (cl, br) in enumerate(zip(class_logits.split(sizes), box_reg.split(sizes))):
            pos = torch.where(labels[i] > 0)[0]
            roi_parts.append({"class_logits": cl, "box_reg": br, "labels": labels[i], "reg": reg_targets[i],
                              "pos": pos, "obj": kept[i].to(cl.device)[matched_idxs[i][pos]] if len(kept[i])
                              else matched_idxs[i][pos]})
        return rpn_parts, roi_parts

    def loss_terms_per_image(self, images, targets):
        """torchvision's four loss terms of each image as torchvision computes them for a batch of that image
        alone, the RPN's 256 anchors and the RoI head's 512 proposals sampled by `SeededSampler`."""
        rpn_parts, roi_parts = self._attack_pass(images, targets)
        terms = {"loss_objectness": [], "loss_rpn_box_reg": [], "loss_classifier": [], "loss_box_reg": []}
        for r, h in zip(rpn_parts, roi_parts):
            s, pos = r["sampled"], r["pos"]
            terms["loss_objectness"].append(F.binary_cross_entropy_with_logits(r["logits"][s], r["labels"][s]))
            terms["loss_rpn_box_reg"].append(F.smooth_l1_loss(r["deltas"][pos], r["reg"][pos], beta=1 / 9,
                                                              reduction="sum") / s.numel())
            cls_loss, box_loss = fastrcnn_loss(h["class_logits"], h["box_reg"], [h["labels"]], [h["reg"]])
            terms["loss_classifier"].append(cls_loss)
            terms["loss_box_reg"].append(box_loss)
        return {k: torch.stack(v) for k, v in terms.items()}

    def object_losses(self, images, targets):
        """Per object: the mean over its sampled positive proposals of cross-entropy + smooth-L1 box loss, plus the
        mean over its sampled positive anchors of objectness BCE + smooth-L1; NaN for ignored objects."""
        rpn_parts, roi_parts = self._attack_pass(images, targets)
        out = []
        for t, r, h in zip(targets, rpn_parts, roi_parts):
            m = len(t["boxes"])
            dtype = h["class_logits"].dtype
            total = h["class_logits"].new_zeros(m)
            seen = torch.zeros(m, dtype=torch.bool, device=total.device)
            pos = r["pos"]
            if len(pos):
                a = F.binary_cross_entropy_with_logits(r["logits"][pos], r["labels"][pos], reduction="none") + \
                    F.smooth_l1_loss(r["deltas"][pos], r["reg"][pos], beta=1 / 9, reduction="none").sum(1)
                total = total + _mean_by(a, r["obj"], m)
                seen[r["obj"]] = True
            pos = h["pos"]
            if len(pos):
                lab = h["labels"][pos]
                deltas = h["box_reg"].reshape(len(h["box_reg"]), -1, 4)[pos, lab]
                b = F.cross_entropy(h["class_logits"][pos], lab, reduction="none") + \
                    F.smooth_l1_loss(deltas, h["reg"][pos], beta=1 / 9, reduction="none").sum(1)
                total = total + _mean_by(b, h["obj"], m)
                seen[h["obj"]] = True
            out.append(torch.where(seen, total, torch.full_like(total, float("nan"))).to(dtype))
        return out

    def _inference_heads(self, images):
        """The inference branch up to the RoI head's logits, differentiable in the images: RPN objectness of every
        anchor [N, A], the proposals (transformed pixels) and their class logits [sum R_i, K + 1]."""
        d = self.detector
        with _eval_branch(d):
            image_list, _ = d.transform(list(images))
            feats = d.backbone(image_list.tensors)
            levels = list(feats.values())
            objectness, deltas = d.rpn.head(levels)
            anchors = d.rpn.anchor_generator(image_list, levels)
            n = len(anchors)
            per_level = [o[0].numel() for o in objectness]
            objectness, deltas = concat_box_prediction_layers(objectness, deltas)
            proposals = d.rpn.box_coder.decode(deltas.detach(), anchors).view(n, -1, 4)
            boxes, _ = d.rpn.filter_proposals(proposals, objectness, image_list.image_sizes, per_level)
            roi = d.roi_heads
            logits, _ = roi.box_predictor(roi.box_head(roi.box_roi_pool(feats, boxes, image_list.image_sizes)))
        return objectness.view(n, -1), boxes, logits, image_list.image_sizes

    @staticmethod
    def _pad(parts, n, fill=0.0):
        """Per-image tensors [R_i, ...] -> [N, max R_i, ...] and the [N, max R_i] mask of real rows."""
        r = max([len(p) for p in parts] + [1])
        out = parts[0].new_full((n, r, *parts[0].shape[1:]), fill) if parts else None
        mask = torch.zeros(n, r, dtype=torch.bool, device=out.device)
        for i, p in enumerate(parts):
            out[i, :len(p)] = p
            mask[i, :len(p)] = True
        return out, mask

    def objectness_logits(self, images):
        """{"rpn": ([N, anchors] RPN objectness logits, None), "roi": ([N, R] log-odds that each of the inference
        proposals is not background, logsumexp(class logits) - background logit, valid-proposal mask)}: TOG's two
        stages (the RoI head classifies up to 1000 proposals per image whatever their objectness, so vanishing and
        fabrication must act on both)."""
        rpn, boxes, logits, _ = self._inference_heads(images)
        fg = torch.logsumexp(logits[:, 1:], 1) - logits[:, 0]
        padded, mask = self._pad(list(fg.split([len(b) for b in boxes])), len(boxes))
        return {"rpn": (rpn, None), "roi": (padded, mask)}

    def output_slots(self, images):
        """Every inference proposal: its box (input pixels; proposals carry no gradient in torchvision),
        not-background log-odds, foreground class logits (a softmax over classes given an object). The proposals
        are ranked anew for every input, so a slot index names no fixed output (`fixed`: False): an attack follows
        a detection by its box (TogMislabel re-matches by IoU at every step)."""
        _, boxes, logits, sizes = self._inference_heads(images)
        n = len(boxes)
        scaled = []
        for b, (h, w) in zip(boxes, sizes):
            s = torch.tensor([images.shape[-1] / w, images.shape[-2] / h] * 2, device=b.device, dtype=b.dtype)
            scaled.append(b.detach() * s)
        split = logits.split([len(b) for b in boxes])
        obj, valid = self._pad([torch.logsumexp(x[:, 1:], 1) - x[:, 0] for x in split], n)
        cls, _ = self._pad([x[:, 1:] for x in split], n)
        box, _ = self._pad(scaled, n)
        # "fixed": False: slot k is the k-th proposal of this very input, not the same output for another input
        return {"boxes": box, "obj": obj, "cls": cls, "valid": valid, "cls_activation": "softmax", "fixed": False}

    @torch.no_grad()
    def _class_scores(self, images, boxes):
        """[K_i, C] class probabilities of given boxes (input pixels) through the RoI head (background dropped)."""
        d = self.detector
        with _eval_branch(d):
            image_list, _ = d.transform(list(images))
            scaled = []
            for b, (h, w) in zip(boxes, image_list.image_sizes):
                s = torch.tensor([w / images.shape[-1], h / images.shape[-2]] * 2, device=b.device, dtype=b.dtype)
                scaled.append(b * s)
            feats = d.backbone(image_list.tensors)
            roi = d.roi_heads
            logits, _ = roi.box_predictor(roi.box_head(roi.box_roi_pool(feats, scaled, image_list.image_sizes)))
        return list(logits.softmax(-1)[:, 1:].split([len(b) for b in boxes]))

    @torch.no_grad()
    def predict(self, images, **kw):
        was = self.detector.training
        self.detector.eval()
        try:
            out = self.detector(list(images))
        finally:
            self.detector.train(was)
        dets = [{"boxes": o["boxes"], "scores": o["scores"], "labels": o["labels"] - 1} for o in out]
        if kw.get("with_class_scores"):
            for det, cs in zip(dets, self._class_scores(images, [d_["boxes"] for d_ in dets])):
                det["class_scores"] = cs
        return dets

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


def _mean_by(values: torch.Tensor, index: torch.Tensor, m: int) -> torch.Tensor:
    """[m]: the mean of `values` per `index` (0 where an index has none)."""
    total = values.new_zeros(m).index_add(0, index, values)
    count = values.new_zeros(m).index_add(0, index, torch.ones_like(values))
    return total / count.clamp(min=1)


@register_model("fasterrcnn_resnet50_fpn")
def fasterrcnn_resnet50_fpn(num_classes: int = 91, **kw) -> FasterRCNNFPN:
    return FasterRCNNFPN(num_classes, **kw)
