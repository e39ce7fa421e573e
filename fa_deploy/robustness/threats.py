"""Who attacks the deployed model, and what a deployment loses: the three threats of `fa-bench --backend --threat`
and the deployment-only misses.

- `transfer`: the adversarial images are made on the source weights and every backend is evaluated on them (the
  attacker holds the training checkpoint; a lower bound for the deployed model).
- `whitebox`: the attack is computed on the backend's differentiable twin (`fa_deploy/robustness/twin.py`: the ONNX graph
  interpreted in torch, fp16 nodes and int8 Q/DQ as the file has them, verified against ONNX Runtime before use)
  and the images are evaluated on the backend itself (an attacker who holds the shipped file; a TensorRT engine
  through the twin of the ONNX file it was built from).
- `differential` (after DIVA, "A Tale of Two Models", arXiv 2204.10933): maximise the twin's objective minus the
  source's loss on the same targets, `objective(twin; T) - weight * L_source(x; T)` (T the ground truth, or for
  TOG the source's clean detections): images that fool the deployment while the checkpoint a check would run
  stays right, the deployment-only misses.

Deployment-only misses: the ground-truth objects the source detects on an image (a detection of score >=
`detect_score`, right class, IoU >= 0.5) that the backend misses on the same image, as a fraction of the objects
the source detects.
"""
from __future__ import annotations

import hashlib
import os
from typing import List, Optional, Sequence, Tuple

import torch

from fa_train.adversarial.attack_objectives import Objective, confident_detections
from fa_train.adversarial.attacks import frozen_batchnorm

from fa_deploy.settings import THREATS, parse_threats  # noqa: F401  (the flag's parser; re-exported)

from fa_deploy.robustness.twin import LAYER_CHECK_SLACK, load_twin, TwinError
from fa_deploy.runtime.metadata import sha256
from fa_deploy.runtime.pipeline import read_manifest


class Differential(Objective):
    """Deployment-only misses as an objective, on the deployed twin (the attacked model): `inner` (any evaluation
    objective: the detection loss for pgd / apgd, TOG, cwa) of the twin minus `weight` x the source's detection
    loss on the same targets, so the attack gains where the deployment goes wrong and the source stays right.

    The same targets: the ground truth when `inner` uses it (pgd, apgd, cls / loc, cwa: a deployment-only miss is
    a ground-truth object the source detects and the deployment does not); for the TOG objectives, which need no
    ground truth, the source's own confident detections on the clean image (score >= `score_thres`).
    Measured on a fragile int8 file (32 images, eps 0.03, PGD-1/3; docs/deployment.md): deployment-only misses
    34.5 % with these targets at weight 1, 29.6 % for plain white-box on the twin, 23.7 % with the previous
    objective (the source's loss on its own detections while the twin's is on the ground truth) and 28.2 % with a
    hinge penalty (only a rise of the source's loss over its clean value)."""

    def __init__(self, inner: Objective, source, weight: float = 1.0, score_thres: float = 0.25):
        self.inner, self.source, self.weight, self.score_thres = inner, source, float(weight), score_thres
        self.name = f"differential({inner.name}, weight {weight:g})"
        self.uses_ground_truth = inner.uses_ground_truth

    def prepare(self, model, images, targets):
        inner = self.inner.prepare(model, images, targets)
        if self.inner.uses_ground_truth and targets is not None:
            keep = targets
        else:
            with frozen_batchnorm(self.source):
                keep = confident_detections(self.source, images, self.score_thres)
        return list(zip(inner, keep))

    def __call__(self, model, images, ctx):
        value = self.inner(model, images, [c[0] for c in ctx])
        with frozen_batchnorm(self.source):
            penalty = sum(self.source.loss_terms_per_image(images, [c[1] for c in ctx]).values())
        return value - self.weight * penalty


def _hits(boxes: torch.Tensor, labels: torch.Tensor, det: dict, score: float) -> torch.Tensor:
    """[G] whether each ground-truth box has a detection of score >= `score`, its class, at IoU >= 0.5."""
    from torchvision.ops import box_iou

    keep = det["scores"].cpu() >= score
    if len(boxes) == 0 or not bool(keep.any()):
        return torch.zeros(len(boxes), dtype=torch.bool)
    iou = box_iou(boxes.float(), det["boxes"].cpu()[keep].float())
    same = labels.view(-1, 1) == det["labels"].cpu()[keep].view(1, -1)
    return ((iou >= 0.5) & same).any(1)


def deployment_misses(targets: Sequence[dict], source_dets: Sequence[dict], deployed_dets: Sequence[dict],
                      score: float) -> Tuple[int, int]:
    """(objects the source detects, of those the ones the deployment misses) over a batch; objects marked
    `ignore` (VOC's difficult) do not count."""
    detected = missed = 0
    for t, s, d in zip(targets, source_dets, deployed_dets):
        boxes, labels = t["boxes"].cpu(), t["labels"].cpu()
        if "ignore" in t:
            keep = ~t["ignore"].cpu().bool()
            boxes, labels = boxes[keep], labels[keep]
        hs = _hits(boxes, labels, s, score)
        hd = _hits(boxes, labels, d, score)
        detected += int(hs.sum())
        missed += int((hs & ~hd).sum())
    return detected, missed


def file_hash(path: str) -> str:
    """sha256 of a deployed file; for a pipeline manifest, of the manifest and every part it names (the cache key
    of images made on that deployment)."""

    if path.endswith(".pipeline.json"):

        base = os.path.dirname(os.path.abspath(path))
        h = hashlib.sha256(sha256(path).encode())
        for k, v in sorted(read_manifest(path)["parts"].items()):
            h.update(f"{k}:{sha256(os.path.join(base, v))}".encode())
        return h.hexdigest()
    return sha256(path)


