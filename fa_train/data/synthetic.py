"""The embedded dataset: deterministic synthetic "shapes", written to disk in the VOC layout.

Several shape classes with varied sizes, colours and overlap on textured backgrounds, written as JPEG +
VOC XML + ImageSets so the ordinary VOC reader serves it. Generated once into a cache folder
(`$FA_CACHE` or `~/.cache/fa-toolkit`), atomically: a crash leaves no half-written dataset behind.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

SHAPES_CLASSES = ("circle", "square", "triangle", "star")
SHAPES_YEAR = "shapes"  # the folder is VOCdevkit/VOCshapes
VERSION = 1


def cache_root() -> str:
    return os.environ.get("FA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fa-toolkit")


def _background(rng, h, w):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    ang = rng.uniform(0, 2 * math.pi)
    t = ((xx * math.cos(ang) + yy * math.sin(ang)) / max(h, w) + 1) / 2
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    kind = rng.integers(3)
    if kind == 0:  # stripes
        period = rng.uniform(6, 20)
        img += 18 * np.sin(2 * math.pi * (xx * math.sin(ang) - yy * math.cos(ang)) / period)[..., None]
    elif kind == 1:  # blotches: upsampled low-resolution noise
        small = rng.normal(0, 25, (max(2, h // 16), max(2, w // 16), 3)).astype(np.float32)
        big = np.asarray(Image.fromarray(np.uint8(np.clip(small + 128, 0, 255))).resize((w, h), Image.BILINEAR))
        img += big.astype(np.float32) - 128
    img += rng.normal(0, 8, (h, w, 3))  # fine grain everywhere
    return Image.fromarray(np.uint8(np.clip(img, 0, 255)))


def _star(cx, cy, r, rot):
    pts = []
    for k in range(10):
        rr = r if k % 2 == 0 else r * 0.45
        a = rot + k * math.pi / 5
        pts.append((cx + rr * math.sin(a), cy - rr * math.cos(a)))
    return pts


def _draw(draw, cls, cx, cy, r, colour, rng):
    """Draw one shape and return its tight box (xmin, ymin, xmax, ymax) in continuous pixels."""
    if cls == 0:
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.ellipse(box, fill=colour)
        return box
    if cls == 1:
        box = (cx - r, cy - r * 0.9, cx + r, cy + r * 0.9)
        draw.rectangle(box, fill=colour)
        return box
    if cls == 2:
        rot = rng.uniform(-0.3, 0.3)
        pts = [(cx + r * math.sin(rot + k * 2 * math.pi / 3), cy - r * math.cos(rot + k * 2 * math.pi / 3))
               for k in range(3)]
    else:
        pts = _star(cx, cy, r, rng.uniform(0, 2 * math.pi / 5))
    draw.polygon(pts, fill=colour)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return (min(xs), min(ys), max(xs), max(ys))


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def make_image(i: int, seed: int):
    rng = np.random.default_rng(seed * 1_000_003 + i)
    w, h = int(rng.integers(112, 161)), int(rng.integers(112, 161))
    img = _background(rng, h, w)
    draw = ImageDraw.Draw(img)
    objects = []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):
            r = float(rng.uniform(8, 26))
            cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
            cls = int(rng.integers(len(SHAPES_CLASSES)))
            probe = (cx - r, cy - r, cx + r, cy + r)
            # some overlap is allowed, but every object stays mostly visible
            if all(_iou(probe, o[1]) < 0.25 for o in objects):
                break
        else:
            continue
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        box = _draw(draw, cls, cx, cy, r, colour, rng)
        box = (max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3]))
        objects.append((cls, box))
    return img, objects


def _xml(fname, w, h, objects):
    objs = "".join(
        f"<object><name>{SHAPES_CLASSES[c]}</name><difficult>0</difficult><bndbox>"
        f"<xmin>{b[0] + 1:.1f}</xmin><ymin>{b[1] + 1:.1f}</ymin><xmax>{b[2]:.1f}</xmax><ymax>{b[3]:.1f}</ymax>"
        f"</bndbox></object>" for c, b in objects)
    return (f"<annotation><folder>VOC{SHAPES_YEAR}</folder><filename>{fname}</filename>"
            f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objs}</annotation>\n")


def generate_shapes(out_dir: str, num_images: int = 1000, seed: int = 0, test_fraction: float = 0.2) -> str:
    """Write the dataset under `out_dir/VOCdevkit/VOCshapes`; returns the VOCdevkit path."""
    devkit = os.path.join(out_dir, "VOCdevkit")
    root = os.path.join(devkit, f"VOC{SHAPES_YEAR}")
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    stems = []
    for i in range(num_images):
        stem = f"{i:06d}"
        img, objects = make_image(i, seed)
        img.save(os.path.join(root, "JPEGImages", stem + ".jpg"), quality=92)
        with open(os.path.join(root, "Annotations", stem + ".xml"), "w") as f:
            f.write(_xml(stem + ".jpg", img.width, img.height, objects))
        stems.append(stem)
    n_test = int(round(num_images * test_fraction))
    splits = {"train": stems[: num_images - n_test], "test": stems[num_images - n_test:], "trainval": stems}
    for name, ids in splits.items():
        with open(os.path.join(root, "ImageSets", "Main", f"{name}.txt"), "w") as f:
            f.write("".join(s + "\n" for s in ids))
    return devkit


def ensure_shapes(num_images: int = 1000, seed: int = 0, root: Optional[str] = None, log=print) -> str:
    """The cached dataset's VOCdevkit path, generating it on first use."""
    base = os.path.join(root or cache_root(), f"shapes-v{VERSION}-n{num_images}-s{seed}")
    done = os.path.join(base, "DONE")
    if os.path.isfile(done):
        return os.path.join(base, "VOCdevkit")
    os.makedirs(os.path.dirname(base), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".shapes-", dir=os.path.dirname(base))
    try:
        if log:
            log(f"generating the shapes dataset ({num_images} images, seed {seed}) into {base}")
        generate_shapes(tmp, num_images, seed)
        open(os.path.join(tmp, "DONE"), "w").close()
        try:
            os.rename(tmp, base)
        except OSError:  # another process finished first
            if not os.path.isfile(done):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(base, "VOCdevkit")
