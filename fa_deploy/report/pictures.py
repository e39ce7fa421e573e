"""Pictures of detections under attack, as in the paper's Figure 3: for a few test images, one PNG each, a row per
model (and per deployed backend) and a column per input (clean, PGD-1 at eps 0.03): predicted boxes with class
names and scores, the ground truth dashed, and the Grad-CAM heat map of the M-th layer (the aligned layer).

Grad-CAM here is taken through the detection loss against the ground truth, the one signal the Detector contract
gives for every detector (`forward_train` returns the loss terms and the M-th layer from the same pass): the
channel weights are the spatial means of d(-loss)/dA, so the map shows where the aligned layer's features support
the correct detections. It works unchanged for YOLOv3 and Faster R-CNN. Deployed backends cannot be
differentiated: their rows show their own detections on the source model's adversarial images, without a map.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def grad_cam(model, images: torch.Tensor, targets, towards: str = "support") -> torch.Tensor:
    """[N, H, W] Grad-CAM of the model's M-th layer through the detection loss, upsampled to the input size and
    normalised per image to [0, 1] (max 1; all zeros when no feature qualifies, which happens on untrained models).

    towards="support": gradients of -loss, where the layer's features support the ground-truth detections (the
    pictures); towards="loss": gradients of +loss, where raising the features would raise the loss (what an attack
    pushes on)."""
    if towards not in ("support", "loss"):
        raise ValueError(f"towards={towards!r}: expected 'support' or 'loss'")
    sign = -1.0 if towards == "support" else 1.0
    from fa_train.adversarial.attacks import frozen_batchnorm

    model.eval()
    with frozen_batchnorm(model), torch.enable_grad():
        losses, mid = model.forward_train(images.detach(), targets)
        total = sum(losses.values())
        (g,) = torch.autograd.grad(sign * total, mid)
    weights = g.mean((2, 3), keepdim=True)
    cam = F.relu((weights * mid.detach()).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1)
    return (cam / peak).float().cpu()


def _draw(ax, image: np.ndarray, dets: dict, gt: dict, class_names: Sequence[str], cam: Optional[np.ndarray],
          title: str, score_thres: float, max_boxes: int = 20):
    import matplotlib.patches as patches

    ax.imshow(image)
    if cam is not None:  # cells without evidence stay untinted
        ax.imshow(np.ma.masked_less(cam, 0.05), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
    for b in np.asarray(gt["boxes"]).reshape(-1, 4):
        ax.add_patch(patches.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, edgecolor="white",
                                       linestyle="--", linewidth=1.2))
    scores = np.asarray(dets["scores"], dtype=float)
    order = np.argsort(-scores)[:max_boxes]
    shown = 0
    for i in order:
        if scores[i] < score_thres:
            break
        b = np.asarray(dets["boxes"], dtype=float)[i]
        name = class_names[int(np.asarray(dets["labels"])[i])]
        ax.add_patch(patches.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, edgecolor="lime",
                                       linewidth=1.5))
        ax.text(b[0], b[1], f"{name} {scores[i]:.2f}", color="black", fontsize=6, va="bottom",
                bbox={"facecolor": "lime", "alpha": 0.8, "pad": 0.5, "linewidth": 0})
        shown += 1
    ax.set_title(f"{title} ({shown} boxes)", fontsize=8)
    ax.axis("off")


def _as_numpy_dets(d) -> dict:
    return {k: torch.as_tensor(v).detach().float().cpu().numpy() for k, v in d.items()}


def visualize(sources: Sequence[Tuple[str, torch.nn.Module]], dataset, out_dir: str, device, num_images: int = 4,
              eps: float = 0.03, backends: Sequence = (), score_thres: float = 0.3, attack_keys=None,
              log=None) -> List[str]:
    """One PNG per test image (the first `num_images`): rows = source models, then `backends` (evaluated on the
    first source's adversarial images, as in the harness), columns = clean and PGD-1 (step eps). Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fa_train.adversarial.attacks import pgd_attack

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    n = min(num_images, len(dataset))
    rows = len(sources) + len(backends)
    for idx in range(n):
        img, target, meta = dataset[idx]
        x = img.unsqueeze(0).to(device)
        t = [{k: v.to(device) for k, v in target.items()}]
        fig, axes = plt.subplots(rows, 2, figsize=(6.4, 3.2 * rows), dpi=100, squeeze=False)
        first_adv = None
        for r, (name, model) in enumerate(sources):
            model.eval()
            adv = pgd_attack(model, x, t, eps=eps, steps=1, step_size=eps, loss_keys=attack_keys)
            if first_adv is None:
                first_adv = adv
            for c, (label, inp) in enumerate((("clean", x), (f"PGD-1 eps {eps:g}", adv))):
                with torch.inference_mode():
                    det = _as_numpy_dets(model.predict(inp)[0])
                cam = grad_cam(model, inp, t)[0].numpy()
                _draw(axes[r][c], inp[0].permute(1, 2, 0).cpu().numpy(), det, _as_numpy_dets(target),
                      dataset.class_names, cam, f"{name}: {label}", score_thres)
        postprocess = sources[0][1].postprocess
        for j, (name, backend) in enumerate(backends):
            r = len(sources) + j
            for c, (label, inp) in enumerate((("clean", x), (f"PGD-1 eps {eps:g} (source's)", first_adv))):
                det = _as_numpy_dets(postprocess(backend.raw(inp.detach().cpu().numpy()))[0])
                _draw(axes[r][c], inp[0].permute(1, 2, 0).cpu().numpy(), det, _as_numpy_dets(target),
                      dataset.class_names, None, f"{name}: {label}", score_thres)
        stem = os.path.splitext(os.path.basename(str(meta.get("file", idx))))[0]
        height = 3.2 * rows  # inches; the title keeps the same room whatever the number of rows
        fig.suptitle(f"{stem}: boxes >= {score_thres:g} (green), ground truth (white, dashed), "
                     f"Grad-CAM of the aligned layer", fontsize=7, y=1.0 - 0.08 / height)
        top = 1.0 - 0.55 / height
        fig.subplots_adjust(left=0.02, right=0.98, bottom=0.01, top=top, wspace=0.06, hspace=0.14)
        path = os.path.join(out_dir, f"detections_{idx:03d}_{stem}.png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
        if log:
            log(f"wrote {path}")
    return paths
