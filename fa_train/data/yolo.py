"""YOLO-format reader for Ultralytics' layout: a data.yaml naming the splits, one label .txt per image.

The yaml: `path` (the dataset root; relative to the yaml's folder, or the yaml's folder when absent),
`train`, `val`, optional `test` (each a folder of images searched recursively, a .txt list of image paths,
or a list of those, relative to the root), `names` (a list, or an {index: name} map) and optionally `nc`.
The label file of `.../images/.../x.jpg` is `.../labels/.../x.txt` (the last `images` path component
replaced); an image path without an `images` component keeps its label beside it, as Ultralytics does.
Each line is `class cx cy w h`, normalised to the image.

YOLO labels carry no ignore flag (nothing is an ignore region) and no image size: sizes are read from the image
headers. Image ids are 1..N in sorted path order; category ids 1..K. The rules for bad input are the VOC and
COCO readers' (DataError naming the file, and here the line; boxes clipped or dropped and counted), plus:
an image without a label file is an image without objects; a label file without an image is listed as an
orphan, never an error; a line of more than 5 fields (segments, keypoints, a confidence column) is refused,
since only detection boxes are read; an empty label file is an image without objects (counted); images with an
EXIF orientation are read upright, as Ultralytics reads them (its exif_size / exif_transpose): the labels refer to
the rotated image a viewer shows, and the images are named.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml
from PIL import Image, UnidentifiedImageError

from .common import (DataError, DetectionDataset, Record, SanitizeStats, exif_orientation, sanitize_boxes,
                     upright_size)

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
NOT_SPLITS = ("path", "names", "nc", "download")  # data.yaml keys that never name images
# label writers round to ~6 digits: a corner this close outside [0, 1] is rounding, not a box to clip and count
EDGE_TOLERANCE = 1e-5


@dataclass
class YoloDataYaml:
    file: str
    root: str
    names: List[str]
    splits: Dict[str, object]  # key -> the yaml value (str or list of str)


@dataclass
class _Source:
    """One folder or list file of a split: its images and, for a folder, the folder."""
    images: List[str]
    folder: Optional[str] = None


def _names(raw, nc, file: str) -> List[str]:
    if raw is None:
        if nc is None:
            raise DataError(f"{file}: 'names' is missing (a list of class names, or an {{index: name}} map)")
        names = [f"class_{i}" for i in range(nc)]  # Ultralytics' names for a yaml that gives only nc
    elif isinstance(raw, list):
        names = raw
    elif isinstance(raw, dict):
        try:
            by_index = {int(k): v for k, v in raw.items()}
        except (TypeError, ValueError):
            raise DataError(f"{file}: 'names' map keys must be class indices 0..K-1, got {list(raw)}") from None
        if sorted(by_index) != list(range(len(by_index))):
            raise DataError(f"{file}: 'names' map keys must be the class indices 0..{len(by_index) - 1}, "
                            f"got {sorted(by_index)}")
        names = [by_index[i] for i in range(len(by_index))]
    else:
        raise DataError(f"{file}: 'names' must be a list or an {{index: name}} map, got {type(raw).__name__}")
    for i, n in enumerate(names):
        if n is None or isinstance(n, (list, dict)):
            raise DataError(f"{file}: 'names' entry {i} is {n!r}, not a class name")
    names = [str(n) for n in names]
    if not names:
        raise DataError(f"{file}: 'names' is empty")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{file}: 'names' repeats {', '.join(map(repr, dup))} (per-class results are keyed by name)")
    if nc is not None and nc != len(names):
        raise DataError(f"{file}: 'nc' is {nc} but 'names' has {len(names)} classes")
    return names


def read_data_yaml(file: str) -> YoloDataYaml:
    """Parse and check data.yaml; the root folder must exist (split folders are checked when read)."""
    if os.path.isdir(file):
        raise DataError(f"{file}: is a folder; --data yolo: takes the dataset's yaml, e.g. "
                        f"yolo:{os.path.join(file, 'data.yaml')}")
    if not os.path.isfile(file):
        raise DataError(f"{file}: dataset yaml is missing")
    try:
        with open(file, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: not a valid yaml file ({e})") from e
    except OSError as e:
        raise DataError(f"{file}: cannot read the dataset yaml ({e})") from e
    if not isinstance(data, dict):
        raise DataError(f"{file}: expected a mapping with path, train, val, names; got {type(data).__name__}")
    nc = data.get("nc")
    if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int) or nc <= 0):
        raise DataError(f"{file}: 'nc' must be a positive number of classes, got {nc!r}")
    names = _names(data.get("names"), nc, file)
    here = os.path.dirname(os.path.abspath(file))
    path = data.get("path")
    if path is not None and not isinstance(path, str):
        raise DataError(f"{file}: 'path' must be a folder, got {path!r}")
    # unlike Ultralytics (which resolves a relative `path` against its datasets_dir setting), the yaml's folder
    root = os.path.normpath(os.path.join(here, os.path.expanduser(path))) if path else here
    if not os.path.isdir(root):
        raise DataError(f"{file}: dataset root 'path: {path}' is missing (resolved to {root})")
    splits = {k: v for k, v in data.items() if k not in NOT_SPLITS and isinstance(k, str)
              and (v is None or isinstance(v, (str, list)))}
    return YoloDataYaml(os.path.abspath(file), root, names, splits)


def label_path(image: str) -> str:
    """`.../images/.../x.jpg` -> `.../labels/.../x.txt` (the last `images` component); beside it otherwise."""
    parts = image.split(os.sep)
    for i in range(len(parts) - 2, -1, -1):  # a folder component, never the file name
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return os.path.splitext(os.sep.join(parts))[0] + ".txt"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _folder_images(folder: str) -> List[str]:
    out = []
    for d, dirs, files in os.walk(folder):
        dirs.sort()
        out += [os.path.join(d, f) for f in sorted(files) if _is_image(f)]
    return out


def _list_images(list_file: str) -> List[str]:
    """Image paths of a list file, relative ones against the list file's folder (Ultralytics' `./x.jpg`)."""
    base = os.path.dirname(list_file)
    try:
        with open(list_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{list_file}: cannot read the image list ({e})") from e
    out = []
    for n, line in enumerate(lines, 1):
        entry = line.strip()
        if not entry:
            continue
        p = os.path.normpath(os.path.join(base, os.path.expanduser(entry)))
        where = f"{list_file}: line {n}"
        if not _is_image(p):
            raise DataError(f"{where}: {entry!r} is not an image ({', '.join(IMAGE_SUFFIXES)})")
        if not os.path.isfile(p):
            raise DataError(f"{where}: image {entry!r} is missing (resolved to {p})")
        out.append(p)
    return out


def _split_sources(spec: YoloDataYaml, key: str) -> List[_Source]:
    if key not in spec.splits:
        known = ", ".join(spec.splits) or "none"
        raise DataError(f"{spec.file}: no split {key!r} (split keys in this yaml: {known})")
    value = spec.splits[key]
    entries = value if isinstance(value, list) else [value]
    if value is None or not entries or not all(isinstance(e, str) and e.strip() for e in entries):
        raise DataError(f"{spec.file}: split {key!r} is {value!r}; expected a folder, a .txt image list, "
                        "or a list of those")
    sources = []
    for entry in entries:
        p = os.path.normpath(os.path.join(spec.root, os.path.expanduser(entry.strip())))
        if os.path.isdir(p):
            src = _Source(_folder_images(p), folder=p)
        elif os.path.isfile(p) and p.lower().endswith(".txt"):
            src = _Source(_list_images(p))
        elif os.path.exists(p):
            raise DataError(f"{spec.file}: split {key!r} entry {entry!r} ({p}) is neither a folder nor a .txt "
                            "image list")
        else:
            raise DataError(f"{spec.file}: split {key!r} folder {entry!r} is missing (resolved to {p})")
        if not src.images:
            raise DataError(f"{spec.file}: split {key!r}: no images in {p} ({', '.join(IMAGE_SUFFIXES)})")
        sources.append(src)
    return sources


def _orphan_labels(sources: Sequence[_Source]) -> List[str]:
    """Label files in the split's label folders whose image does not exist. A folder split uses every image in
    it, so any other label file under its label folder is an orphan; beside a list file's images, a label file
    whose image exists but is not listed belongs to another list, not to nobody."""
    orphans = set()
    for src in sources:
        expected = {label_path(f) for f in src.images}
        if src.folder is not None:
            d = os.path.dirname(label_path(os.path.join(src.folder, "x.jpg")))
            orphans.update(t for w, _, fs in os.walk(d) for t in (os.path.join(w, f) for f in fs)
                           if t.endswith(".txt") and t not in expected)
            continue
        image_dirs: Dict[str, set] = {}  # label folder -> the image folders whose labels it holds
        for f in src.images:
            image_dirs.setdefault(os.path.dirname(label_path(f)), set()).add(os.path.dirname(f))
        for d, dirs in image_dirs.items():
            if not os.path.isdir(d):
                continue
            stems = {os.path.splitext(f)[0] for i in dirs for f in os.listdir(i) if _is_image(f)}
            orphans.update(t for t in (os.path.join(d, f) for f in os.listdir(d))
                           if t.endswith(".txt") and t not in expected
                           and os.path.splitext(os.path.basename(t))[0] not in stems)
    return sorted(orphans)


def _number(text: str, what: str, where: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise DataError(f"{where}: {what} {text!r} is not a number") from None
    if not math.isfinite(v):
        raise DataError(f"{where}: {what} {text!r} is not a finite number")
    return v


def parse_label_file(path: str, names: Sequence[str], data_yaml: str) -> Tuple[np.ndarray, np.ndarray]:
    """(labels [M] int64, boxes [M,4] float64 normalised cx, cy, w, h) of one label file."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the label file ({e})") from e
    labels, boxes = [], []
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}: line {n}"
        if len(fields) > 5:
            raise DataError(f"{where}: {len(fields)} fields; only detection boxes 'class cx cy w h' (5 fields) are "
                            "read, not segments, keypoints or a confidence column")
        if len(fields) < 5:
            raise DataError(f"{where}: {len(fields)} fields, expected 5: 'class cx cy w h'")
        c = _number(fields[0], "class", where)
        if c != int(c):
            raise DataError(f"{where}: class {fields[0]!r} is not an integer")
        if not 0 <= c < len(names):
            raise DataError(f"{where}: class index {int(c)} is not in 'names' of {data_yaml} "
                            f"(0..{len(names) - 1})")
        labels.append(int(c))
        boxes.append([_number(v, k, where) for v, k in zip(fields[1:], ("cx", "cy", "w", "h"))])
    return np.array(labels, np.int64), np.array(boxes, np.float64).reshape(-1, 4)


