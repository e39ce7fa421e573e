"""What an attack maximises (the objective part of `attacks.run_attack`), through the Detector contract only.

An objective has `prepare(model, clean_images, targets) -> ctx` (once per batch, no gradient: e.g. TOG's clean
detections), `__call__(model, images, ctx) -> [N]` (each image's value, to maximise; a scalar for the batch
objective of training) and `repeat(ctx, r)` (the context of r batched restarts). `ctx` is a list with one entry
per image, so restarts repeat it.

- `DetectionLoss`: the detection loss on ground truth, all terms (`pgd`, `apgd`) or one TOD domain (`cls`, `loc`).
- TOG (Chow et al. 2020, "Adversarial Objectness Gradient Attacks in Real-time Object Detection Systems"):
  `TogVanishing` / `TogFabrication` drive every output slot's objectness logit to background / to object (YOLOv3:
  the objectness of every anchor cell; Faster R-CNN: the RPN objectness of every anchor and the not-background
  log-odds of every inference proposal); `TogMislabel` drives the output slots that produce each confident clean
  detection to its most likely other class (boxes kept); `TogUntargeted` maximises the detection loss against the
  model's own confident clean detections (no ground truth needed).
- `ClassWise` (Chen et al., CVPR 2021, "Class-Aware Robust Adversarial Training for Object Detection"): each
  object's own loss, averaged per class, then over the classes of the image, so frequent classes do not dominate.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F


class Objective:
    name = "objective"
    uses_ground_truth = True
    per_image = True

    def prepare(self, model, images: torch.Tensor, targets):
        return list(targets)

    @staticmethod
    def repeat(ctx, r: int):
        return list(ctx) * r

    def __call__(self, model, images: torch.Tensor, ctx) -> torch.Tensor:
        raise NotImplementedError


def _sum_terms(terms: dict, keys: Optional[Sequence[str]]) -> torch.Tensor:
    return sum(v for k, v in terms.items() if keys is None or k in keys)


class DetectionLoss(Objective):
    """The detection loss against `targets` (all terms, or only `keys`). per_image: [N], each image's own loss
    (`loss_terms_per_image`); else the batch's scalar loss (`forward_train`, training's normalisers)."""

    def __init__(self, keys: Optional[Sequence[str]] = None, per_image: bool = True):
        self.keys, self.per_image = keys, per_image
        self.name = "detection loss" if keys is None else f"detection loss ({', '.join(keys)})"

    def __call__(self, model, images, ctx):
        if self.per_image:
            return _sum_terms(model.loss_terms_per_image(images, ctx), self.keys)
        losses, _ = model.forward_train(images, ctx)
        return _sum_terms(losses, self.keys)


def _bce_mean(logits: torch.Tensor, mask: Optional[torch.Tensor], target: float) -> torch.Tensor:
    """[N]: mean over the valid slots of BCE(logit, target)."""
    bce = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target), reduction="none")
    if mask is None:
        return bce.mean(1)
    m = mask.to(bce.dtype)
    return (bce * m).sum(1) / m.sum(1).clamp(min=1)


class TogVanishing(Objective):
    """Every object disappears: -sum over slot groups of the mean BCE(objectness logit, background)."""

    name = "tog-vanishing"
    uses_ground_truth = False

    def prepare(self, model, images, targets):
        return [None] * len(images)

    def __call__(self, model, images, ctx):
        return -sum(_bce_mean(l, m, 0.0) for l, m in model.objectness_logits(images).values())


class TogFabrication(TogVanishing):
    """Spurious objects everywhere: -sum over slot groups of the mean BCE(objectness logit, object)."""

    name = "tog-fabrication"

    def __call__(self, model, images, ctx):
        return -sum(_bce_mean(l, m, 1.0) for l, m in model.objectness_logits(images).values())


def confident_detections(model, images, score_thres: float, with_class_scores: bool = False) -> List[dict]:
    """The model's own detections with score >= `score_thres`, as targets (boxes, labels, ignore)."""
    out = []
    for d in model.predict(images, with_class_scores=with_class_scores):
        keep = d["scores"] >= score_thres
        t = {"boxes": d["boxes"][keep].float(), "labels": d["labels"][keep].long(),
             "ignore": torch.zeros(int(keep.sum()), dtype=torch.bool, device=d["boxes"].device)}
        if with_class_scores:
            t["class_scores"] = d["class_scores"][keep]
        out.append(t)
    return out


class TogUntargeted(Objective):
    """The detection loss against the model's own confident clean detections (needs no ground truth)."""

    name = "tog-untargeted"
    uses_ground_truth = False

    def __init__(self, score_thres: float = 0.5):
        self.score_thres = score_thres

    def prepare(self, model, images, targets):
        return confident_detections(model, images, self.score_thres)

    def __call__(self, model, images, ctx):
        return sum(model.loss_terms_per_image(images, ctx).values())


