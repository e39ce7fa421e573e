"""fa-bench --backend --threat (fa_deploy/robustness/threats.py, fa_deploy/harness.py): the white-box and differential threats
on the deployed files' twins, deployment-only misses, the worst case over threats, the gate, the cache keys."""
import json
import os
import re

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from fa_deploy.bench_cli import main as bench_main
from fa_deploy.robustness.threats import Differential, deployment_misses, worst_over_threats
from fa_deploy.settings import parse_threats
from fa_deploy.robustness.twin import load_twin
from fa_train.adversarial.attack_objectives import DetectionLoss
from fa_train.adversarial.attacks import Budget, SignStep, run_attack
from fa_train.adversarial.suite import ground_truth_losses
from fa_train.models import load_model

SPLIT = ["--test-split", "shapes:train", "--max-images", "2"]  # the overfit model's own two images


def _bench(*args):
    r = CliRunner().invoke(bench_main, [*args, "--quiet"])
    return r


def _data(weights):
    from fa_deploy.runtime.datasets import dataset_for

    _, ckpt = load_model(str(weights))
    ds = dataset_for(ckpt, "test", None, 64, split="shapes:train", max_images=2, log=None)
    return torch.stack([ds[i][0] for i in range(2)]), [ds[i][1] for i in range(2)]


def _crushed_int8(src, out, which=(3, 10, 20, 30), factor=0.5):
    """The int8 file with a few activation quantization scales crushed (x factor): fragile on purpose."""
    from fa_deploy.robustness.interpreter import OnnxGraph

    steps = OnnxGraph(str(src)).fake_quant_steps()
    m = onnx.load(str(src))
    inits = {i.name: i for i in m.graph.initializer}
    for w in which:
        q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.output[0] == steps[w].attrs["q_output"])
        s = inits[q.input[1]]
        s.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(s) * np.float32(factor), s.name))
    onnx.save(m, str(out))
    with open(str(src) + ".json") as f:
        side = json.load(f)
    with open(str(out) + ".json", "w") as f:
        json.dump(side, f)
    return out


def test_threat_flags_are_checked(overfit, exported):
    r = _bench("--weights", str(overfit), "--threat", "whitebox")
    assert r.exit_code == 2 and "--threat whitebox" in r.output and "--backend" in r.output
    r = _bench("--weights", str(overfit), "--backend", str(exported["fp32"]), "--threat", "blackbox")
    assert r.exit_code == 2 and "'blackbox'" in r.output and "transfer, whitebox, differential" in r.output
    r = _bench("--weights", str(overfit), "--backend", str(exported["fp32"]), "--max-deploy-misses", "1.5")
    assert r.exit_code == 2 and "--max-deploy-misses" in r.output
    r = _bench("--weights", str(overfit), "--backend", str(exported["fp32"]), "--attack", "none", "--threat",
               "whitebox")
    assert r.exit_code == 2 and "--attack none" in r.output
    assert parse_threats("all") == ("transfer", "whitebox", "differential")
    assert parse_threats("differential,transfer") == ("transfer", "differential")


def _det(boxes, labels, scores):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
            "scores": torch.tensor(scores)}