class ThreatError(RuntimeError):
    """A threat that cannot be run on a backend (no twin can be built, or the twin does not match the file)."""


def verification_images(images: torch.Tensor, eps: float, seed: int = 0) -> torch.Tensor:
    """What a twin is verified on: the images and the same images with uniform noise in [-eps, eps] (clipped to
    [0, 1]): the twin is attacked on perturbed images, not only on clean ones."""
    if eps <= 0:
        return images
    g = torch.Generator().manual_seed(seed)
    noise = (torch.rand(images.shape, generator=g) * 2 - 1) * eps
    return torch.cat([images, (images.cpu() + noise).clamp(0, 1).to(images)])


def disagreement(verification: dict) -> Optional[dict]:
    """The measured per-layer disagreement of an int8 twin with ONNX Runtime's integer activations (each layer fed
    ONNX Runtime's own inputs): the largest and the mean fraction of a layer's elements one quantization step
    apart, over the parts' quantized layers; None for a twin without quantized layers."""
    acts = [a for rep in verification.values() for a in rep.get("activations", {}).values()]
    if not acts:
        return None
    flips = [a["flip_fraction"] for a in acts]
    return {"max_flip_fraction": max(flips), "mean_flip_fraction": sum(flips) / len(flips), "layers": len(flips),
            "max_off_tie_flip_fraction": max(a.get("off_tie_flip_fraction", a["flip_fraction"]) for a in acts)}


def load_twins(paths: Sequence[str], names: Sequence[str], verify_images: torch.Tensor, device,
               log=print, eps: float = 0.0) -> List[object]:
    """The verified twin of each deployed file (the white-box and differential threats attack it), verified on
    `verify_images` and, with `eps`, on the same images with uniform noise at eps (`verification_images`). A file
    no twin can be built for, or whose twin does not match ONNX Runtime, is an error naming it (with the
    numbers): the threat is never run on a model that is not the deployed one. The log line says on how many
    images, and for int8 the measured per-layer disagreement."""

    images = verification_images(verify_images.cpu(), eps)
    twins = []
    for path, name in zip(paths, names):
        try:
            twin = load_twin(path, verify_images=images)
        except TwinError as e:
            raise ThreatError(f"--threat whitebox/differential: {name}: {e} (run with --threat transfer to skip "
                              f"the attacks on the deployed file)") from None
        twin.to(device).eval()
        for p in twin.parameters():
            p.requires_grad_(False)
        how = f"{len(verify_images)} images" + (f" and the same with uniform noise at eps {eps:g}" if eps > 0 else "")
        d = disagreement(twin.verification)
        if d:
            how += (f"; per-layer disagreement: at most {d['max_flip_fraction']:.2%} of a layer's elements one "
                    f"quantization step apart (mean {d['mean_flip_fraction']:.3%} over {d['layers']} layers; away "
                    f"from a rounding tie at most {d['max_off_tie_flip_fraction']:.2%})")
        layered = [rep["layers"] for rep in twin.verification.values() if "layers" in rep]
        if layered:
            over = max(r["free_running_over_gate"] for r in layered)
            how += (f"; run free, its outputs missed the gate by up to {over:.2g}x its atol (a layer check is allowed "
                    f"within {LAYER_CHECK_SLACK:g}x), so it was verified layer by layer: "
                    f"{sum(r['checked'] for r in layered)} layers on all {max(r['inputs'] for r in layered)} inputs, "
                    f"each within the gate on ONNX Runtime's own inputs")
        log(f"[{name}] {twin.precision} twin verified against ONNX Runtime on {how}")
        twins.append(twin)
    return twins


def worst_over_threats(rows: Sequence[dict], keys: Sequence[str], miss_keys: Sequence[str],
                       adv_columns: Sequence[str] = ()) -> Optional[dict]:
    """A backend's worst case over its threat rows, one row: each AP50 column's minimum and each miss fraction's
    maximum over the threats, with the threat that gave it (`worst_threat`); the aggregates of the paper's rows
    are then the row's own: advAP the mean of its own `adv_columns` (the PGD-k minima), acAP (clean + advAP) / 2
    (their threats joined by '/'), so the drop the gate reads is the one its columns give (issue 23: the minimum
    of the threats' advAPs is larger than the mean of the column minima)."""
    if not rows:
        return None
    out = {k: v for k, v in rows[0].items() if k not in keys and k not in miss_keys}
    out["threat"], which = "worst", {}
    for k in keys:
        vals = [(r[k], r["threat"]) for r in rows if k in r]
        if vals:
            out[k], which[k] = min(vals, key=lambda v: v[0])
    for k in miss_keys:
        vals = [(r[k], r["threat"]) for r in rows if r.get(k) is not None]
        if vals:
            out[k], which[k] = max(vals, key=lambda v: v[0])
    cols = [c for c in adv_columns if c in out]
    if cols and "advAP" in keys:
        out["advAP"] = sum(out[c] for c in cols) / len(cols)
        which["advAP"] = "/".join(dict.fromkeys(which[c] for c in cols))
        if "acAP" in keys and "clean" in out:
            out["acAP"] = (out["clean"] + out["advAP"]) / 2
            which["acAP"] = "/".join(dict.fromkeys([which.get("clean", rows[0]["threat"]), which["advAP"]]))
    out["worst_threat"] = which
    return out


__all__ = ["THREATS", "parse_threats", "Differential", "deployment_misses", "file_hash", "ThreatError",
           "load_twins", "worst_over_threats", "verification_images", "disagreement"]
