"""Readers (real VOC files, synthetic shapes, COCO through pycocotools), letterbox, and bad input."""
import json
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from conftest import shared_path
from fa_train.data import DataError, build_dataset, letterbox, unletterbox_boxes
from fa_train.data.coco import coco_dataset
from fa_train.data.synthetic import SHAPES_CLASSES, generate_shapes, make_image
from fa_train.data.voc import VOC_CLASSES, parse_sets, read_voc, voc_dataset


# ---------------------------------------------------------------------------------------------- VOC, real files

def test_voc_reader_on_real_files():
    devkit = shared_path("data", "VOCdevkit")
    records, stats = read_voc(devkit, parse_sets("2007:test"))
    by_stem = {os.path.basename(r.file): r for r in records}
    assert set(by_stem) == {"000004.jpg", "000018.jpg", "000049.jpg", "000059.jpg"}
    assert {VOC_CLASSES[l] for l in by_stem["000004.jpg"].labels} == {"car"}
    assert {VOC_CLASSES[l] for l in by_stem["000018.jpg"].labels} == {"dog"}
    r59 = by_stem["000059.jpg"]
    assert {VOC_CLASSES[l] for l in r59.labels} == {"person", "chair", "tvmonitor"}
    assert r59.ignore.sum() == 1  # one difficult object kept as an ignore flag
    # sizes match the JPEG files and boxes are within the images
    for r in records:
        with Image.open(r.file) as im:
            assert im.size == (r.width, r.height)
        assert (r.boxes[:, 2] <= r.width).all() and (r.boxes[:, 3] <= r.height).all()
        assert (r.boxes[:, :2] >= 0).all()
    # the XML box is 1-based inclusive: xmin-1 .. xmax
    import defusedxml.ElementTree as ET

    obj = ET.parse(os.path.join(devkit, "VOC2007", "Annotations", "000018.xml")).getroot().find("object/bndbox")
    xmin, ymin = float(obj.find("xmin").text), float(obj.find("ymin").text)
    assert by_stem["000018.jpg"].boxes[0, 0] == xmin - 1 and by_stem["000018.jpg"].boxes[0, 1] == ymin - 1


def test_voc_several_years_and_splits(tmp_path):
    src = shared_path("data", "VOCdevkit", "VOC2007")
    shutil.copytree(src, tmp_path / "VOC2007")
    shutil.copytree(src, tmp_path / "VOC2012")
    with open(tmp_path / "VOC2012" / "ImageSets" / "Main" / "trainval.txt", "w") as f:
        f.write("000004\n000018\n")
    with open(tmp_path / "VOC2007" / "ImageSets" / "Main" / "trainval.txt", "w") as f:
        f.write("000049\n")
    ds = voc_dataset(str(tmp_path), "2007+2012:trainval", 128, train=True)
    assert len(ds) == 3
    assert [os.path.basename(r.file) for r in ds.records] == ["000049.jpg", "000004.jpg", "000018.jpg"]
    assert "VOC2012" in ds.records[1].file
    assert len({r.image_id for r in ds.records}) == 3
    img, target, meta = ds[0]
    assert img.shape == (3, 128, 128) and 0 <= img.min() and img.max() <= 1


def test_voc_dataset_letterbox_maps_back_exactly():
    ds = build_dataset("voc:" + shared_path("data", "VOCdevkit"), "test", 224)
    for i in range(len(ds)):
        _, target, meta = ds[i]
        back = unletterbox_boxes(target["boxes"].double(), meta).numpy()
        np.testing.assert_allclose(back, ds.records[i].boxes, atol=1e-3)


# ---------------------------------------------------------------------------------------------- letterbox

@pytest.mark.parametrize("h,w,size", [(100, 200, 64), (375, 500, 416), (77, 31, 96), (64, 64, 64)])
def test_letterbox_round_trip(h, w, size):
    img = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, w, h], [w * 0.25, h * 0.1, w * 0.5, h * 0.9]], np.float32)
    out, b, meta = letterbox(img, boxes, size)
    assert out.shape == (3, size, size)
    # the whole-image box covers exactly the resized, unpadded region
    assert b[0, 0] == meta["pad"][0] and b[0, 1] == meta["pad"][1]
    assert abs((b[0, 2] - b[0, 0]) - round(w * size / max(h, w))) < 1e-3
    np.testing.assert_allclose(unletterbox_boxes(b, meta), boxes, atol=1e-3)
    # the padding is the pad value and the image region is the image (corner pixel, no resize when equal)
    if (h, w) == (size, size):
        np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), img / 255.0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- synthetic

