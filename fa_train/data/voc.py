"""PASCAL VOC reader for the real VOCdevkit layout (also serves the synthetic shapes dataset).

`VOCdevkit/VOC<year>/{Annotations,JPEGImages,ImageSets/Main/<split>.txt}`; several (year, split) pairs at
once, e.g. "2007+2012:trainval". `difficult` objects are kept with an ignore flag. XML is parsed with
defusedxml (no external entities, no entity expansion).
"""
from __future__ import annotations

import os
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
from defusedxml import ElementTree as ET

from .common import DataError, DetectionDataset, Record, SanitizeStats, sanitize_boxes

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def parse_sets(spec: str) -> List[Tuple[str, str]]:
    """"2007+2012:trainval" -> [("2007","trainval"), ("2012","trainval")]; "2007:test" -> [("2007","test")]."""
    try:
        years, split = spec.split(":")
    except ValueError:
        raise DataError(f"VOC set spec {spec!r} must look like '2007+2012:trainval'") from None
    return [(y.strip(), split.strip()) for y in years.split("+") if y.strip()]


def _text(node, tag, source):
    el = node.find(tag)
    if el is None or el.text is None:
        raise DataError(f"{source}: missing <{tag}>")
    return el.text.strip()


def parse_voc_xml(path: str, class_to_idx: dict, stats: SanitizeStats, image_id: int, image_dir: str) -> Record:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DataError(f"{path}: malformed XML ({e})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read annotation ({e})") from e
    filename = _text(root, "filename", path)
    if os.path.isabs(filename) or ".." in filename.replace("\\", "/").split("/"):
        raise DataError(f"{path}: <filename> {filename!r} must be a plain name inside JPEGImages")
    size = root.find("size")
    if size is None:
        raise DataError(f"{path}: missing <size>")
    try:
        width, height = int(float(_text(size, "width", path))), int(float(_text(size, "height", path)))
    except ValueError as e:
        raise DataError(f"{path}: <size> is not numeric ({e})") from e
    if width <= 0 or height <= 0:
        raise DataError(f"{path}: <size> {width}x{height} is not a valid image size")
    boxes, labels, ignore = [], [], []
    for i, obj in enumerate(root.findall("object")):
        name = _text(obj, "name", path)
        if name not in class_to_idx:
            raise DataError(f"{path}: object {i} has unknown class {name!r}; known classes: "
                            f"{', '.join(class_to_idx)}")
        bb = obj.find("bndbox")
        if bb is None:
            raise DataError(f"{path}: object {i} ({name}) has no <bndbox>")
        try:
            # VOC pixel indices are 1-based and inclusive: xmin-1 .. xmax as a continuous box
            b = [float(_text(bb, k, f"{path}: object {i} <bndbox>")) for k in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError as e:
            raise DataError(f"{path}: object {i} ({name}) <bndbox> is not numeric ({e})") from e
        boxes.append([b[0] - 1, b[1] - 1, b[2], b[3]])
        labels.append(class_to_idx[name])
        diff = obj.find("difficult")
        ignore.append(diff is not None and diff.text is not None and diff.text.strip() == "1")
    boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    boxes, keep = sanitize_boxes(boxes, width, height, stats, path)
    return Record(image_id=image_id, file=os.path.join(image_dir, filename), width=width, height=height,
                  boxes=boxes[keep], labels=np.array(labels, dtype=np.int64)[keep],
                  ignore=np.array(ignore, dtype=bool)[keep], source=path)


def read_voc(devkit: str, sets: Sequence[Tuple[str, str]], class_names: Sequence[str] = VOC_CLASSES,
             max_images: Optional[int] = None) -> Tuple[List[Record], SanitizeStats]:
    class_to_idx = {c: i for i, c in enumerate(class_names)}
    stats = SanitizeStats()
    records: List[Record] = []
    for year, split in sets:
        root = os.path.join(devkit, f"VOC{year}")
        list_file = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
        if not os.path.isfile(list_file):
            raise DataError(f"{list_file}: image list is missing (expected VOCdevkit/VOC{year}/ImageSets/Main/"
                            f"{split}.txt under {devkit})")
        with open(list_file) as f:
            ids = [line.split()[0] for line in f if line.strip()]
        for stem in ids:
            if max_images is not None and len(records) >= max_images:
                break
            if "/" in stem or "\\" in stem or stem in ("..", "."):
                raise DataError(f"{list_file}: entry {stem!r} is not a plain image id")
            xml = os.path.join(root, "Annotations", f"{stem}.xml")
            records.append(parse_voc_xml(xml, class_to_idx, stats, len(records) + 1,
                                         os.path.join(root, "JPEGImages")))
    return records, stats


def voc_dataset(devkit: str, spec: str, img_size: int, train: bool, class_names: Iterable[str] = VOC_CLASSES,
                max_images: Optional[int] = None) -> DetectionDataset:
    class_names = list(class_names)
    records, stats = read_voc(devkit, parse_sets(spec), class_names, max_images)
    return DetectionDataset(records, class_names, img_size, train=train, name=f"voc:{devkit}:{spec}", stats=stats)
