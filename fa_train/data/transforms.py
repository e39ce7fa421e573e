"""Letterbox to a square that is a multiple of 32 (and its exact inverse), horizontal flip.

Images leave here as float RGB [3,S,S] in [0,1]; normalisation belongs to the model.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PAD_VALUE = 114.0 / 255.0


def letterbox(img: np.ndarray, boxes: np.ndarray, size: int):
    """Resize the longer side to `size` keeping the aspect ratio, pad the rest symmetrically.

    Returns (image [3,size,size] float in [0,1], boxes mapped to the new pixels, meta). `meta` has the
    scale and padding that `unletterbox_boxes` inverts.
    """
    h, w = img.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    t = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float().div_(255.0)
    if (nh, nw) != (h, w):
        t = F.interpolate(t[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
        t = t.clamp_(0.0, 1.0)
    pad_top, pad_left = (size - nh) // 2, (size - nw) // 2
    out = torch.full((3, size, size), PAD_VALUE, dtype=torch.float32)
    out[:, pad_top:pad_top + nh, pad_left:pad_left + nw] = t
    sx, sy = nw / w, nh / h  # exact per-axis factors of the resize that was done
    b = boxes.astype(np.float32).reshape(-1, 4).copy()
    b[:, [0, 2]] = b[:, [0, 2]] * sx + pad_left
    b[:, [1, 3]] = b[:, [1, 3]] * sy + pad_top
    meta = {"orig_size": (h, w), "scale": (sx, sy), "pad": (pad_left, pad_top), "size": size}
    return out, b, meta


def content_mask(metas, size: int, device=None) -> torch.Tensor:
    """[N, 1, size, size] bool: True on each letterboxed image's own pixels, False on the padding `letterbox` added
    (an attacker perturbs the image, not the pipeline's padding). A meta without letterbox geometry (an image given
    at the input size) is all content."""
    out = torch.ones(len(metas), 1, size, size, dtype=torch.bool)
    for i, m in enumerate(metas):
        if "pad" not in m or "orig_size" not in m or "scale" not in m:
            continue
        (px, py), (h, w), (sx, sy) = m["pad"], m["orig_size"], m["scale"]
        nw, nh = int(round(w * sx)), int(round(h * sy))
        out[i] = False
        out[i, :, py:py + nh, px:px + nw] = True
    return out if device is None else out.to(device)


def unletterbox_boxes(boxes, meta):
    """Map boxes (xyxy, letterboxed pixels; numpy or torch) back to the original image, clipped to it."""
    sx, sy = meta["scale"]
    px, py = meta["pad"]
    h, w = meta["orig_size"]
    b = boxes.clone() if isinstance(boxes, torch.Tensor) else np.array(boxes, dtype=np.float64, copy=True)
    b[:, [0, 2]] = (b[:, [0, 2]] - px) / sx
    b[:, [1, 3]] = (b[:, [1, 3]] - py) / sy
    if isinstance(b, torch.Tensor):
        b[:, [0, 2]] = b[:, [0, 2]].clamp(0, w)
        b[:, [1, 3]] = b[:, [1, 3]].clamp(0, h)
    else:
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
    return b


def hflip(img: torch.Tensor, boxes: np.ndarray):
    size = img.shape[-1]
    img = img.flip(-1)
    b = boxes.copy()
    b[:, [0, 2]] = size - boxes[:, [2, 0]]
    return img, b