class TogMislabel(TogUntargeted):
    """Each confident clean detection pushed to its most likely other class, box kept. The output slots that carry a
    detection on the clean image (`output_slots` whose box overlaps it at IoU >= 0.5, weighted by their clean
    score, so the few slots that produce the detection dominate) are driven to object (BCE of the objectness logit
    to 1) of the detection's new class (BCE of the class logits to the one-hot new class; cross-entropy for a
    softmax over classes) with their box on the detection's (GIoU loss); the objective is minus the weighted sum.
    Images without detections (or a one-class model) get no gradient: they stay at the attack's random start.
    Where the slots are not the same outputs from one input to the next (`output_slots(...)["fixed"]` False:
    Faster R-CNN's proposals, re-ranked at every step), they are matched to the detections' boxes again at every
    step, weighted by their current score, so the slots attacked are those that carry each clean detection now.

    Not the detection loss against the relabelled boxes, as TOG's code has it for YOLOv3 with Darknet's ignore
    threshold: this project's YOLOv3 loss pushes every output not assigned to a target towards background, so
    minimising it makes the neighbouring outputs that carry a detection vanish instead of changing class."""

    name = "tog-mislabel"
    iou = 0.5

    def _match(self, slots, score, i, boxes, labels):
        """The output slots of image i that carry the detections `boxes` (IoU >= self.iou, valid), each slot with
        the detection it overlaps most, weighted by the slot's score."""
        import torchvision

        if not len(boxes):
            return {"slots": torch.zeros(0, dtype=torch.long)}
        iou = torchvision.ops.box_iou(boxes.to(slots["boxes"]), slots["boxes"][i].detach())  # [K, S]
        best, which = iou.max(0)
        hit = torch.where((best >= self.iou) & slots["valid"][i])[0]
        if not len(hit):
            return {"slots": hit}
        w = score[i][hit].detach().float()
        return {"slots": hit, "weight": w / w.sum().clamp(min=1e-12), "label": labels.to(hit.device)[which[hit]],
                "box": boxes.to(hit.device)[which[hit]]}

    @staticmethod
    def _scores(slots):
        prob = torch.sigmoid(slots["cls"]) if slots["cls_activation"] == "sigmoid" else slots["cls"].softmax(-1)
        return (torch.sigmoid(slots["obj"]) * prob.max(-1).values).detach()

    def prepare(self, model, images, targets):
        slots = model.output_slots(images)
        score = self._scores(slots)
        out = []
        for i, t in enumerate(confident_detections(model, images, self.score_thres, with_class_scores=True)):
            scores = t["class_scores"].clone()
            if not len(t["labels"]) or scores.shape[1] < 2:
                out.append({"slots": torch.zeros(0, dtype=torch.long)})
                continue
            scores[torch.arange(len(scores)), t["labels"]] = -1.0
            new = scores.argmax(1)
            c = self._match(slots, score, i, t["boxes"], new)
            if not slots.get("fixed", True):
                # slots that are not the same outputs from one input to the next (Faster R-CNN: its proposals,
                # re-ranked at every step): matched again at every step to each detection's box (issue 23)
                c.update(detections=t["boxes"], new_labels=new)
            out.append(c)
        return out

    def __call__(self, model, images, ctx):
        """[N]: minus each image's weighted slot losses; the slots of the whole batch in one pass (no loop over
        images), summed back per image."""
        import torchvision

        slots = model.output_slots(images)
        if any("detections" in c for c in ctx):  # slots that move: follow each clean detection by its box
            score = self._scores(slots)
            ctx = [self._match(slots, score, i, c["detections"], c["new_labels"]) if "detections" in c else c
                   for i, c in enumerate(ctx)]
        rows = [(i, c) for i, c in enumerate(ctx) if len(c["slots"])]
        if not rows:
            return slots["obj"].new_zeros(len(ctx))
        dev = slots["obj"].device
        img = torch.cat([torch.full((len(c["slots"]),), i, dtype=torch.long) for i, c in rows]).to(dev)
        idx = torch.cat([c["slots"] for _, c in rows]).to(dev)
        new = torch.cat([c["label"] for _, c in rows]).to(dev)
        obj, cls = slots["obj"][img, idx], slots["cls"][img, idx]
        loss = F.binary_cross_entropy_with_logits(obj, torch.ones_like(obj), reduction="none")
        if slots["cls_activation"] == "softmax":
            loss = loss + F.cross_entropy(cls, new, reduction="none")
        else:
            loss = loss + F.binary_cross_entropy_with_logits(
                cls, F.one_hot(new, cls.shape[1]).to(cls.dtype), reduction="none").sum(1)
        box = slots["boxes"][img, idx]
        if box.requires_grad:
            target = torch.cat([c["box"] for _, c in rows]).to(box)
            loss = loss + torchvision.ops.generalized_box_iou_loss(box, target, reduction="none")
        weight = torch.cat([c["weight"] for _, c in rows]).to(loss)
        return loss.new_zeros(len(ctx)).index_add(0, img, -(loss * weight))


class ClassWise(Objective):
    """Class-wise loss: per image, the mean over the classes present of the mean object loss of that class
    (objects' own classification + localization losses, `object_losses`; ignored objects left out). The paper's
    clipping of each object loss is not applied (it bounds the training signal; an attack wants the full loss)."""

    name = "cwa"

    def __call__(self, model, images, ctx):
        """[N], the whole batch in one pass: per (image, class) the sum and count of its objects' losses, the
        class means, then each image's mean over the classes it has (0 and no gradient with no object)."""
        per_object = model.object_losses(images, ctx)
        n = len(ctx)
        losses = torch.cat(per_object) if per_object else images.new_zeros(0)
        if not losses.numel():
            return images.new_zeros(n)
        dev = losses.device
        img = torch.cat([torch.full((len(v),), i, dtype=torch.long) for i, v in enumerate(per_object)]).to(dev)
        labels = torch.cat([t["labels"].reshape(-1).long().to(dev) for t in ctx])
        ok = ~torch.isnan(losses)
        groups = int(labels.max()) + 1
        slot = img * groups + labels
        sums = losses.new_zeros(n * groups).index_add(0, slot, torch.where(ok, losses, torch.zeros_like(losses)))
        counts = losses.new_zeros(n * groups).index_add(0, slot, ok.to(losses.dtype))
        present = counts > 0
        class_mean = torch.where(present, sums / counts.clamp(min=1), torch.zeros_like(sums)).view(n, groups)
        classes = present.view(n, groups).sum(1)
        return torch.where(classes > 0, class_mean.sum(1) / classes.clamp(min=1), torch.zeros_like(class_mean[:, 0]))