def test_shapes_dataset_deterministic_and_fast(tmp_path):
    t0 = time.time()
    devkit = generate_shapes(str(tmp_path / "a"), 100, seed=7)
    elapsed = time.time() - t0
    assert elapsed < 10, f"100 images took {elapsed:.1f}s (1,000 must take under 30 s)"
    devkit2 = generate_shapes(str(tmp_path / "b"), 100, seed=7)
    for stem in ("000000", "000057"):
        a = open(os.path.join(devkit, "VOCshapes", "Annotations", stem + ".xml")).read()
        b = open(os.path.join(devkit2, "VOCshapes", "Annotations", stem + ".xml")).read()
        assert a == b
    ds = voc_dataset(devkit, "shapes:train", 128, train=False, class_names=SHAPES_CLASSES)
    ds_test = voc_dataset(devkit, "shapes:test", 128, train=False, class_names=SHAPES_CLASSES)
    assert len(ds) == 80 and len(ds_test) == 20
    labels = np.concatenate([r.labels for r in ds.records])
    assert set(labels.tolist()) == set(range(len(SHAPES_CLASSES)))  # every class occurs
    sizes = np.concatenate([r.boxes[:, 2] - r.boxes[:, 0] for r in ds.records])
    assert sizes.min() < 20 < 40 < sizes.max()  # varied sizes


def test_shapes_boxes_are_tight():
    img, objects = make_image(3, seed=0)
    for cls, (x0, y0, x1, y1) in objects:
        assert 0 <= x0 < x1 <= img.width and 0 <= y0 < y1 <= img.height


# ---------------------------------------------------------------------------------------------- COCO

