"""Issue 24, "a new user's second hour": 16-bit images, EXIF orientation in every reader and in fa-predict,
checkpoint data paths that travel, a truncated cache file, fa-predict's model check, messages that name their
cause, help texts, and the small things (plurals, counts, plot limits, "-" for nothing measured)."""
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from fa_train.data import DataError, load_image

EXIF_ORIENTATION = 0x0112


# ---------------------------------------------------------------------------------------------- helpers

def gradient(w=96, h=64):
    """A smooth 8-bit picture with a distinct corner, so a rotation or a white-out shows."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], -1).astype(np.uint8)
    img[:8, :8] = (255, 0, 0)
    return img


def write_png16(path, arr16):
    """A 16-bit RGB PNG written by hand (Pillow cannot write one): IHDR bit depth 16, colour type 2."""
    h, w, _ = arr16.shape
    raw = b"".join(b"\x00" + arr16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def tag6_jpeg(path, w=120, h=80):
    """A JPEG stored w x h with EXIF orientation 6 (display rotated 90 degrees clockwise: h x w upright); returns
    the decoded stored pixels and the upright pixels a viewer shows (numpy's rotation, not Pillow's transpose)."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.fromarray(gradient(w, h)).save(path, quality=95, exif=exif)
    with Image.open(path) as im:
        stored = np.asarray(im.convert("RGB"))
    return stored, np.rot90(stored, k=-1)


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    """An untrained tiny YOLOv3 checkpoint (4 classes, 64 px): enough for fa-predict's image handling."""
    from fa_train.models import create_model

    torch.manual_seed(0)
    model = create_model("yolov3", 4, width_mult=0.125, depth_mult=0.2)
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    torch.save({"model": model.state_dict(), "arch": model.arch_config(), "class_names": ["a", "b", "c", "d"],
                "config": {"data": {"img_size": 64, "spec": "synth"}}}, path)
    return str(path)


