"""fa-predict and fa_deploy.load: a checkpoint and its ONNX export on image files give the same detections (within
the export's parity), COCO results in original pixels, YOLO text files, side-by-side attacked pictures; bad paths
and unreadable images are named in a one-line error."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import fa_deploy
from fa_deploy.predict_cli import predict_main


@pytest.fixture(scope="module")
def images(shapes_devkit):
    d = os.path.join(shapes_devkit, "VOCshapes", "JPEGImages")
    return d, sorted(os.path.join(d, f) for f in os.listdir(d))[:3]


def _run(*args):
    return CliRunner().invoke(predict_main, [str(a) for a in args])


def _matched(a, b, tol):
    """Every detection of `a` has one of `b` with the same image, class and a box within `tol` pixels."""
    for p in a:
        cands = [q for q in b if q["image_id"] == p["image_id"] and q["category_id"] == p["category_id"]]
        assert any(np.abs(np.array(q["bbox"]) - np.array(p["bbox"])).max() <= tol for q in cands), p


def test_checkpoint_and_onnx_backend_give_the_same_detections(overfit, overfit_images, exported, tmp_path):
    # the overfit model's own two images, where it detects every object with a score >= OVERFIT_SCORE (conftest)
    import shutil

    from conftest import OVERFIT_SCORE

    folder = tmp_path / "imgs"
    folder.mkdir()
    for f in overfit_images:
        shutil.copy(f, folder)
    conf = str(OVERFIT_SCORE)
    r = _run(folder, "--weights", overfit, "--out", tmp_path / "src", "--save-txt", "--quiet", "--conf", conf)
    assert r.exit_code == 0, r.output
    r2 = _run(folder, "--backend", exported["fp32"], "--out", tmp_path / "onnx", "--quiet", "--conf", conf)
    assert r2.exit_code == 0, r2.output
    src = json.loads((tmp_path / "src" / "predictions.json").read_text())
    onx = json.loads((tmp_path / "onnx" / "predictions.json").read_text())
    assert src and len(src) == len(onx)
    _matched(src, onx, 0.05)
    _matched(onx, src, 0.05)
    # original image coordinates: the shapes images are 64..96 px wide, boxes inside them
    for p in src:
        w, h = Image.open(p["file_name"]).size
        x, y, bw, bh = p["bbox"]
        assert 0 <= x and 0 <= y and x + bw <= w + 1e-3 and y + bh <= h + 1e-3 and p["score"] >= OVERFIT_SCORE
    pics = sorted(f for f in os.listdir(tmp_path / "src") if f.endswith(".png"))
    assert len(pics) == 2
    stem = sorted(os.path.splitext(os.path.basename(f))[0] for f in overfit_images)[0]
    txt = (tmp_path / "src" / "labels" / f"{stem}.txt").read_text().split("\n")
    first = [p for p in src if p["image_id"] == 1]
    assert len([t for t in txt if t]) == len(first)
    for line in filter(None, txt):
        cls, cx, cy, w, h, score = line.split()
        assert 0 <= int(cls) < 4 and all(0 <= float(v) <= 1 for v in (cx, cy, w, h))


def test_attack_side_by_side(overfit, images, tmp_path):
    folder, files = images
    r = _run(files[0], "--weights", overfit, "--attack", "pgd", "--steps", "2", "--out", tmp_path, "--quiet")
    assert r.exit_code == 0, r.output
    (pic,) = [f for f in os.listdir(tmp_path) if f.endswith(".png")]
    w, h = Image.open(tmp_path / pic).size
    assert w > 1.8 * h  # two panels side by side


def test_bad_inputs_are_named(overfit, exported, tmp_path):
    r = _run(tmp_path / "nothing_here.jpg", "--weights", overfit, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "nothing_here.jpg" in r.output and "Traceback" not in r.output
    bad = tmp_path / "imgs"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    r = _run(bad, "--weights", overfit, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "broken.jpg" in r.output and "corrupt" in r.output, r.output
    r = _run(bad, "--backend", exported["fp32"], "--attack", "pgd", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--weights" in r.output
    r = _run(bad, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--weights" in r.output and "--backend" in r.output
    r = _run(tmp_path / "empty*.png", "--weights", overfit, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "matches no images" in r.output


def test_load_api_on_arrays_files_and_batches(overfit, exported, images):
    _, files = images
    src, onx = fa_deploy.load(str(overfit)), fa_deploy.load(str(exported["int8"]))
    assert src.class_names == onx.class_names == ["circle", "square", "triangle", "star"]
    a = src.predict(files, conf=0.3)
    arr = np.asarray(Image.open(files[0]).convert("RGB"))
    b = src.predict([arr], conf=0.3)
    np.testing.assert_allclose(a[0]["boxes"], b[0]["boxes"], atol=1e-4)
    assert set(a[0]) == {"boxes", "scores", "labels", "names"}
    q = onx.predict(files, conf=0.3)  # int8: same images, boxes close to the source's
    assert len(q) == len(a)