def _write_coco(root, images, annotations, categories, split="val2017", make_images=True):
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, split), exist_ok=True)
    if make_images:
        for im in images:
            Image.new("RGB", (im["width"], im["height"]), (100, 120, 140)).save(os.path.join(root, split, im["file_name"]))
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def test_coco_reader(tmp_path):
    cats = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    images = [{"id": 5, "file_name": "a.jpg", "width": 64, "height": 48},
              {"id": 9, "file_name": "b.jpg", "width": 32, "height": 32}]  # b has no annotations
    anns = [{"id": 1, "image_id": 5, "category_id": 18, "bbox": [1, 2, 10, 20], "area": 150, "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 3, "bbox": [30, 5, 20, 20], "area": 400, "iscrowd": 1},
            {"id": 3, "image_id": 5, "category_id": 1, "bbox": [60, 40, 10, 10], "area": 20, "iscrowd": 0}]
    _write_coco(str(tmp_path), images, anns, cats)
    ds = coco_dataset(str(tmp_path), "val2017", 64, train=False)
    assert ds.class_names == ["person", "car", "dog"]  # sorted by category id
    assert ds.label_to_cat_id == [1, 3, 18]
    assert len(ds) == 2
    r = ds.records[0]
    assert r.image_id == 5
    assert [ds.label_to_cat_id[l] for l in r.labels] == [18, 3, 1]
    assert r.ignore.tolist() == [False, True, False]  # crowd -> ignore region
    np.testing.assert_allclose(r.boxes[0], [1, 2, 11, 22])
    np.testing.assert_allclose(r.boxes[2], [60, 40, 64, 48])  # clipped to the image
    assert ds.stats.clipped == 1
    assert len(ds.records[1].boxes) == 0
    img, target, meta = ds[1]
    assert target["boxes"].shape == (0, 4)


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.jpg", "x/../../y.jpg"])
def test_coco_refuses_escaping_file_names(tmp_path, bad):
    _write_coco(str(tmp_path), [{"id": 1, "file_name": bad, "width": 8, "height": 8}], [],
                [{"id": 1, "name": "a"}], make_images=False)
    with pytest.raises(DataError, match="file_name .* refused"):
        coco_dataset(str(tmp_path), "val2017", 64, train=False)


# ---------------------------------------------------------------------------------------------- bad input

@pytest.fixture
def voc_copy(tmp_path):
    dst = tmp_path / "VOCdevkit"
    shutil.copytree(shared_path("data", "VOCdevkit"), dst)
    return dst


def _ann(voc_copy, stem="000018"):
    return voc_copy / "VOC2007" / "Annotations" / f"{stem}.xml"


def test_unknown_class_lists_known_ones(voc_copy):
    p = _ann(voc_copy)
    p.write_text(p.read_text().replace("<name>dog</name>", "<name>doggo</name>"))
    with pytest.raises(DataError, match=r"000018.xml.*unknown class 'doggo'.*aeroplane, bicycle"):
        read_voc(str(voc_copy), parse_sets("2007:test"))


def test_xml_without_bndbox(voc_copy):
    p = _ann(voc_copy)
    txt = p.read_text()
    start, end = txt.index("<bndbox>"), txt.index("</bndbox>") + len("</bndbox>")
    p.write_text(txt[:start] + txt[end:])
    with pytest.raises(DataError, match=r"000018.xml: object 0 \(dog\) has no <bndbox>"):
        read_voc(str(voc_copy), parse_sets("2007:test"))


def test_malformed_xml(voc_copy):
    _ann(voc_copy).write_text("<annotation><filename>")
    with pytest.raises(DataError, match="000018.xml: malformed XML"):
        read_voc(str(voc_copy), parse_sets("2007:test"))


def test_xml_entity_expansion_refused(voc_copy):
    _ann(voc_copy).write_text('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "xxxxxxxx">]><annotation>&x;</annotation>')
    with pytest.raises(Exception) as e:
        read_voc(str(voc_copy), parse_sets("2007:test"))
    assert "Entit" in type(e.value).__name__ or "entit" in str(e.value).lower() or "000018" in str(e.value)


def test_box_outside_image_is_clipped_and_counted(voc_copy):
    p = _ann(voc_copy)
    txt = p.read_text()
    import re

    txt = re.sub(r"<xmax>\d+</xmax>", "<xmax>99999</xmax>", txt, count=1)
    p.write_text(txt)
    records, stats = read_voc(str(voc_copy), parse_sets("2007:test"))
    r = next(r for r in records if r.file.endswith("000018.jpg"))
    assert r.boxes[0, 2] == r.width
    assert stats.clipped == 1 and str(p) in stats.per_file


def test_zero_area_box_is_dropped_and_counted(voc_copy):
    import re

    p = _ann(voc_copy)
    txt = p.read_text()
    xmin = re.search(r"<xmin>(\d+)</xmin>", txt).group(1)
    txt = re.sub(r"<xmax>\d+</xmax>", f"<xmax>{int(xmin) - 1}</xmax>", txt, count=1)
    p.write_text(txt)
    records, stats = read_voc(str(voc_copy), parse_sets("2007:test"))
    r = next(r for r in records if r.file.endswith("000018.jpg"))
    assert len(r.boxes) == 0 and stats.dropped_zero_area == 1


def test_missing_and_corrupt_images(voc_copy):
    ds = voc_dataset(str(voc_copy), "2007:test", 64, train=False)
    jpg = voc_copy / "VOC2007" / "JPEGImages" / "000004.jpg"
    i = next(i for i, r in enumerate(ds.records) if r.file.endswith("000004.jpg"))
    jpg.write_bytes(jpg.read_bytes()[:200])  # truncated
    with pytest.raises(DataError, match="000004.jpg: corrupt or unreadable image"):
        ds[i]
    jpg.unlink()
    with pytest.raises(DataError, match="000004.jpg: image file is missing"):
        ds[i]


def test_missing_image_list(voc_copy):
    with pytest.raises(DataError, match="ImageSets/Main/trainval.txt"):
        read_voc(str(voc_copy), parse_sets("2007:trainval"))


def test_bad_data_spec():
    with pytest.raises(DataError, match="--data"):
        build_dataset("kitti:/x", "train", 64)
    with pytest.raises(DataError, match="needs a path"):
        build_dataset("voc", "train", 64)
