"""YOLOv3 on Darknet-53, layer for layer as in Darknet's yolov3.cfg / yolov3-voc.cfg at multipliers 1.0.

Order: config, blocks, backbone, neck/heads, loss, model class, builder. The convolutions are created in
Darknet's order (`darknet_convs()`), which is what `.weights` files are read and written in.
The M-th layer of the paper is the output of the last Darknet-53 stage (cfg layer 74, 1024 channels, stride 32).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ..distributed import normalizer
from . import register_model
from .base import Detector, Targets, classwise_nms

# ---------------------------------------------------------------------------------------------- config

DARKNET53_STAGES = ((64, 1), (128, 2), (256, 8), (512, 8), (1024, 4))  # (channels, residual blocks)
YOLOV3_ANCHORS = ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326))
YOLOV3_MASKS = ((6, 7, 8), (3, 4, 5), (0, 1, 2))  # stride 32, 16, 8 (cfg order of the [yolo] layers)
INPUT_MEAN = (0.0, 0.0, 0.0)  # Darknet feeds raw [0,1] pixels; kept as buffers so other weights can differ
INPUT_STD = (1.0, 1.0, 1.0)


@dataclass
class YoloLossConfig:
    """Loss gains and matching threshold of the paper's code base (ultralytics/yolov3 of 2019)."""

    giou_gain: float = 1.582
    cls_gain: float = 27.76
    obj_gain: float = 21.35
    iou_t: float = 0.2635  # anchor-target wh IoU needed for a positive
    obj_balance: Tuple[float, float, float] = (1.0, 1.0, 1.0)  # per scale (stride 32, 16, 8)


@dataclass
class YoloConfig:
    num_classes: int = 80
    width_mult: float = 1.0
    depth_mult: float = 1.0
    anchors: Tuple[Tuple[float, float], ...] = YOLOV3_ANCHORS
    masks: Tuple[Tuple[int, ...], ...] = YOLOV3_MASKS
    loss: YoloLossConfig = field(default_factory=YoloLossConfig)


def scale_channels(c: int, width_mult: float) -> int:
    if width_mult == 1.0:
        return c
    return max(8, int(round(c * width_mult / 8.0)) * 8)


def scale_depth(n: int, depth_mult: float) -> int:
    return n if depth_mult == 1.0 else max(1, int(round(n * depth_mult)))


# ---------------------------------------------------------------------------------------------- blocks


