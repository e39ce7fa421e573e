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
    from fa_deploy.runtime.predict import Predictor

    _, upright = tag6_jpeg(tmp_path / "r.jpg", 120, 80)
    _, metas, originals = Predictor(random_ckpt, "cpu").prepare([str(tmp_path / "r.jpg")])
    assert metas[0]["orig_size"] == (120, 80)
    np.testing.assert_array_equal(originals[0], upright)
    r = predict(tmp_path / "r.jpg", "--weights", random_ckpt, "--conf", "1.0", "--out", tmp_path / "out", "--quiet",
                "--device", "cpu")
    assert r.exit_code == 0, r.output
    w, h = Image.open(tmp_path / "out" / "r.png").size
    assert h > w  # drawn upright (portrait), not sideways


# ---------------------------------------------------------------------------------------------- 4. data paths

def _write_yolo_set(root, n=4):
    """n 64x64 images with one box each, train = val."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for i in range(n):
        img = np.full((64, 64, 3), 40, np.uint8)
        img[16:48, 8 + i:40 + i] = (220, 60, 60)
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        (root / "labels" / f"{i}.txt").write_text(f"0 {(24 + i) / 64} 0.5 0.5 0.5\n")
    (root / "data.yaml").write_text("train: images\nval: images\nnames: [box]\n")


def test_relative_data_path_is_stored_resolved(tmp_path, monkeypatch):
    from fa_deploy.runtime.datasets import dataset_for
    from fa_train.checkpoint import load_checkpoint
    from fa_train.cli import main as train_main

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _write_yolo_set(tmp_path / "a" / "yolo" / "five")
    monkeypatch.chdir(tmp_path / "a")
    r = CliRunner().invoke(train_main, ["--data", "yolo:yolo/five/data.yaml", "--img-size", "64", "--batch-size", "2",
                                        "--width-mult", "0.125", "--depth-mult", "0.2", "--workers", "0", "--epochs",
                                        "1", "--eval-every", "0", "--quiet", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    monkeypatch.chdir(tmp_path / "b")
    ckpt = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert ckpt["config"]["data"]["spec"] == f"yolo:{tmp_path / 'a' / 'yolo' / 'five' / 'data.yaml'}"
    assert len(dataset_for(ckpt, "test", log=None)) == 4


def test_checkpoint_splits_are_the_ones_benchmarked_and_calibrated_on(shapes_devkit):
    """A model trained with --test-split / --train-split is benchmarked (fa-bench, fa-export's verification) on its
    own test split and calibrated on its own training split when the data comes from the checkpoint; --data /
    --calib-data (other data) go back to the dataset's defaults. Counts from the devkit's ImageSets files."""
    import os

    from fa_deploy.exporting.run import calibration_dataset
    from fa_deploy.runtime.datasets import dataset_for
    from fa_deploy.settings import ExportSettings

    def ids(split):
        with open(os.path.join(shapes_devkit, "VOCshapes", "ImageSets", "Main", f"{split}.txt")) as f:
            return [ln.strip() for ln in f if ln.strip()]

    assert len(ids("train")) != len(ids("test"))
    ckpt = {"config": {"data": {"spec": "synth:60", "img_size": 64, "test_split": "shapes:trainval",
                               "train_split": "shapes:test"}}}
    assert len(dataset_for(ckpt, "test", log=None)) == len(ids("trainval"))
    assert len(dataset_for(ckpt, "test", "synth:60", log=None)) == len(ids("test"))  # other data: its default
    assert len(dataset_for(ckpt, "test", split="shapes:train", log=None)) == len(ids("train"))  # the flag wins
    s = ExportSettings(weights="x.pt", calib_images=1000)
    assert len(calibration_dataset(ckpt, s, 64, log=None)) == len(ids("test"))
    s = ExportSettings(weights="x.pt", calib_images=1000, calib_data="synth:60")
    assert len(calibration_dataset(ckpt, s, 64, log=None)) == len(ids("train"))


def _old_ckpt(path, spec):
    from fa_train.models import create_model

    model = create_model("yolov3", 1, width_mult=0.125, depth_mult=0.2)
    torch.save({"model": model.state_dict(), "arch": model.arch_config(), "class_names": ["box"],
                "config": {"data": {"img_size": 64, "spec": spec}}}, path)
    return str(path)


def test_missing_checkpoint_data_path_names_its_origin_and_the_flag(tmp_path, monkeypatch):
    from fa_deploy.bench_cli import main as bench_main
    from fa_deploy.export_cli import export_main

    ckpt = _old_ckpt(tmp_path / "old.pt", "yolo:yolo/five/data.yaml")  # written before paths were resolved
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(bench_main, ["--weights", ckpt, "--attack", "none", "--workers", "0", "--quiet"])
    assert r.exit_code == 2, r.output
    assert "yolo/five/data.yaml: dataset yaml is missing" in r.output
    assert "stored in the checkpoint" in r.output and "--data" in r.output
    r = CliRunner().invoke(export_main, [ckpt, "--onnx", "fp32", "--out", str(tmp_path / "exp")])
    assert r.exit_code == 2, r.output
    assert "stored in the checkpoint" in r.output and "--calib-data" in r.output


# ---------------------------------------------------------------------------------------------- 6. cache file

def test_truncated_cache_file_is_regenerated(overfit, exported, tmp_path):
    from fa_deploy.bench_cli import main as bench_main

    cache = tmp_path / "cache"
    args = ["--weights", str(overfit), "--backend", str(exported["fp32"]), "--steps", "1", "--cache-dir", str(cache),
            "--max-drop", "1", "--threat", "transfer", "--test-split", "shapes:train", "--max-images", "2",
            "--batch-size", "2", "--workers", "0", "--quiet"]
    r = CliRunner().invoke(bench_main, args)
    assert r.exit_code == 0, r.output
    (f,) = cache.iterdir()
    good = np.load(f)
    f.write_bytes(f.read_bytes()[:100])
    r = CliRunner().invoke(bench_main, args)
    assert r.exit_code == 0, r.output
    assert f"{f} is truncated or corrupt" in r.output and "regenerat" in r.output
    assert "internal error" not in r.output
    np.testing.assert_allclose(np.load(f), good, atol=1e-6)  # regenerated: the same images again


# ---------------------------------------------------------------------------------------------- 8. mixed models

def test_fa_predict_refuses_a_backend_of_other_weights(exported, tmp_path):
    from fa_train.models import create_model

    model = create_model("yolov3", 5, width_mult=0.125, depth_mult=0.2)
    five = tmp_path / "five.pt"
    torch.save({"model": model.state_dict(), "arch": model.arch_config(), "class_names": list("abcde"),
                "config": {"data": {"img_size": 64, "spec": "synth"}}}, five)
    Image.fromarray(gradient(64, 64)).save(tmp_path / "x.png")
    r = predict(tmp_path / "x.png", "--weights", five, "--backend", exported["fp32"], "--attack", "pgd", "--steps",
                "1", "--out", tmp_path / "out", "--quiet", "--device", "cpu")
    assert r.exit_code == 2, r.output
    assert "fa-predict: error:" in r.output and str(exported["fp32"]) in r.output
    assert "other weights" in r.output or "classes" in r.output
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- 9. messages

def test_fa_export_unwritable_default_out_names_the_flag(random_ckpt, tmp_path, monkeypatch):
    import errno

    from fa_deploy.export_cli import export_main

    target = os.path.join(os.path.dirname(random_ckpt), "export")
    real_mkdir, real_makedirs = os.mkdir, os.makedirs

    def refuse(fn):
        def wrapped(p, *a, **k):
            if os.path.abspath(p) == target:
                raise OSError(errno.EROFS, "Read-only file system", p)
            return fn(p, *a, **k)
        return wrapped

    monkeypatch.setattr(os, "mkdir", refuse(real_mkdir))
    monkeypatch.setattr(os, "makedirs", refuse(real_makedirs))
    r = CliRunner().invoke(export_main, [random_ckpt, "--onnx", "fp32"])
    assert r.exit_code == 2, r.output
    assert "--out" in r.output and "Read-only file system" in r.output and target in r.output


def test_checkpoint_given_as_backend_is_named(random_ckpt, tmp_path):
    import shutil

    from fa_deploy.runtime.loading import load_backend
    from fa_deploy.runtime.backends import BackendError

    fake = tmp_path / "model.onnx"
    shutil.copy(random_ckpt, fake)
    with pytest.raises(BackendError, match=r"model\.onnx: .*fa-train checkpoint.*--weights"):
        load_backend(str(fake))
    Image.fromarray(gradient(64, 64)).save(tmp_path / "x.png")
    r = predict(tmp_path / "x.png", "--backend", fake, "--out", tmp_path / "out", "--quiet")
    assert r.exit_code == 2 and "fa-train checkpoint" in r.output and "--weights" in r.output, r.output


@pytest.mark.parametrize("steps", ["0", "1,0", "x"])
def test_bench_bad_steps_is_one_line(steps):
    from fa_deploy.bench_cli import main as bench_main

    r = CliRunner().invoke(bench_main, ["--weights", "none.pt", "--steps", steps])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fa-bench: error: --steps"), r.output


# ---------------------------------------------------------------------------------------------- 10. help texts

def _help_of(cmd, flag):
    out = CliRunner().invoke(cmd, ["--help"], terminal_width=400).output
    line = next(ln for ln in out.splitlines() if ln.strip().startswith(flag))
    return " ".join(out[out.index(line):].split("\n  -")[0].split())


def test_help_names_yolo_data_and_default_splits():
    from fa_deploy.bench_cli import main as bench_main
    from fa_deploy.export_cli import export_main
    from fa_train.data import DEFAULT_SPLITS

    assert "yolo:PATH/data.yaml" in _help_of(export_main, "--calib-data")
    split = _help_of(bench_main, "--test-split")
    for kind, roles in DEFAULT_SPLITS.items():
        assert roles["test"] in split, (kind, split)
    assert "yolo" in split


# ---------------------------------------------------------------------------------------------- 11. small things

def test_failed_fa_predict_leaves_no_output_folder(random_ckpt, tmp_path):
    r = predict(tmp_path / "missing.jpg", "--weights", random_ckpt, "--out", tmp_path / "new" / "out", "--quiet")
    assert r.exit_code == 2, r.output
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    r = predict(tmp_path / "missing.jpg", "--weights", random_ckpt, "--out", tmp_path / "mine", "--quiet")
    assert r.exit_code == 2 and (tmp_path / "mine").is_dir()  # a folder the user made stays


def test_sanitize_counts_by_kind_with_plurals():
    from fa_train.data.common import SanitizeStats, sanitize_boxes

    st = SanitizeStats()
    boxes = np.array([[-5, 0, 10, 10], [5, 5, 5, 9], [8, 2, 3, 6], [1, 1, 4, 4]], np.float32)
    _, keep = sanitize_boxes(boxes, 32, 32, st, "f")
    assert keep.tolist() == [True, False, False, True]
    assert st.summary() == "1 box clipped to the image, 1 zero-area box and 1 negative-size box dropped"
    st2 = SanitizeStats()
    sanitize_boxes(np.array([[-1, 0, 4, 4], [-2, 0, 4, 4]], np.float32), 32, 32, st2, "f")
    assert st2.summary() == "2 boxes clipped to the image"


def test_yolo_reader_counts_empty_label_files(tmp_path):
    from fa_train.data import build_dataset

    _write_yolo_set(tmp_path, n=3)
    (tmp_path / "labels" / "1.txt").write_text("")
    (tmp_path / "labels" / "2.txt").write_text("\n")
    logs = []
    ds = build_dataset(f"yolo:{tmp_path / 'data.yaml'}", "test", 64, log=logs.append)
    assert ds.empty_label_files == [str(tmp_path / "labels" / "1.txt"), str(tmp_path / "labels" / "2.txt")]
    assert any("2 label files are empty" in m for m in logs), logs


def _capture_figure(monkeypatch):
    from fa_deploy.report import plots

    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or path)
    return plots, figs


def test_sanity_plot_of_all_zero_curves_has_sensible_limits(monkeypatch, tmp_path):
    plots, figs = _capture_figure(monkeypatch)
    curves = {"eps_curve": [[0.01, 7e-19], [0.03, 0.0]], "steps_curve": [[1, 0.0], [10, 7e-19]], "clean": 0.0,
              "iterations": 10, "eps": 0.03}
    plots.sanity_plot([{"name": "m", "curves": curves}], str(tmp_path / "s.png"))
    for ax in figs[0].axes:
        lo, hi = ax.get_ylim()
        assert lo == 0 and hi >= 0.05, (lo, hi)


def test_tog_table_shows_nothing_measured_as_dash():
    from fa_deploy.robustness.bench import tog_table
    from fa_deploy.report.tables import console_table

    caption, rows, cols = tog_table([{"name": "m", "tog": {"tog-vanishing": {
        "clean": 0, "kept": 0, "lost": 0, "relabelled": 0, "fabricated": 3, "adversarial": 3}}}])
    assert rows[0]["kept"] is None and rows[0]["lost"] is None and rows[0]["relabelled"] is None
    body = console_table(rows, cols).splitlines()[-1].split()
    assert body[3:6] == ["-", "-", "-"] and "0.0000" not in body


def test_tradeoff_labels_do_not_overlap(monkeypatch, tmp_path):
    plots, figs = _capture_figure(monkeypatch)
    rows = [{"model": f"runs/model_{i}/last", "clean": 0.5 + 0.001 * i, "advAP": 0.3} for i in range(6)]
    plots.tradeoff_plot(rows, str(tmp_path / "t.png"))
    fig = figs[0]
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in fig.axes[0].texts if t.get_text().startswith("runs/")]
    assert len(boxes) == 6
    for i in range(6):
        for j in range(i + 1, 6):
            assert not boxes[i].overlaps(boxes[j]), (i, j)