def _image_header(path: str) -> Optional[Tuple[int, int, int]]:
    """(upright width, upright height, EXIF orientation) from the header alone; None when unreadable (loading names
    the problem)."""
    try:
        with Image.open(path) as im:
            o = exif_orientation(im)
            return (*upright_size(im.size[0], im.size[1], o), o)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError):
        return None


def to_pixel_boxes(cxcywh: np.ndarray, width: int, height: int) -> np.ndarray:
    """Normalised cx, cy, w, h -> xyxy in continuous pixels; corners within EDGE_TOLERANCE of [0, 1] are snapped."""
    c = np.asarray(cxcywh, np.float64).reshape(-1, 4)
    xyxy = np.concatenate([c[:, :2] - c[:, 2:] / 2, c[:, :2] + c[:, 2:] / 2], 1)
    near0 = (xyxy < 0) & (xyxy >= -EDGE_TOLERANCE)
    near1 = (xyxy > 1) & (xyxy <= 1 + EDGE_TOLERANCE)
    xyxy[near0], xyxy[near1] = 0.0, 1.0
    return xyxy * np.array([width, height, width, height], np.float64)


def read_yolo(data_yaml: str, split_keys: Sequence[str], max_images: Optional[int] = None):
    """-> (records, stats, class names, orphan label files, images without a label file, EXIF-rotated images,
    empty label files)."""
    spec = read_data_yaml(data_yaml)
    sources = [s for key in split_keys for s in _split_sources(spec, key)]
    images = sorted({f for src in sources for f in src.images})
    if max_images is not None:
        images = images[:max_images]
    stats = SanitizeStats()
    records: List[Record] = []
    unlabelled: List[str] = []
    rotated: List[str] = []
    empty: List[str] = []
    for image_id, img in enumerate(images, 1):
        lbl = label_path(img)
        has_labels = os.path.isfile(lbl)
        if not has_labels:
            unlabelled.append(img)
        labels, cxcywh = parse_label_file(lbl, spec.names, spec.file) if has_labels else \
            (np.zeros(0, np.int64), np.zeros((0, 4)))
        if has_labels and not len(labels):
            empty.append(lbl)
        header = _image_header(img)
        if header is None:  # kept: loading it raises (or `--bad-images skip` skips it), as for VOC and COCO
            width = height = 0
            boxes, keep = np.zeros((0, 4), np.float32), np.zeros(0, bool)
            labels = labels[:0]
        else:
            width, height, orientation = header
            if orientation != 1:
                rotated.append(img)
            boxes, keep = sanitize_boxes(to_pixel_boxes(cxcywh, width, height), width, height, stats,
                                         lbl if has_labels else img)
        records.append(Record(image_id=image_id, file=img, width=width, height=height, boxes=boxes[keep],
                              labels=labels[keep], ignore=np.zeros(int(keep.sum()), bool),
                              source=lbl if has_labels else img, upright=True))
    return records, stats, spec.names, _orphan_labels(sources), unlabelled, rotated, empty


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def yolo_dataset(data_yaml: str, split_spec: str, img_size: int, train: bool, max_images: Optional[int] = None,
                 log: Optional[Callable[[str], None]] = print) -> DetectionDataset:
    """`split_spec`: data.yaml split keys, one ("val") or several joined by '+' ("train+val")."""
    keys = [k.strip() for k in split_spec.split("+") if k.strip()]
    if not keys:
        raise DataError(f"{data_yaml}: empty split {split_spec!r}; give a split key of the yaml, e.g. val")
    records, stats, names, orphans, unlabelled, rotated, empty = read_yolo(data_yaml, keys, max_images)
    ds = DetectionDataset(records, names, img_size, train=train, name=f"yolo:{data_yaml}:{split_spec}",
                          stats=stats)
    ds.orphan_labels = orphans
    ds.images_without_labels = unlabelled
    ds.exif_rotated = rotated
    ds.empty_label_files = empty
    if log is not None:
        if orphans:
            shown = ", ".join(orphans[:3]) + (f" and {len(orphans) - 3} more" if len(orphans) > 3 else "")
            log(f"data {ds.name}: {len(orphans)} label files without an image, not read: {shown}")
        if unlabelled:
            log(f"data {ds.name}: {len(unlabelled)} of {len(records)} images have no label file (read as images "
                f"without objects), e.g. no {label_path(unlabelled[0])}")
        if empty:
            log(f"data {ds.name}: {_plural(len(empty), 'label file is', 'label files are')} empty (read as images "
                f"without objects), e.g. {empty[0]}")
        if rotated:
            # as Ultralytics reads them: labels refer to the image a viewer shows
            log(f"data {ds.name}: {_plural(len(rotated), 'image carries', 'images carry')} an EXIF orientation: read "
                f"upright (labels refer to the rotated image, as in Ultralytics), e.g. {rotated[0]}")

    return ds
