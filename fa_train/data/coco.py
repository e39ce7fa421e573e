"""MS-COCO reader for `annotations/instances_<split>.json` through pycocotools.

Category ids are mapped to contiguous 0-based labels (sorted by id) and back for results; crowd boxes are
ignore regions; images without annotations are kept. `file_name`s that are absolute or contain `..` are
refused, so annotation files cannot reach outside the image folder.
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import List, Optional

import numpy as np

from .common import DataError, DetectionDataset, Record, SanitizeStats, sanitize_boxes


def _image_dir(root: str, split: str) -> str:
    d = os.path.join(root, split)
    if os.path.isdir(d):
        return d
    # the 2014 minival/valminusminival annotation splits point into val2014
    for prefix in ("valminusminival", "minival"):
        if split.startswith(prefix):
            alt = os.path.join(root, "val" + split[len(prefix):])
            if os.path.isdir(alt):
                return alt
    raise DataError(f"{d}: image folder for split {split!r} is missing")


def read_coco(root: str, splits: List[str], max_images: Optional[int] = None):
    from pycocotools.coco import COCO

    stats = SanitizeStats()
    records: List[Record] = []
    class_names: Optional[List[str]] = None
    cat_ids: Optional[List[int]] = None
    for split in splits:
        ann_file = os.path.join(root, "annotations", f"instances_{split}.json")
        if not os.path.isfile(ann_file):
            raise DataError(f"{ann_file}: annotation file is missing")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                coco = COCO(ann_file)
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{ann_file}: not a valid COCO instances file ({e})") from e
        cats = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
        names, ids = [c["name"] for c in cats], [c["id"] for c in cats]
        if class_names is None:
            class_names, cat_ids = names, ids
        elif (names, ids) != (class_names, cat_ids):
            raise DataError(f"{ann_file}: categories differ from the first split's")
        cat_to_label = {cid: i for i, cid in enumerate(cat_ids)}
        img_dir = _image_dir(root, split)
        for img_id in sorted(coco.getImgIds()):
            if max_images is not None and len(records) >= max_images:
                break
            info = coco.loadImgs(img_id)[0]
            fname = str(info.get("file_name", ""))
            if not fname or os.path.isabs(fname) or ".." in fname.replace("\\", "/").split("/"):
                raise DataError(f"{ann_file}: image {img_id} file_name {fname!r} is refused "
                                f"(must be a relative path inside {img_dir}, without '..')")
            boxes, labels, ignore, area = [], [], [], []
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=None)):
                if ann["category_id"] not in cat_to_label:
                    raise DataError(f"{ann_file}: annotation {ann.get('id')} has unknown category_id "
                                    f"{ann['category_id']}; known: {cat_ids}")
                bbox = ann.get("bbox")
                if bbox is None or len(bbox) != 4:
                    raise DataError(f"{ann_file}: annotation {ann.get('id')} has no valid 'bbox'")
                x, y, w, h = (float(v) for v in bbox)
                boxes.append([x, y, x + w, y + h])
                labels.append(cat_to_label[ann["category_id"]])
                ignore.append(bool(ann.get("iscrowd", 0)))
                area.append(float(ann.get("area", w * h)))
            width, height = int(info["width"]), int(info["height"])
            b = np.array(boxes, dtype=np.float32).reshape(-1, 4)
            b, keep = sanitize_boxes(b, width, height, stats, f"{ann_file}#image{img_id}")
            records.append(Record(image_id=int(img_id), file=os.path.join(img_dir, fname), width=width,
                                  height=height, boxes=b[keep], labels=np.array(labels, np.int64)[keep],
                                  ignore=np.array(ignore, bool)[keep], area=np.array(area, np.float32)[keep],
                                  source=ann_file))
    if len(splits) > 1 and len({r.image_id for r in records}) != len(records):
        raise DataError(f"COCO splits {splits} share image ids; evaluate them separately")
    return records, stats, class_names, cat_ids


def coco_dataset(root: str, split_spec: str, img_size: int, train: bool,
                 max_images: Optional[int] = None) -> DetectionDataset:
    splits = [s.strip() for s in split_spec.split("+") if s.strip()]
    records, stats, names, cat_ids = read_coco(root, splits, max_images)
    return DetectionDataset(records, names, img_size, train=train, name=f"coco:{root}:{split_spec}",
                            stats=stats, label_to_cat_id=cat_ids)