class ConvBNAct(nn.Module):
    """Darknet `[convolutional] batch_normalize=1 activation=leaky`: conv (no bias), BN, LeakyReLU(0.1)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.LeakyReLU(0.1, inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    """Darknet residual: 1x1 to half the channels, 3x3 back, `[shortcut] from=-3`."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = ConvBNAct(c, c // 2, 1)
        self.conv2 = ConvBNAct(c // 2, c, 3)

    def forward(self, x):
        return x + self.conv2(self.conv1(x))


class Stage(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int):
        super().__init__()
        self.down = ConvBNAct(cin, cout, 3, stride=2)
        self.blocks = nn.Sequential(*[Residual(cout) for _ in range(blocks)])

    def forward(self, x):
        return self.blocks(self.down(x))


# ---------------------------------------------------------------------------------------------- backbone


class Darknet53(nn.Module):
    """Darknet-53 without its classifier. Returns the stride 8, 16 and 32 stage outputs."""

    def __init__(self, width_mult: float = 1.0, depth_mult: float = 1.0):
        super().__init__()
        c0 = scale_channels(32, width_mult)
        self.stem = ConvBNAct(3, c0, 3)
        stages, cin = [], c0
        for c, n in DARKNET53_STAGES:
            cout = scale_channels(c, width_mult)
            stages.append(Stage(cin, cout, scale_depth(n, depth_mult)))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.out_channels = [scale_channels(c, width_mult) for c, _ in DARKNET53_STAGES[2:]]

    def forward(self, x) -> List[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= 2:
                outs.append(x)
        return outs  # [stride 8, stride 16, stride 32]


# ---------------------------------------------------------------------------------------------- neck + heads


class YoloBranch(nn.Module):
    """Five alternating 1x1/3x3 convolutions, then a 3x3 and the linear 1x1 prediction conv (with bias)."""

    def __init__(self, cin: int, c: int, out: int):
        super().__init__()
        self.convs = nn.Sequential(
            ConvBNAct(cin, c, 1), ConvBNAct(c, 2 * c, 3), ConvBNAct(2 * c, c, 1),
            ConvBNAct(c, 2 * c, 3), ConvBNAct(2 * c, c, 1),
        )
        self.head = ConvBNAct(c, 2 * c, 3)
        self.pred = nn.Conv2d(2 * c, out, 1, bias=True)

    def forward(self, x):
        route = self.convs(x)
        return route, self.pred(self.head(route))


class YoloV3(Detector):
    model_name = "yolov3"
    loss_domains = {"cls": ("obj", "cls"), "loc": ("box",)}
    default_alignment_weight = 10.0  # beta and gamma of equation (3) for YOLOv3 in the paper
    # layers whose outputs, and everything after them (the box decode), stay float32 in fp16/int8 exports
    export_keep_float32 = ("branch32.pred", "branch16.pred", "branch8.pred")

    def __init__(self, cfg: YoloConfig):
        super().__init__(cfg.num_classes)
        self.cfg = cfg
        w, d = cfg.width_mult, cfg.depth_mult
        self.backbone = Darknet53(w, d)
        c8, c16, c32 = self.backbone.out_channels
        na = len(cfg.masks[0])
        out = na * (5 + cfg.num_classes)
        h32, h16, h8 = scale_channels(512, w), scale_channels(256, w), scale_channels(128, w)
        self.branch32 = YoloBranch(c32, h32, out)
        self.lateral32 = ConvBNAct(h32, h16, 1)
        self.branch16 = YoloBranch(h16 + c16, h16, out)
        self.lateral16 = ConvBNAct(h16, h8, 1)
        self.branch8 = YoloBranch(h8 + c8, h8, out)
        self.strides = (32, 16, 8)
        anchors = torch.tensor(cfg.anchors, dtype=torch.float32)
        self.register_buffer("anchors", torch.stack([anchors[list(m)] for m in cfg.masks]), persistent=False)
        self.register_buffer("mean", torch.tensor(INPUT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(INPUT_STD).view(1, 3, 1, 1), persistent=False)
        self.mid_channels = c32
        self.mid_stride = 32
        self._init_weights()

    # -- weight init: prediction biases as in ultralytics (objectness prior ~0.01, class prior 1/nc)
    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps, m.momentum = 1e-5, 0.03
        for branch, s in ((self.branch32, 32), (self.branch8, 8), (self.branch16, 16)):
            b = branch.pred.bias.detach().view(len(self.cfg.masks[0]), -1)
            b[:, 4].fill_(math.log(8 / (640 / s) ** 2))
            b[:, 5:].fill_(math.log(0.6 / (self.num_classes - 0.99)))

    def darknet_convs(self) -> List[Tuple[nn.Conv2d, Optional[nn.BatchNorm2d]]]:
        """(conv, bn) pairs in the order of the cfg file (and so of a `.weights` file)."""
        convs = []

        def add(m):
            for mod in m.modules():
                if isinstance(mod, ConvBNAct):
                    convs.append((mod.conv, mod.bn))
                elif isinstance(mod, nn.Conv2d) and not any(mod is c for c, _ in convs):
                    convs.append((mod, None))

        add(self.backbone)
        for part in (self.branch32, self.lateral32, self.branch16, self.lateral16, self.branch8):
            add(part)
        return convs

    @property
    def num_backbone_convs(self) -> int:
        return sum(1 for m in self.backbone.modules() if isinstance(m, nn.Conv2d))

    def arch_config(self) -> dict:
        return {"name": self.model_name, "num_classes": self.num_classes,
                "width_mult": self.cfg.width_mult, "depth_mult": self.cfg.depth_mult}

    def init_parts(self) -> list:
        from ..initial_weights import InitPart

        return [InitPart("backbone", self.backbone, "a Darknet-53 state dict in fa-train's layout (stem.*, stages.*)",
                         "the Darknet-53 backbone; the neck and the YOLO heads keep their initialisation"),
                *super().init_parts()]

    def input_normalization(self):
        return self.mean.flatten().tolist(), self.std.flatten().tolist()

    # -- forward pieces
    def _normalize(self, images):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N,3,H,W] float RGB in [0,1], got shape {tuple(images.shape)}")
        if images.shape[-1] % 32 or images.shape[-2] % 32:
            raise ValueError(f"image size must be a multiple of 32, got {tuple(images.shape[-2:])}")
        return (images - self.mean) / self.std

    def _heads(self, images):
        f8, f16, f32 = self.backbone(self._normalize(images))
        r32, p32 = self.branch32(f32)
        x = F.interpolate(self.lateral32(r32), scale_factor=2.0, mode="nearest")
        r16, p16 = self.branch16(torch.cat([x, f16], 1))
        x = F.interpolate(self.lateral16(r16), scale_factor=2.0, mode="nearest")
        _, p8 = self.branch8(torch.cat([x, f8], 1))
        return [p32, p16, p8], f32

    def features(self, images):
        return self.backbone(self._normalize(images))[-1]

    def forward_train(self, images, targets: Targets):
        preds, mid = self._heads(images)
        return yolo_loss(preds, targets, self.anchors, self.strides, self.num_classes, self.cfg.loss), mid

    def loss_terms_per_image(self, images, targets) -> Dict[str, torch.Tensor]:
        """`forward_train`'s terms, [N] each, every image with its own normalisers, from one batched forward.
        Equal to a forward of each image alone when BatchNorm is frozen (eval), as it is in attacks."""
        preds, _ = self._heads(images)
        return yolo_loss_per_image(preds, targets, self.anchors, self.strides, self.num_classes, self.cfg.loss)

    def per_image_losses(self, images, targets) -> torch.Tensor:
        """[N] total detection loss of each image (TOD's per-image choice)."""
        return sum(self.loss_terms_per_image(images, targets).values())

    def object_losses(self, images, targets) -> List[torch.Tensor]:
        preds, _ = self._heads(images)
        return yolo_object_losses(preds, targets, self.anchors, self.strides, self.num_classes, self.cfg.loss)

    def objectness_logits(self, images):
        """{"obj": ([N, A] objectness logit of every anchor at every cell of the three scales, None)}: the map
        TOG's YOLOv3 attacks act on."""
        preds, _ = self._heads(images)
        na = self.anchors.shape[1]
        obj = [p.view(p.shape[0], na, 5 + self.num_classes, *p.shape[-2:])[:, :, 4].flatten(1) for p in preds]
        return {"obj": (torch.cat(obj, 1), None)}

    def output_slots(self, images):
        """Every anchor at every cell of the three scales: decoded box, objectness logit, class logits."""
        preds, _ = self._heads(images)
        na, k = self.anchors.shape[1], 5 + self.num_classes
        raw = torch.cat([p.view(p.shape[0], na, k, *p.shape[-2:]).permute(0, 1, 3, 4, 2).reshape(p.shape[0], -1, k)
                         for p in preds], 1)
        boxes = torchvision.ops.box_convert(self.decode(preds)[..., :4], "cxcywh", "xyxy")
        return {"boxes": boxes, "obj": raw[..., 4], "cls": raw[..., 5:],
                "valid": torch.ones(raw.shape[:2], dtype=torch.bool, device=raw.device), "cls_activation": "sigmoid"}

    def decode(self, preds: Sequence[torch.Tensor]) -> torch.Tensor:
        """Raw head maps -> [N, A, 5 + C]: cx, cy, w, h (input pixels), objectness, class probabilities."""
        out = []
        na = self.anchors.shape[1]
        for p, anchors, s in zip(preds, self.anchors, self.strides):
            n, _, h, w = p.shape
            p = p.view(n, na, 5 + self.num_classes, h, w).permute(0, 1, 3, 4, 2)
            gy, gx = torch.meshgrid(torch.arange(h, device=p.device, dtype=p.dtype),
                                    torch.arange(w, device=p.device, dtype=p.dtype), indexing="ij")
            grid = torch.stack((gx, gy), -1).view(1, 1, h, w, 2)
            xy = (p[..., :2].sigmoid() + grid) * s
            wh = torch.exp(p[..., 2:4].clamp(max=10.0)) * anchors.to(p.dtype).view(1, na, 1, 1, 2)
            rest = p[..., 4:].sigmoid()
            out.append(torch.cat((xy, wh, rest), -1).reshape(n, -1, 5 + self.num_classes))
        return torch.cat(out, 1)

    def export_module(self) -> nn.Module:
        return _YoloExport(self)

    def postprocess(self, raw, conf_thres: float = 0.001, iou_thres: float = 0.6, max_det: int = 300,
                    pre_nms_topk: int = 3000, with_class_scores: bool = False):
        """Shared by every backend: raw [N, A, 5+C] (torch or numpy) -> per-image detections after NMS
        (`with_class_scores`: also each detection's class probabilities, "class_scores" [K, C])."""
        pred = raw[0] if isinstance(raw, (list, tuple)) else raw
        pred = torch.as_tensor(pred).float()
        return [classwise_nms(torchvision.ops.box_convert(p[:, :4], "cxcywh", "xyxy"), p[:, 4:5] * p[:, 5:],
                              conf_thres, iou_thres, max_det, pre_nms_topk, p[:, 5:] if with_class_scores else None)
                for p in pred]


class _YoloExport(nn.Module):
    """images [N,3,H,W] in [0,1] -> decoded predictions [N, A, 5+C]; no NMS (that is `postprocess`)."""

    def __init__(self, model: YoloV3):
        super().__init__()
        self.model = model

    def forward(self, images):
        preds, _ = self.model._heads(images)
        return self.model.decode(preds)


# ---------------------------------------------------------------------------------------------- loss


def build_targets(preds, targets: Targets, anchors: torch.Tensor, strides, iou_t: float):
    """Assign every ground-truth box to (scale, anchor, cell) positives.

    An anchor is positive when its wh IoU with the box exceeds `iou_t`; the best of all anchors is always
    positive so no box goes unmatched. Boxes flagged `ignore` (VOC difficult, COCO crowd) produce entries
    too, returned separately: they neither train the box/class terms nor count as background.
    """
    device = preds[0].device
    rows = []
    for b, t in enumerate(targets):
        boxes = t["boxes"].to(device, torch.float32)
        if boxes.numel() == 0:
            continue
        labels = t["labels"].to(device).float()
        ign = t.get("ignore")
        ign = torch.zeros(len(boxes), device=device) if ign is None else ign.to(device).float()
        cxcywh = torchvision.ops.box_convert(boxes, "xyxy", "cxcywh")
        local = torch.arange(len(boxes), device=device, dtype=torch.float32)
        rows.append(torch.cat([torch.full((len(boxes), 1), float(b), device=device), labels[:, None], cxcywh,
                               ign[:, None], local[:, None]], 1))
    if not rows:
        return [None] * len(preds)
    T = torch.cat(rows)  # [M, 8]: img, cls, cx, cy, w, h, ignore, index of the object in its image's targets
    all_anchors = anchors.view(-1, 2).to(device)
    wh = T[:, 4:6]
    inter = torch.min(wh[:, None], all_anchors[None]).prod(-1)
    iou = inter / (wh.prod(-1)[:, None] + all_anchors.prod(-1)[None] - inter)  # [M, 9]
    best = iou.argmax(1)
    na = anchors.shape[1]
    out = []
    for l, (p, s) in enumerate(zip(preds, strides)):
        h, w = p.shape[-2:]
        a_iou = iou[:, l * na:(l + 1) * na]
        pos = a_iou > iou_t
        pos |= (best[:, None] == torch.arange(l * na, (l + 1) * na, device=device)[None])
        ti, ai = pos.nonzero(as_tuple=True)
        t = T[ti]
        gxy = t[:, 2:4] / s
        gi = gxy[:, 0].long().clamp(0, w - 1)
        gj = gxy[:, 1].long().clamp(0, h - 1)
        out.append({
            "b": t[:, 0].long(), "a": ai, "gj": gj, "gi": gi, "cls": t[:, 1].long(),
            "tbox": torch.cat([gxy - torch.stack([gi, gj], 1).float(), t[:, 4:6] / s], 1),  # cell units
            "anchor": anchors[l].to(device)[ai] / s, "ignore": t[:, 6] > 0, "obj": t[:, 7].long(),
        })
    return out


def _level_terms(p, a, num_classes: int, na: int, dtype):
    """One output level against its assigned positives, unreduced: (objectness BCE x weight [n, na, h, w], the
    weights, and for the kept positives a dict: image `b`, object index `obj`, `giou` loss [P], class BCE `cls`
    [P, C] (None with one class), objectness BCE `obj_bce` [P]; None without positives)."""
    device = p.device
    n, _, h, w = p.shape
    p = p.to(dtype).view(n, na, 5 + num_classes, h, w).permute(0, 1, 3, 4, 2)
    tobj = torch.zeros(p.shape[:4], device=device, dtype=dtype)
    weight = torch.ones_like(tobj)
    pos = None
    if a is not None and len(a["b"]):
        ps = p[a["b"], a["a"], a["gj"], a["gi"]]
        keep = ~a["ignore"]
        # positives of ignored boxes: no loss at all on their cells, neither positive nor background
        weight[a["b"][~keep], a["a"][~keep], a["gj"][~keep], a["gi"][~keep]] = 0.0
        if keep.any():
            ps_k = ps[keep]
            pxy = ps_k[:, :2].sigmoid()
            pwh = torch.exp(ps_k[:, 2:4].clamp(max=10.0)) * a["anchor"][keep]
            pbox = torch.cat([pxy, pwh], 1)
            tbox = a["tbox"][keep]
            pb = torchvision.ops.box_convert(pbox, "cxcywh", "xyxy")
            tb = torchvision.ops.box_convert(tbox, "cxcywh", "xyxy")
            giou_loss = torchvision.ops.generalized_box_iou_loss(pb, tb, reduction="none")
            bk, ak, jk, ik = a["b"][keep], a["a"][keep], a["gj"][keep], a["gi"][keep]
            tobj[bk, ak, jk, ik] = (1.0 - giou_loss.detach()).clamp(0).to(dtype)
            weight[bk, ak, jk, ik] = 1.0
            cls = None
            if num_classes > 1:
                tcls = F.one_hot(a["cls"][keep], num_classes).to(dtype)
                cls = F.binary_cross_entropy_with_logits(ps_k[:, 5:], tcls, reduction="none")
            pos = {"b": bk, "obj": a["obj"][keep], "giou": giou_loss, "cls": cls, "logit": ps_k[:, 4],
                   "tobj": tobj[bk, ak, jk, ik]}
    bce = F.binary_cross_entropy_with_logits(p[..., 4], tobj, reduction="none")
    return bce * weight, weight, pos


def _loss_dtype(preds):
    # float32 at least (AMP runs the network in float16), float64 when the model is float64 (gradient checks)
    return torch.float64 if preds[0].dtype == torch.float64 else torch.float32


def yolo_loss(preds, targets: Targets, anchors, strides, num_classes: int, cfg: YoloLossConfig) -> Dict[str, torch.Tensor]:
    """GIoU box loss, BCE objectness (target = GIoU of the positive, clamped at 0) and BCE classification, with
    the batch's normalisers (training: global over ranks inside a distributed step)."""
    dtype = _loss_dtype(preds)
    device = preds[0].device
    zero = torch.zeros((), device=device, dtype=dtype)
    assigned = build_targets(preds, targets, anchors, strides, cfg.iou_t)
    na = anchors.shape[1]
    # per level: sums and their denominators (positives, positives x classes, weighted cells); the denominators
    # go through one `normalizer` call, global over ranks inside a distributed training step
    box_sums, cls_sums, obj_sums, counts = [], [], [], []
    for p, a in zip(preds, assigned):
        wbce, weight, pos = _level_terms(p, a, num_classes, na, dtype)
        box_sum, cls_sum, n_pos = zero, zero, zero
        if pos is not None:
            box_sum = pos["giou"].sum()
            n_pos = torch.tensor(float(len(pos["giou"])), device=device, dtype=dtype)
            if pos["cls"] is not None:
                cls_sum = pos["cls"].sum()
        box_sums.append(box_sum)
        cls_sums.append(cls_sum)
        obj_sums.append(wbce.sum())
        counts += [n_pos, n_pos * num_classes, weight.sum().detach()]
    denom = normalizer(torch.stack(counts)).view(-1, 3)
    lbox = sum(s / d for s, d in zip(box_sums, denom[:, 0].clamp(min=1e-12)))
    lcls = sum(s / d for s, d in zip(cls_sums, denom[:, 1].clamp(min=1e-12)))
    lobj = sum(cfg.obj_balance[l] * s / d for l, (s, d) in enumerate(zip(obj_sums, denom[:, 2].clamp(min=1.0))))
    return {"box": cfg.giou_gain * lbox, "obj": cfg.obj_gain * lobj, "cls": cfg.cls_gain * lcls}


def yolo_loss_per_image(preds, targets: Targets, anchors, strides, num_classes: int,
                        cfg: YoloLossConfig) -> Dict[str, torch.Tensor]:
    """The terms of `yolo_loss`, [N] each: image i's terms with image i's own normalisers, from one batched pass
    (what `yolo_loss` gives for image i alone, up to float summation order). The evaluation attacks' objective."""
    dtype = _loss_dtype(preds)
    n, device = preds[0].shape[0], preds[0].device
    assigned = build_targets(preds, targets, anchors, strides, cfg.iou_t)
    na = anchors.shape[1]
    lbox = torch.zeros(n, device=device, dtype=dtype)
    lcls, lobj = torch.zeros_like(lbox), torch.zeros_like(lbox)
    for l, (p, a) in enumerate(zip(preds, assigned)):
        wbce, weight, pos = _level_terms(p, a, num_classes, na, dtype)
        lobj = lobj + cfg.obj_balance[l] * wbce.sum((1, 2, 3)) / weight.sum((1, 2, 3)).detach().clamp(min=1.0)
        if pos is not None:
            n_pos = torch.zeros(n, device=device, dtype=dtype).index_add_(0, pos["b"], torch.ones_like(pos["giou"]))
            box = torch.zeros(n, device=device, dtype=dtype).index_add(0, pos["b"], pos["giou"])
            lbox = lbox + box / n_pos.clamp(min=1e-12)
            if pos["cls"] is not None:
                cls = torch.zeros(n, device=device, dtype=dtype).index_add(0, pos["b"], pos["cls"].sum(1))
                lcls = lcls + cls / (n_pos * num_classes).clamp(min=1e-12)
    return {"box": cfg.giou_gain * lbox, "obj": cfg.obj_gain * lobj, "cls": cfg.cls_gain * lcls}


def yolo_object_losses(preds, targets: Targets, anchors, strides, num_classes: int,
                       cfg: YoloLossConfig) -> List[torch.Tensor]:
    """Per image [M_i]: each object's loss, the mean over its positives of giou_gain x GIoU loss + cls_gain x mean
    class BCE + obj_gain x objectness BCE; NaN for ignored objects (they have no positives)."""
    dtype = _loss_dtype(preds)
    device = preds[0].device
    sizes = [len(t["boxes"]) for t in targets]
    offsets = torch.tensor([0] + sizes, device=device).cumsum(0)
    total = torch.zeros(int(offsets[-1]), device=device, dtype=dtype)
    count = torch.zeros_like(total)
    assigned = build_targets(preds, targets, anchors, strides, cfg.iou_t)
    na = anchors.shape[1]
    for p, a in zip(preds, assigned):
        _, _, pos = _level_terms(p, a, num_classes, na, dtype)
        if pos is None:
            continue
        loss = cfg.giou_gain * pos["giou"] + cfg.obj_gain * F.binary_cross_entropy_with_logits(
            pos["logit"], pos["tobj"], reduction="none")
        if pos["cls"] is not None:
            loss = loss + cfg.cls_gain * pos["cls"].mean(1)
        row = offsets[pos["b"]] + pos["obj"]
        total = total.index_add(0, row, loss)
        count = count.index_add(0, row, torch.ones_like(loss))
    per = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
    return list(per.split(sizes))


# ---------------------------------------------------------------------------------------------- builder


@register_model("yolov3")
def yolov3(num_classes: int = 80, width_mult: float = 1.0, depth_mult: float = 1.0, **kw) -> YoloV3:
    loss_kw = {k: v for k, v in kw.items() if k in YoloLossConfig.__dataclass_fields__}
    unknown = set(kw) - set(loss_kw)
    if unknown:
        raise TypeError(f"yolov3: unknown options {sorted(unknown)}")
    return YoloV3(YoloConfig(num_classes=num_classes, width_mult=width_mult, depth_mult=depth_mult,
                             loss=YoloLossConfig(**loss_kw)))