def predict(*args):
    from fa_deploy.predict_cli import predict_main

    return CliRunner().invoke(predict_main, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------- 1. 16-bit images

def test_16bit_grayscale_png_loads_as_its_8bit_copy(tmp_path):
    g8 = gradient()[..., 0]
    g16 = np.minimum(g8.astype(np.uint32) * 257 + 100, 65535).astype(np.uint16)  # a 16-bit export of it
    Image.fromarray(g16).save(tmp_path / "gray16.png")
    with Image.open(tmp_path / "gray16.png") as im:
        assert im.mode.startswith("I")  # Pillow really gives a 16-bit mode
    a = load_image(str(tmp_path / "gray16.png"))
    assert a.dtype == np.uint8 and a.shape == (64, 96, 3)
    assert np.abs(a.astype(int) - g8[..., None].astype(int)).max() <= 1
    Image.fromarray(np.full((4, 4), 40000, np.int32), mode="I").save(tmp_path / "i32.tif")  # "I", 16-bit range
    assert abs(int(load_image(str(tmp_path / "i32.tif"))[0, 0, 0]) - round(40000 / 257)) <= 1


def test_16bit_rgb_png_loads_as_its_8bit_copy(tmp_path):
    rgb8 = gradient()
    write_png16(tmp_path / "rgb16.png", rgb8.astype(np.uint16) * 257)
    a = load_image(str(tmp_path / "rgb16.png"))
    assert np.abs(a.astype(int) - rgb8.astype(int)).max() <= 1


def test_float_image_is_refused_by_name(tmp_path):
    Image.fromarray(np.full((8, 8), 0.5, np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(DataError, match=r"f\.tif: .*32-bit float"):
        load_image(str(tmp_path / "f.tif"))


def test_fa_predict_draws_a_16bit_png_as_its_8bit_copy(random_ckpt, tmp_path):
    g8 = gradient()[..., 1]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(g8.astype(np.uint16) * 257).save(tmp_path / "a" / "x.png")
    Image.fromarray(g8).save(tmp_path / "b" / "x.png")
    for d in ("a", "b"):
        r = predict(tmp_path / d / "x.png", "--weights", random_ckpt, "--conf", "1.0", "--out", tmp_path / f"out_{d}",
                    "--quiet", "--device", "cpu")
        assert r.exit_code == 0, r.output
    p16 = np.asarray(Image.open(tmp_path / "out_a" / "x.png").convert("L")).astype(float)
    p8 = np.asarray(Image.open(tmp_path / "out_b" / "x.png").convert("L")).astype(float)
    assert p16.shape == p8.shape
    assert p16.std() > 20  # not a blank white picture
    assert np.abs(p16 - p8).mean() < 2


# ---------------------------------------------------------------------------------------------- 3. EXIF orientation

def test_load_image_applies_exif_orientation(tmp_path):
    _, upright = tag6_jpeg(tmp_path / "r.jpg")
    a = load_image(str(tmp_path / "r.jpg"))
    assert a.shape == (120, 80, 3)
    np.testing.assert_array_equal(a, upright)


def _yolo_tree(root, label):
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    stored, upright = tag6_jpeg(root / "images" / "val" / "r.jpg")
    (root / "labels" / "val" / "r.txt").write_text(label)
    (root / "data.yaml").write_text("train: images/val\nval: images/val\nnames: [a, b]\n")
    return stored, upright


def test_yolo_labels_refer_to_the_upright_image(tmp_path):
    from fa_train.data import build_dataset

    # a box in the upright (80 wide, 120 tall) frame: x 8..40, y 60..108
    _, upright = _yolo_tree(tmp_path, f"1 {24 / 80} {84 / 120} {32 / 80} {48 / 120}\n")
    logs = []
    ds = build_dataset(f"yolo:{tmp_path / 'data.yaml'}", "test", 128, log=logs.append)
    r = ds.records[0]
    assert (r.width, r.height) == (80, 120)
    np.testing.assert_allclose(r.boxes, [[8, 60, 40, 108]], atol=1e-3)
    img, target, meta = ds[0]
    assert meta["orig_size"] == (120, 80)
    assert any("EXIF orientation" in m and "upright" in m for m in logs), logs


def _voc_tree(root, width, height):
    base = root / "VOC2007"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / d).mkdir(parents=True)
    stored, upright = tag6_jpeg(base / "JPEGImages" / "r.jpg")
    (base / "ImageSets" / "Main" / "test.txt").write_text("r\n")
    (base / "Annotations" / "r.xml").write_text(
        f"<annotation><filename>r.jpg</filename><size><width>{width}</width><height>{height}</height></size>"
        f"<object><name>a</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>30</xmax><ymax>30</ymax></bndbox>"
        f"</object></annotation>")
    return stored, upright


@pytest.mark.parametrize("recorded,frame", [((80, 120), "upright"), ((120, 80), "stored")])
def test_voc_frame_follows_the_recorded_size(tmp_path, recorded, frame):
    from fa_train.data.voc import voc_dataset

    stored, upright = _voc_tree(tmp_path, *recorded)
    ds = voc_dataset(str(tmp_path), "2007:test", 128, False, class_names=["a"])
    img, _, meta = ds[0]
    want = upright if frame == "upright" else stored
    assert meta["orig_size"] == want.shape[:2]


def test_voc_size_that_fits_neither_frame_names_exif(tmp_path):
    from fa_train.data.voc import voc_dataset

    _voc_tree(tmp_path, 100, 100)
    ds = voc_dataset(str(tmp_path), "2007:test", 128, False, class_names=["a"])
    with pytest.raises(DataError, match=r"r\.jpg: .*EXIF orientation 6.*120x80.*80x120.*100x100"):
        ds[0]


@pytest.mark.parametrize("recorded,frame", [((80, 120), "upright"), ((120, 80), "stored")])
def test_coco_frame_follows_the_recorded_size(tmp_path, recorded, frame):
    from fa_train.data.coco import coco_dataset

    (tmp_path / "val").mkdir()
    (tmp_path / "annotations").mkdir()
    stored, upright = tag6_jpeg(tmp_path / "val" / "r.jpg")
    w, h = recorded
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "r.jpg", "width": w, "height": h}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400,
                         "iscrowd": 0}],
        "categories": [{"id": 1, "name": "a"}]}))
    ds = coco_dataset(str(tmp_path), "val", 128, False)
    img, _, meta = ds[0]
    want = upright if frame == "upright" else stored
    assert meta["orig_size"] == want.shape[:2]


def test_fa_predict_draws_and_reports_the_upright_frame(random_ckpt, tmp_path):
    from fa_deploy.predict import Predictor

    _, upright = tag6_jpeg(tmp_path / "r.jpg", 120, 80)
    _, metas, originals = Predictor(random_ckpt, "cpu").prepare([str(tmp_path / "r.jpg")])
    assert metas[0]["orig_size"] == (120, 80)
    np.testing.assert_array_equal(originals[0], upright)
    r = predict(tmp_path / "r.jpg", "--weights", random_ckpt, "--conf", "1.0", "--out", tmp_path / "out", "--quiet",
                "--device", "cpu")
    assert r.exit_code == 0, r.output
    w, h = Image.open(tmp_path / "out" / "r.png").size
    assert h > w  # drawn upright (portrait), not sideways
