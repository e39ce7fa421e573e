"""Pictures and reports: Grad-CAM of the aligned layer (against a hook-based computation), detection PNGs, plots,
and the HTML report rendered in headless Chromium."""
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from conftest import make_targets
from fa_deploy.runtime.backends import TorchBackend
from fa_deploy.cli import main as bench_main
from fa_deploy.report.html import write_report
from fa_deploy.report.plots import drop_plot, steps_plot, tradeoff_plot
from fa_deploy.report.pictures import grad_cam, visualize
from fa_train.adversarial.attacks import pgd_attack
from fa_train.cli import main as train_main
from fa_train.data import build_dataset
from fa_train.models import create_model

FRCNN_TINY = dict(backbone="resnet18", fpn_channels=32, min_size=128, max_size=128)
TRAIN = ["--data", "synth:60", "--img-size", "64", "--batch-size", "4", "--width-mult", "0.125", "--depth-mult", "0.2",
         "--workers", "0", "--max-images", "16", "--max-test-images", "4", "--quiet", "--eval-every", "0",
         "--epochs", "1", "--lr", "0.002"]


def _png(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float32)


def _not_blank(a):
    return a.std() > 10 and len(np.unique(a.reshape(-1, 3), axis=0)) > 50


def _reference_cam(model, module, pick, images, targets, sign):
    """Grad-CAM by the textbook recipe: a forward hook keeps the layer's output, backward of sign * loss, ReLU of the
    gradient-weighted channel sum, bilinear upsampling, divided by the max."""
    kept = {}

    def hook(_m, _i, out):
        t = pick(out)
        t.retain_grad()
        kept["a"] = t

    h = module.register_forward_hook(hook)
    try:
        model.eval()
        losses, _ = model.forward_train(images, targets)
        (sign * sum(losses.values())).backward()
    finally:
        h.remove()
    a, g = kept["a"], kept["a"].grad
    cam = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return (cam / cam.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1)).detach()


@pytest.mark.parametrize("arch", ["yolov3", "fasterrcnn_resnet50_fpn"])
def test_grad_cam_matches_a_hook_reference_and_moves_under_attack(arch):
    torch.manual_seed(0)
    if arch == "yolov3":
        model = create_model("yolov3", 4, width_mult=0.125, depth_mult=0.2)
        module, pick = model.backbone, (lambda out: out[-1])
    else:
        model = create_model(arch, 4, **FRCNN_TINY)
        module, pick = model.detector.backbone.body.layer4, (lambda out: out)
    torch.manual_seed(1)
    x = torch.rand(2, 3, 128, 128)
    t = make_targets(2, size=128)
    # an untrained model has almost no feature that supports the ground truth (the "support" map is often all
    # zero), so the maths is checked on both signs and the non-trivial properties on the "loss" map
    for towards, sign in (("support", -1.0), ("loss", 1.0)):
        torch.manual_seed(5)  # Faster R-CNN samples proposals for its losses: the same draws for both computations
        cam = grad_cam(model, x, t, towards=towards)
        assert cam.shape == (2, 128, 128) and torch.isfinite(cam).all()
        assert cam.min() >= 0 and cam.max() <= 1 + 1e-6
        # normalised per image: peak 1, or all zero where no feature qualifies
        assert all(abs(float(c.max()) - 1.0) < 1e-5 or float(c.max()) == 0.0 for c in cam)
        torch.manual_seed(5)
        torch.testing.assert_close(cam, _reference_cam(model, module, pick, x, t, sign), atol=1e-4, rtol=1e-4)
    assert all(float(c.max()) == pytest.approx(1.0) for c in cam)
    adv = pgd_attack(model, x, t, eps=0.03, steps=1, step_size=0.03)
    assert (grad_cam(model, adv, t, towards="loss") - cam).abs().max() > 0.05  # the attack moves the map
    with pytest.raises(ValueError, match="towards"):
        grad_cam(model, x, t, towards="up")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = CliRunner().invoke(train_main, TRAIN + ["--out", str(out)])
    assert r.exit_code == 0, r.output
    return out / "last.pt"


def test_visualize_writes_one_png_per_image_with_a_row_per_model(tmp_path):
    torch.manual_seed(0)
    model = create_model("yolov3", 4, width_mult=0.125, depth_mult=0.2)
    ds = build_dataset("synth:60", "test", 64, max_images=3, log=None)
    paths = visualize([("a", model), ("b", model)], ds, str(tmp_path), "cpu", num_images=2, eps=0.03,
                      backends=[("same as a", TorchBackend(model))], score_thres=0.0)
    assert len(paths) == 2 and all(os.path.isfile(p) for p in paths)
    for p in paths:
        a = _png(p)
        assert a.shape == (3 * 320, 640, 3)  # 3 rows (2 models + 1 backend) x 2 columns
        assert _not_blank(a)
        assert ((a == 255).all(-1)).sum() > 20  # the white dashed ground truth is drawn


