"""Records, the dataset class shared by every reader, image loading and box sanitising.

A reader (VOC, COCO, shapes) turns annotation files into `Record`s once, at construction; the dataset
then loads and letterboxes images on demand. Every problem names the file it came from.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .transforms import letterbox, hflip


class DataError(ValueError):
    """Bad input data; the message names the file and the field."""


@dataclass
class Record:
    image_id: int
    file: str
    width: int
    height: int
    boxes: np.ndarray  # [M,4] float32 xyxy, original pixels
    labels: np.ndarray  # [M] int64, 0-based contiguous
    ignore: np.ndarray  # [M] bool (VOC difficult, COCO crowd)
    area: Optional[np.ndarray] = None  # [M] float32, COCO segmentation area when known
    source: str = ""  # annotation file, for messages
    upright: bool = False  # True: width/height are the EXIF-upright size (YOLO); False: the annotation's size decides


def _n(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("x") else "s")


@dataclass
class SanitizeStats:
    clipped: int = 0
    dropped_zero_area: int = 0  # every dropped box (kept name): zero area once clipped, or a negative size
    per_file: Counter = field(default_factory=Counter)
    dropped_negative: int = 0  # of those, boxes with x2 < x1 or y2 < y1 as written

    def summary(self) -> str:
        parts = [f"{_n(self.clipped, 'box')} clipped to the image"] if self.clipped else []
        zero, neg = self.dropped_zero_area - self.dropped_negative, self.dropped_negative
        drops = ([_n(zero, "zero-area box")] if zero else []) + ([_n(neg, "negative-size box")] if neg else [])
        if drops:
            parts.append(" and ".join(drops) + " dropped")
        return ", ".join(parts) or "no box clipped or dropped"


def sanitize_boxes(boxes: np.ndarray, width: int, height: int, stats: SanitizeStats, source: str):
    """Clip boxes to the image (counted) and return the mask of boxes with positive area (drops counted)."""
    boxes = boxes.astype(np.float32).reshape(-1, 4)
    clipped = boxes.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, width)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, height)
    n_clip = int((np.abs(clipped - boxes) > 1e-6).any(1).sum())
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    n_drop = int((~keep).sum())
    negative = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    stats.clipped += n_clip
    stats.dropped_zero_area += n_drop
    stats.dropped_negative += int((negative & ~keep).sum())
    if n_clip or n_drop:
        stats.per_file[source] += n_clip + n_drop
    return clipped, keep


EXIF_ORIENTATION = 0x0112
SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations whose upright image has width and height exchanged


def exif_orientation(im) -> int:
    """The EXIF orientation tag of an open image (1, upright as stored, when absent or unreadable)."""
    try:
        o = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except (OSError, SyntaxError, ValueError, TypeError):
        return 1
    return o if 1 <= o <= 8 else 1


def upright_size(width: int, height: int, orientation: int):
    """The size a viewer shows for an image stored `width` x `height` with this EXIF orientation."""
    return (height, width) if orientation in SWAPS_SIDES else (width, height)


def _to_rgb8(im, path: str) -> np.ndarray:
    """RGB uint8 of any Pillow mode, 16-bit ones scaled to the 8-bit values a viewer shows (v / 257): Pillow's own
    convert("RGB") clips a 16-bit value to 255, so a 16-bit PNG became white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise DataError(f"{path}: {im.mode} image with values {a.min()}..{a.max()} outside the 16-bit range; "
                            "convert it to an 8- or 16-bit image")
        g = ((a * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
        return np.repeat(g[..., None], 3, axis=2)
    if im.mode == "F":
        raise DataError(f"{path}: a 32-bit float image has no standard display range; convert it to an 8- or "
                        "16-bit image")
    return np.asarray(im.convert("RGB"))


def load_image(path: str, annotated_size=None) -> np.ndarray:
    """RGB uint8 [H,W,3]; a missing or corrupt file raises DataError naming it. 16-bit images give the 8-bit
    values a viewer shows. The EXIF orientation: with `annotated_size` None the image is returned upright, as
    every viewer and Ultralytics show it; with the (width, height) an annotation records (VOC, COCO), in the
    frame that size names: upright when it is the upright size, as stored when it is the stored size (also
    when both are the same, as for 180 degrees or a mirror: those annotation tools work on the stored pixels),
    and a DataError naming both sizes when it is neither."""
    from PIL import ImageOps

    if not os.path.isfile(path):
        raise DataError(f"{path}: image file is missing")
    try:
        with Image.open(path) as im:
            im.load()
            o = exif_orientation(im)
            if o != 1:
                stored = im.size
                upright = upright_size(*stored, o)
                if annotated_size is not None and tuple(annotated_size) not in (stored, upright):
                    raise DataError(f"{path}: image carries EXIF orientation {o}: stored {stored[0]}x{stored[1]}, "
                                    f"shown {upright[0]}x{upright[1]}, but its annotation says "
                                    f"{annotated_size[0]}x{annotated_size[1]}")
                if annotated_size is None or (tuple(annotated_size) == upright and upright != stored):
                    im = ImageOps.exif_transpose(im)
            return _to_rgb8(im, path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: corrupt or unreadable image ({e})") from e


class DetectionDataset(torch.utils.data.Dataset):
    """Letterboxed images as float RGB [3,S,S] in [0,1], targets in letterboxed pixels, and the meta
    needed to map predictions back to the original image exactly."""

    def __init__(self, records: Sequence[Record], class_names: Sequence[str], img_size: int = 416,
                 train: bool = False, flip_prob: float = 0.5, name: str = "",
                 stats: Optional[SanitizeStats] = None, label_to_cat_id: Optional[List[int]] = None):
        if img_size % 32:
            raise ValueError(f"img_size must be a multiple of 32, got {img_size}")
        self.records = list(records)
        self.class_names = list(class_names)
        self.img_size = img_size
        self.train = train
        self.flip_prob = flip_prob if train else 0.0
        self.name = name
        self.stats = stats or SanitizeStats()
        self.skip_bad = False  # set by the training loop from `data.bad_images: skip`
        # contiguous label -> category id written in COCO-format results (COCO: the dataset's own ids)
        self.label_to_cat_id = list(label_to_cat_id) if label_to_cat_id else list(range(1, len(class_names) + 1))

    def __len__(self):
        return len(self.records)

    def __getitem__(self, item):
        """`item` is an index, or (index, sample_seed) from GlobalBatchSampler: the sample's augmentation is then
        drawn from its own seed. With `skip_bad`, a corrupt or inconsistent image gives a BadSample (the collate
        function drops it and the training loop counts it) instead of raising."""
        i, seed = item if isinstance(item, tuple) else (item, None)
        try:
            return self._load(i, seed)
        except DataError as e:
            if self.skip_bad:
                return BadSample(self.records[i].file, str(e))
            raise

    def _load(self, i, seed):
        r = self.records[i]
        img = load_image(r.file, None if r.upright else (r.width, r.height))
        h, w = img.shape[:2]
        if (w, h) != (r.width, r.height):
            raise DataError(f"{r.file}: image is {w}x{h} but its annotation {r.source or '?'} says "
                            f"{r.width}x{r.height}")
        img_t, boxes, meta = letterbox(img, r.boxes, self.img_size)
        u = np.random.default_rng(seed).random() if seed is not None else np.random.rand()
        if self.flip_prob and u < self.flip_prob:
            img_t, boxes = hflip(img_t, boxes)
        target = {
            "boxes": torch.from_numpy(boxes).float().reshape(-1, 4),
            "labels": torch.from_numpy(r.labels).long(),
            "ignore": torch.from_numpy(r.ignore).bool(),
        }
        meta.update(image_id=r.image_id, file=r.file)
        return img_t, target, meta


@dataclass
class BadSample:
    """A training image that could not be used (`--bad-images skip`): the file and the reason."""
    file: str
    reason: str


class Metas(list):
    """Per-image metas of a batch; `skipped` lists the BadSamples the batch left out."""
    skipped: list

    def __init__(self, items=(), skipped=()):
        super().__init__(items)
        self.skipped = list(skipped)

    def __reduce__(self):  # keep `skipped` across the data-loader workers' queues
        return (Metas, (list(self), self.skipped))


def collate(batch):
    bad = [b for b in batch if isinstance(b, BadSample)]
    batch = [b for b in batch if not isinstance(b, BadSample)]
    if not batch:
        return torch.zeros(0), [], Metas([], bad)
    images = torch.stack([b[0] for b in batch])
    return images, [b[1] for b in batch], Metas([b[2] for b in batch], bad)