def test_deployment_misses_counted_by_hand():
    gt = [{"boxes": torch.tensor([[0., 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]),
           "labels": torch.tensor([0, 1, 2]), "ignore": torch.tensor([False, False, True])},
          {"boxes": torch.tensor([[0., 0, 8, 8]]), "labels": torch.tensor([1])}]
    # image 0: the source finds objects 0 and 1 (object 2 is ignored); the backend finds object 0 at IoU 0.81,
    # object 1 only with the wrong class, and a low-score box; image 1: the source misses at score 0.25
    src = [_det([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [0, 1, 2], [0.9, 0.8, 0.9]),
           _det([[0, 0, 8, 8]], [1], [0.2])]
    dep = [_det([[0, 0, 9, 9], [20, 20, 30, 30], [20, 20, 30, 30]], [0, 0, 1], [0.5, 0.9, 0.1]), _det([], [], [])]
    assert deployment_misses(gt, src, dep, 0.25) == (2, 1)
    assert deployment_misses(gt, src, src, 0.25) == (2, 0)
    # at 0.15 image 1's source detection (0.2) counts, and the backend has nothing there
    assert deployment_misses(gt, src, dep, 0.15) == (3, 2)
    assert deployment_misses(gt, src, dep, 0.05) == (3, 1)  # at 0.05 the backend's 0.1 box of class 1 counts too


def test_worst_over_threats_takes_each_columns_worst():
    rows = [{"backend": "b", "threat": "transfer", "clean": 0.8, "advAP": 0.3, "misses_adv": 0.1},
            {"backend": "b", "threat": "whitebox", "clean": 0.8, "advAP": 0.2, "misses_adv": None},
            {"backend": "b", "threat": "differential", "clean": 0.8, "advAP": 0.5, "misses_adv": 0.4}]
    w = worst_over_threats(rows, ["clean", "advAP"], ["misses_adv"])
    assert (w["threat"], w["advAP"], w["misses_adv"]) == ("worst", 0.2, 0.4)
    assert w["worst_threat"] == {"clean": "transfer", "advAP": "whitebox", "misses_adv": "differential"}


def test_each_threat_raises_the_int8_files_loss_above_clean(overfit, exported):
    """PGD-10 on the int8 twin (verified against ONNX Runtime: the deployed file's function) and PGD-10 on the
    source (transfer), both scored by the deployed file's loss. What is true: each threat raises that loss above the
    clean images' on every image, and the worst case over threats (per image, the larger) is at least each one's.
    What is not: that the white-box attack always beats transfer (issue 23: on another small model transfer reached
    the higher loss on 4 of 4 image pairs): white-box PGD with a fixed sign step is no exact maximiser, which is why
    the harness reports the worst case over threats rather than trusting any one threat as the bound."""
    source, _ = load_model(str(overfit))
    source.eval()
    x, t = _data(overfit)
    twin = load_twin(str(exported["int8"]), verify_images=x).eval()
    rule, budget = SignStep(0.003), Budget(0.03, 10)
    transfer = run_attack(source, DetectionLoss(), rule, budget, x, t, image_keys=[0, 1]).images
    white = run_attack(twin, DetectionLoss(), SignStep(0.003), budget, x, t, image_keys=[0, 1]).images
    lc, lt, lw = (ground_truth_losses(twin, im, t) for im in (x, transfer, white))
    assert (lt > lc).all() and (lw > lc).all(), (lc, lt, lw)
    # which threat is stronger is not asserted; the worst row's columns are the minimum over threats
    # (test_worst_over_threats_takes_each_columns_worst, test_threats_rows_fp32_in_disguise_and_the_cache)


def test_differential_attack_keeps_the_sources_detections_and_moves_the_backend(overfit, exported, tmp_path):
    source, _ = load_model(str(overfit))
    source.eval()
    x, t = _data(overfit)
    twin = load_twin(str(_crushed_int8(exported["int8"], tmp_path / "crushed.int8.onnx")), verify_images=x).eval()
    obj = Differential(DetectionLoss(), source, weight=3.0, score_thres=0.25)
    adv = run_attack(twin, obj, SignStep(0.003), Budget(0.03, 10), x, t, image_keys=[0, 1]).images
    assert (adv - x).abs().max() <= 0.03 + 1e-6
    with torch.no_grad():
        src_clean, src_adv = source.predict(x), source.predict(adv)
    detected, lost = deployment_misses(t, src_clean, src_adv, 0.25)
    assert detected >= 2 and lost <= detected // 4, (detected, lost)  # the source keeps its detections ...
    rise_src = ground_truth_losses(source, adv, t) - ground_truth_losses(source, x, t)
    rise_dep = ground_truth_losses(twin, adv, t) - ground_truth_losses(twin, x, t)
    assert (rise_dep > rise_src).all(), (rise_dep, rise_src)  # ... while the deployment's loss rises more


def test_differential_aims_at_deployment_only_misses_at_least_as_well_as_white_box(overfit, exported, tmp_path):
    """Issue 23, defect 5: on a fragile file the differential threat's images (default weight) leave at least as
    many objects that the source detects and the deployment misses as white-box images on the twin, and widen the
    gap between the deployment's and the source's ground-truth loss that they aim at."""
    source, _ = load_model(str(overfit))
    source.eval()
    x, t = _data(overfit)
    twin = load_twin(str(_crushed_int8(exported["int8"], tmp_path / "crushed.int8.onnx")), verify_images=x).eval()
    gap = {"clean": float((ground_truth_losses(twin, x, t) - ground_truth_losses(source, x, t)).sum())}
    misses = {}
    for name, obj in [("whitebox", DetectionLoss()), ("differential", Differential(DetectionLoss(), source))]:
        adv = run_attack(twin, obj, SignStep(0.003), Budget(0.03, 10), x, t, image_keys=[0, 1]).images
        gap[name] = float((ground_truth_losses(twin, adv, t) - ground_truth_losses(source, adv, t)).sum())
        with torch.no_grad():
            misses[name] = deployment_misses(t, source.predict(adv), twin.predict(adv), 0.25)[1]
    assert gap["differential"] > gap["clean"] + 0.1, gap
    assert misses["differential"] >= misses["whitebox"], misses


def test_threats_rows_fp32_in_disguise_and_the_cache(overfit, exported, tmp_path):
    cache = tmp_path / "cache"
    args = ["--weights", str(overfit), *SPLIT, "--backend", str(exported["fp32"]), "--backend",
            str(exported["int8"]), "--cache-dir", str(cache), "--steps", "1,3", "--max-drop", "1",
            "--max-deploy-misses", "1"]
    r = _bench(*args, "--json", str(tmp_path / "a.json"))
    assert r.exit_code == 0, r.output
    out = json.loads((tmp_path / "a.json").read_text())
    rows = out["rows"]
    assert [(x["backend"], x["threat"]) for x in rows] == [("source", "own")] + [
        (b, th) for b in ("last.fp32.onnx", "last.int8.onnx") for th in ("transfer", "whitebox", "differential",
                                                                          "worst")]
    for row in rows[1:5]:  # the fp32 file is the source in disguise: no deployment-only misses under any threat
        assert row["misses_clean"] == 0.0 and row["misses_adv"] in (0.0, None), row
        if row["threat"] in ("transfer", "whitebox"):  # the same images as the source's own attack, or its twin's
            assert row["advAP"] == pytest.approx(rows[0]["advAP"], abs=0.02), row
    int8 = {x["threat"]: x for x in rows[5:]}
    for col in ("clean", "PGD-1", "PGD-3"):
        assert int8["worst"][col] == min(int8[t][col] for t in ("transfer", "whitebox", "differential"))
    # the worst row is one row: its aggregates come from its own columns (issue 23), never above any threat's
    w = int8["worst"]
    assert w["advAP"] == pytest.approx((w["PGD-1"] + w["PGD-3"]) / 2) and w["acAP"] == pytest.approx(
        (w["clean"] + w["advAP"]) / 2)
    assert w["advAP"] <= min(int8[t]["advAP"] for t in ("transfer", "whitebox", "differential")) + 1e-12
    assert w["drop_advAP"] == pytest.approx(rows[0]["advAP"] - w["advAP"])
    assert out["threats"] == ["transfer", "whitebox", "differential"]
    # cache: the transfer images once, and per backend file and threat its own (2 PGD columns, one batch)
    files = sorted(os.listdir(cache))
    assert len(files) == 2 + 2 * 2 * 2, files
    r = _bench(*args, "--json", str(tmp_path / "b.json"))
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(cache)) == files  # all reused
    again = json.loads((tmp_path / "b.json").read_text())["rows"]
    for a, b in zip(rows, again):
        assert {k: a[k] for k in ("clean", "PGD-1", "PGD-3")} == {k: b[k] for k in ("clean", "PGD-1", "PGD-3")}
    # another deployed file gets its own white-box and differential images, not the int8 file's
    r = _bench("--weights", str(overfit), *SPLIT, "--backend", str(exported["fp16"]), "--cache-dir", str(cache),
               "--steps", "1,3", "--max-drop", "1", "--threat", "whitebox")
    assert r.exit_code == 0, r.output
    assert len(os.listdir(cache)) == len(files) + 2


def test_gate_catches_a_fragile_int8_that_the_transfer_gate_passes(overfit, exported, tmp_path):
    """The gate's limits are set just above what the transfer threat measures on this file (so the transfer gate
    passes by construction, whatever this CPU's trained model gives); the same limits over every threat fail on an
    attack on the file itself. Drift is not what is tested here (a crushed file drifts by design). Scales crushed
    to a quarter: at half, under ATEN_CPU_CAPABILITY=default no attack on the file lowered the overfit model's AP on
    its two images, so the test asserted what one CPU's numerics happened to give."""
    crushed = _crushed_int8(exported["int8"], tmp_path / "crushed.int8.onnx", factor=0.25)
    open_gate = ["--max-drop", "1", "--max-deploy-misses", "1", "--max-drift", "1e9", "--min-clean-ap", "0"]
    r = _bench("--weights", str(overfit), *SPLIT, "--backend", str(crushed), *open_gate, "--threat", "transfer",
               "--json", str(tmp_path / "t.json"))
    assert r.exit_code == 0, r.output
    row = json.loads((tmp_path / "t.json").read_text())["rows"][1]
    drop = max(v for k, v in row.items() if k.startswith("drop_") and isinstance(v, (int, float)))
    miss = max(row[k] or 0.0 for k in ("misses_clean", "misses_adv") if k in row)
    gate = ["--max-drop", f"{drop + 0.01:.4f}", "--max-deploy-misses", f"{min(miss + 0.05, 1.0):.4f}",
            "--max-drift", "1e9"]
    r = _bench("--weights", str(overfit), *SPLIT, "--backend", str(crushed), *gate, "--threat", "transfer")
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output
    r = _bench("--weights", str(overfit), *SPLIT, "--backend", str(crushed), *gate, "--json",
               str(tmp_path / "g.json"))
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.output and "crushed.int8.onnx" in r.output
    failures = json.loads((tmp_path / "g.json").read_text())["gate"]["failures"]
    # each failure comes from an attack on the file (a column's worst may be shared with transfer: "whitebox/transfer")
    assert failures and all("whitebox" in f or "differential" in f for f in failures), failures
    # the threats each failure names ("under the whitebox threat", or "transfer/whitebox" where the worst row's
    # columns come from both: its advAP, a mean over columns of the worst over threats, can then fall below every
    # single threat's, and transfer's alone is under the gate by construction): an attack on the file among them
    named = [re.search(r"under the ([\w/]+) threat", f) for f in failures]
    assert all(named) and any({"whitebox", "differential"} & set(m.group(1).split("/")) for m in named), failures


def test_a_twin_that_does_not_match_is_refused(overfit, exported, monkeypatch):
    from fa_deploy.robustness import twin as twin_mod

    def wrong(*a, **k):
        raise twin_mod.TwinMismatch("model: output 'predictions' 12.0% of elements outside atol 1e-4")

    monkeypatch.setattr(twin_mod.YoloTwin, "verify", wrong)
    r = _bench("--weights", str(overfit), *SPLIT, "--backend", str(exported["int8"]), "--threat", "whitebox")
    assert r.exit_code == 2
    assert "last.int8.onnx" in r.output and "12.0%" in r.output and "--threat transfer" in r.output
    assert "Traceback" not in r.output
