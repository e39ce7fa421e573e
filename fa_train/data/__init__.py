"""Data: VOC, COCO and YOLO-format readers, the synthetic shapes dataset, letterbox transforms, collate.

`build_dataset("voc:/data/VOCdevkit", split="2007:test", ...)`, `"coco:/data/coco"`, `"yolo:/data/x/data.yaml"`,
or `"synth"`.
"""
from __future__ import annotations

from typing import Optional

from .common import DataError, DetectionDataset, Record, collate, load_image
from .coco import coco_dataset
from .synthetic import SHAPES_CLASSES, SHAPES_YEAR, ensure_shapes
from .transforms import letterbox, unletterbox_boxes
from .voc import VOC_CLASSES, voc_dataset
from .yolo import yolo_dataset

DEFAULT_SPLITS = {
    "voc": {"train": "2007+2012:trainval", "test": "2007:test"},
    "coco": {"train": "train2017", "test": "val2017"},
    "yolo": {"train": "train", "test": "val"},  # data.yaml's split keys
    "synth": {"train": f"{SHAPES_YEAR}:train", "test": f"{SHAPES_YEAR}:test"},
}


def parse_data_spec(spec: str):
    """'voc:PATH' | 'coco:PATH' | 'yolo:PATH/data.yaml' | 'synth' | 'synth:N' -> (kind, path or N or "")."""
    kind, _, rest = (spec or "synth").partition(":")
    if kind not in DEFAULT_SPLITS:
        raise DataError(f"--data {spec!r}: expected voc:PATH, coco:PATH, yolo:PATH/data.yaml or synth[:NUM_IMAGES]")
    examples = {"voc": "voc:/data/VOCdevkit", "coco": "coco:/data/coco", "yolo": "yolo:/data/coco8/data.yaml"}
    if kind in examples and not rest:
        raise DataError(f"--data {spec!r}: {kind} needs a path, e.g. {examples[kind]}")
    if kind == "synth" and rest and not (rest.isdigit() and int(rest) > 0):
        raise DataError(f"--data {spec!r}: NUM_IMAGES of synth[:NUM_IMAGES] must be a positive integer, e.g. synth:1000")
    return kind, rest


def build_dataset(spec: str, role: str, img_size: int, split: Optional[str] = None,
                  max_images: Optional[int] = None, synth_seed: int = 0, log=print) -> DetectionDataset:
    """The dataset for `role` ("train" or "test"); `split` overrides the default split of that role."""
    kind, rest = parse_data_spec(spec)
    split = split or DEFAULT_SPLITS[kind][role]
    train = role == "train"
    if kind == "voc":
        return voc_dataset(rest, split, img_size, train, max_images=max_images)
    if kind == "coco":
        return coco_dataset(rest, split, img_size, train, max_images=max_images)
    if kind == "yolo":
        return yolo_dataset(rest, split, img_size, train, max_images=max_images, log=log)
    n = int(rest) if rest else 1000
    devkit = ensure_shapes(n, synth_seed, log=log)
    ds = voc_dataset(devkit, split, img_size, train, class_names=SHAPES_CLASSES, max_images=max_images)
    ds.name = f"synth:{n}:{split}"
    return ds


__all__ = ["DataError", "DetectionDataset", "Record", "collate", "load_image", "letterbox", "unletterbox_boxes",
           "VOC_CLASSES", "SHAPES_CLASSES", "build_dataset", "parse_data_spec", "ensure_shapes", "DEFAULT_SPLITS"]