def test_plots_have_the_expected_size_and_content(tmp_path):
    rows = [{"model": "standard", "backend": "source", "format": "torch", "clean": 0.74, "PGD-1": 0.07, "PGD-3": 0.02,
             "advAP": 0.045, "acAP": 0.39, "drop_clean": 0.0, "drop_advAP": 0.0},
            {"model": "fa", "backend": "m.int8.onnx", "format": "onnx", "clean": 0.68, "PGD-1": 0.22, "PGD-3": 0.07,
             "advAP": 0.145, "acAP": 0.41, "drop_clean": 0.003, "drop_advAP": -0.001}]
    t = _png(tradeoff_plot(rows, str(tmp_path / "t.png")))
    s = _png(steps_plot(rows, [1, 3], str(tmp_path / "s.png")))
    d = _png(drop_plot(rows, str(tmp_path / "d.png"), 0.02))
    assert t.shape == (450, 550, 3) and s.shape == (400, 550, 3) and d.shape == (400, 550, 3)
    for a in (t, s, d):
        assert a.std() > 10 and (a < 128).mean() > 0.002  # lines and text, not an empty canvas


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is absent (Debian package 'chromium'; .ci/run installs it where apt can)")


def test_report_renders_in_headless_chromium_with_its_images(tmp_path):
    chrome = _chromium()
    figs = []
    for i, color in enumerate(((200, 30, 30), (30, 30, 200))):
        p = tmp_path / f"f{i}.png"
        Image.fromarray(np.full((60, 80, 3), color, np.uint8)).save(p)
        figs.append((f"figure {i}", str(p)))
    rows = [{"model": "fa", "clean": 0.5, "advAP": 0.2}]
    paths = write_report(str(tmp_path / "rep"), "test report", [("table", rows, ["model", "clean", "advAP"])], figs,
                         verdict=("gate (max drop 0.02)", "PASS", ""))
    text = open(paths["html"]).read()
    assert "src='data:image/png;base64," in text and "f0.png" not in text  # self-contained
    md = open(paths["markdown"]).read()
    assert "| fa | 0.5000 | 0.2000 |" in md and "](../f0.png)" in md
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--virtual-time-budget=5000"]
    dom = subprocess.run([chrome, *flags, "--dump-dom", "file://" + paths["html"]], capture_output=True, text=True,
                         timeout=120).stdout
    m = re.search(r'data-images-loaded="(\d+)" data-images-total="(\d+)"', dom)
    assert m, dom[:500]
    assert m.group(1) == m.group(2) == "2"  # both embedded PNGs decoded
    assert "<td>0.5000</td>" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([chrome, *flags, f"--screenshot={shot}", "--window-size=800,900", "file://" + paths["html"]],
                   capture_output=True, timeout=120)
    a = _png(shot)
    assert a.shape[:2] == (900, 800)
    assert (np.abs(a - [200, 30, 30]).sum(-1) < 30).sum() > 1000  # the first figure is on screen
    assert (np.abs(a - [30, 30, 200]).sum(-1) < 30).sum() > 1000


def _dom(chrome, html_path, width):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--virtual-time-budget=5000",
             f"--window-size={width},900"]
    return subprocess.run([chrome, *flags, "--dump-dom", "file://" + html_path], capture_output=True, text=True,
                          timeout=120).stdout


def test_deployment_report_verdict_colours_and_wide_table_at_1280_px(tmp_path):
    """The deployment table (27 columns) is never cut at 1280 px: it fits or scrolls inside its own box; a passing
    gate is green and says what was gated once ("Gate (max drop ...): PASS"), a failing one red, an inconclusive
    one neither."""
    chrome = _chromium()
    columns = ["backend", "threat", "format", "precision", "provider", "size_MB", "clean", "PGD-1", "PGD-3", "PGD-5",
               "PGD-10", "advAP", "acAP", "drop_clean", "drop_advAP", "drop_acAP", "misses_clean", "misses_adv",
               "drift_clean", "drift_adv", "ms/img", "p90_ms", "img/s", "pre_ms", "post_ms"]
    rows = [{c: (f"last.int8.onnx ({t})" if c == "backend" else 0.123456) for c in columns}
            for t in ("transfer", "whitebox", "differential", "worst")]
    for outcome, cls in (("PASS", "pass"), ("FAIL", "fail"), ("INCONCLUSIVE", "inconclusive")):
        paths = write_report(str(tmp_path / outcome), "fa-bench: deployment report", [("AP50", rows, columns)], [],
                             verdict=("gate (max drop 0.02)", outcome, "" if outcome == "PASS" else "a reason"))
        text = open(paths["html"]).read()
        assert f"Gate (max drop 0.02): <span class='{cls}'>{outcome}</span>" in text
        assert "Gate: gate" not in text
        dom = _dom(chrome, paths["html"], 1280)
        m = re.search(r'data-tables-cut="(\d+)"', dom)
        assert m and m.group(1) == "0", dom[:300]
    assert "**PASS**" in open(tmp_path / "PASS" / "report.md").read()


def test_fa_bench_report_and_visualize(trained, tmp_path):
    rep, vis = tmp_path / "rep", tmp_path / "vis"
    r = CliRunner().invoke(bench_main, ["--weights", str(trained), "--weights", str(trained), "--steps", "1,2",
                                        "--max-images", "4", "--num-vis", "2", "--report", str(rep),
                                        "--visualize", str(vis), "--json", str(tmp_path / "b.json"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(vis)) == sorted(f for f in os.listdir(vis) if f.startswith("detections_"))
    assert len(os.listdir(vis)) == 2
    for f in ("report.html", "report.md", "tradeoff.png", "steps.png"):
        assert (rep / f).is_file(), f
    html = (rep / "report.html").read_text()
    assert html.count("<img ") == 4  # two plots, two detection pictures
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert f"{rows[0]['clean']:.4f}" in html
