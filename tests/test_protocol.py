"""The robustness protocol (clean, PGD-1/3/5/10, advAP, acAP), TOD's choice, and fa-bench."""
import json

import pytest
import torch
from click.testing import CliRunner

from conftest import make_targets
from fa_deploy.cli import main as bench_main
from fa_train.cli import main as train_main
from fa_train.data import build_dataset
from fa_train.engine import make_loader
from fa_train.evaluation import robustness

TINY = ["--data", "synth:60", "--img-size", "64", "--batch-size", "4", "--width-mult", "0.125", "--depth-mult",
        "0.2", "--workers", "0", "--max-images", "16", "--max-test-images", "8", "--quiet", "--eval-every", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = CliRunner().invoke(train_main, TINY + ["--epochs", "2", "--lr", "0.002", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out / "last.pt"


def _loader(n=8):
    ds = build_dataset("synth:60", "test", 64, max_images=n, log=None)
    return make_loader(ds, 4, False, 0)


def test_protocol_is_reproducible_and_consistent(tiny_yolo):
    torch.manual_seed(0)
    model = tiny_yolo.eval()
    a = robustness(model, _loader(), torch.device("cpu"), eps=0.03, steps=(1, 3), progress=False)
    b = robustness(model, _loader(), torch.device("cpu"), eps=0.03, steps=(1, 3), progress=False)
    assert a["row"] == b["row"]
    row = a["row"]
    assert set(row) == {"clean", "PGD-1", "PGD-3", "advAP", "acAP"}
    assert row["advAP"] == pytest.approx((row["PGD-1"] + row["PGD-3"]) / 2)
    assert row["acAP"] == pytest.approx((row["clean"] + row["advAP"]) / 2)


def test_protocol_eps_zero_equals_clean(trained):
    from fa_train.models import load_model

    model, _ = load_model(str(trained))
    res = robustness(model.eval(), _loader(), torch.device("cpu"), eps=0.0, steps=(1, 2), progress=False)
    assert res["row"]["PGD-1"] == res["row"]["clean"] == res["row"]["PGD-2"]


def test_tod_keeps_the_larger_loss_candidate_per_image(tiny_yolo):
    from fa_train.adversarial.attacks import choose_larger_loss

    model = tiny_yolo.eval()
    targets = make_targets(2)
    low = torch.full((2, 3, 64, 64), 0.5)
    high = torch.rand(2, 3, 64, 64)
    # per-image losses decide independently of each other
    from fa_train.adversarial.attacks import detection_loss

    with torch.no_grad():
        l_low = [float(detection_loss(model, low[i:i + 1], targets[i:i + 1])) for i in range(2)]
        l_high = [float(detection_loss(model, high[i:i + 1], targets[i:i + 1])) for i in range(2)]
    chosen = choose_larger_loss(model, targets, [low, high])
    for i in range(2):
        expected = high[i] if l_high[i] > l_low[i] else low[i]
        assert torch.equal(chosen[i], expected)
    mixed_low = torch.stack([low[0], high[1]])
    mixed_high = torch.stack([high[0], low[1]])
    chosen = choose_larger_loss(model, targets, [mixed_low, mixed_high])
    for i in range(2):
        cands = [mixed_low[i], mixed_high[i]]
        losses = [l_low[i] if torch.equal(c, low[i]) else l_high[i] for c in cands]
        assert torch.equal(chosen[i], cands[int(losses[1] > losses[0])])


def test_batched_per_image_losses_equal_single_image_forwards(tiny_yolo):
    from fa_train.adversarial.attacks import detection_loss, frozen_batchnorm

    model = tiny_yolo.train()
    x, t = torch.rand(3, 3, 64, 64, dtype=torch.float64), make_targets(3)
    model.double()
    with torch.no_grad(), frozen_batchnorm(model):
        batched = model.per_image_losses(x, t)
        single = torch.stack([detection_loss(model, x[i:i + 1], t[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-9, atol=1e-12)


def test_fa_bench_table_and_json(trained, tmp_path):
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    r = CliRunner().invoke(bench_main, ["--weights", str(trained), "--weights", str(trained), "--steps", "1,2",
                                        "--max-images", "8", "--batch-size", "4", "--workers", "0", "--quiet",
                                        "--json", str(js), "--markdown", str(md)])
    assert r.exit_code == 0, r.output
    assert "PGD-1" in r.output and "advAP" in r.output and "acAP" in r.output
    out = json.loads(js.read_text())
    assert len(out["rows"]) == 2 and out["rows"][0]["advAP"] == out["rows"][1]["advAP"]
    assert "| model |" in md.read_text()
    r = CliRunner().invoke(bench_main, ["--weights", str(trained), "--steps", "0"])
    assert r.exit_code != 0 and "steps" in r.output


def test_fa_bench_refuses_other_classes(trained, tmp_path):
    import shutil

    voc = tmp_path / "VOCdevkit"
    from conftest import shared_path

    shutil.copytree(shared_path("data", "VOCdevkit"), voc)
    r = CliRunner().invoke(bench_main, ["--weights", str(trained), "--data", f"voc:{voc}", "--quiet"])
    assert r.exit_code == 2 and "trained for classes" in r.output
