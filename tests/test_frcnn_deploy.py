"""Faster R-CNN deployment: the raw output against torchvision's own eval forward, the two-network split with
torchvision's glue, fa-export to ONNX fp32 / fp16 / int8 parts with per-part parity, the pipeline backend, and
fa-bench --backend over the exported files; TensorRT engines of the parts on a GPU."""
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fa_deploy.runtime.backends import BackendError, TorchBackend
from fa_deploy.runtime.loading import load_backend
from fa_deploy.cli import export_main, main as bench_main
from fa_deploy.runtime.pipeline import PipelineBackend
from fa_deploy.exporting.two_network import torch_runners
from fa_deploy.runtime.tensorrt import tensorrt_available
from fa_train.models import create_model

TINY = dict(backbone="resnet18", fpn_channels=32, min_size=64, max_size=64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("fasterrcnn_resnet50_fpn", 4, **TINY).eval()


def test_raw_output_is_torchvisions_eval_forward_padded(model):
    torch.manual_seed(1)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = model.detector(list(x))  # torchvision's own eval-mode output
        raw = model.export_module()(x)
    assert raw.shape == (2, model.max_detections, 6)
    for r, o in zip(raw, ref):
        k = len(o["scores"])
        assert k > 0  # an untrained predictor still scores every class above box_score_thresh
        torch.testing.assert_close(r[:k, :4], o["boxes"])
        torch.testing.assert_close(r[:k, 4], o["scores"])
        assert torch.equal(r[:k, 5].long(), o["labels"] - 1)
        assert (r[k:] == 0).all()
    back = model.postprocess([raw.numpy()])
    pred = model.predict(x)
    for a, b in zip(back, pred):
        torch.testing.assert_close(a["boxes"], b["boxes"])
        assert torch.equal(a["labels"], b["labels"])


def test_split_with_the_torch_parts_equals_the_whole_model(model):
    torch.manual_seed(2)
    x = torch.rand(3, 3, 64, 64)
    runs = torch_runners(model)
    split = model.run_split(x.numpy(), runs["backbone"], runs["roi_heads"])
    with torch.no_grad():
        whole = model.export_module()(x).numpy()
    np.testing.assert_allclose(split, whole, rtol=0, atol=1e-5)
    # the glue leaves the model as it was
    assert type(model.detector.backbone).__name__ == "BackboneWithFPN"
    assert type(model.detector.roi_heads.box_predictor).__name__ == "FastRCNNPredictor"


@pytest.fixture(scope="module")
def exported(frcnn_exported):
    return frcnn_exported


def test_fa_export_writes_parts_and_manifests_with_parity(exported):
    w, out, output = exported
    for prec in ("fp32", "fp16", "int8"):
        m = json.loads((out / f"last.{prec}.pipeline.json").read_text())
        assert m["format"] == "onnx-pipeline" and m["precision"] == prec and m["classes"] == \
            ["circle", "square", "triangle", "star"]
        for part, f in m["parts"].items():
            assert (out / f).is_file()
        assert m["part_precisions"]["roi_heads"] == ("fp32" if prec == "int8" else prec)
        assert set(m["parity"]) == {"backbone", "roi_heads"}
        if prec != "int8":
            assert all(r["passed"] for r in m["parity"].values())
    assert "parity of each part" in output and "FAIL" not in output
    # fp16 halves the parts; int8 quantizes the backbone part (Q/DQ with int8 weights)
    size = lambda p, part: os.path.getsize(out / f"last.{p}.{part}.onnx")
    assert size("fp16", "backbone") < 0.6 * size("fp32", "backbone")
    assert size("int8", "backbone") < 0.4 * size("fp32", "backbone")
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "last.int8.backbone.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # dynamic batch by default (1:8:32), recorded for the engine profiles; origin inside every part
    from fa_deploy.runtime.metadata import onnx_metadata

    m = json.loads((out / "last.fp32.pipeline.json").read_text())
    assert m["batch_range"] == [1, 8, 32] and m["part_batch_range"]["backbone"] == [1, 8, 32]
    assert onnx_metadata(str(out / "last.int8.backbone.onnx"))["precision"] == "int8"
    assert onnx_metadata(str(out / "last.int8.roi_heads.onnx"))["precision"] == "fp32"


def test_every_part_is_tensorrt_compatible(exported):
    from fa_deploy.exporting.compat import check_tensorrt_compat

    w, out, _ = exported
    parts = sorted(f for f in os.listdir(out) if f.endswith(".onnx"))
    assert len(parts) == 6
    for f in parts:
        rep = check_tensorrt_compat(str(out / f))
        assert rep.ok, rep.summary()
    m = json.loads((out / "last.int8.pipeline.json").read_text())
    assert all(c["ok"] for c in m["tensorrt_compat"].values())


def test_pipeline_backend_matches_the_source(exported):
    w, out, _ = exported
    from fa_train.models import load_model

    model, _ = load_model(str(w))
    x = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    ref = TorchBackend(model).raw(x)[0]
    fp32 = load_backend(str(out / "last.fp32.pipeline.json"))
    assert isinstance(fp32, PipelineBackend) and fp32.precision == "fp32"
    np.testing.assert_allclose(fp32.raw(x)[0], ref, atol=1e-3, rtol=1e-3)
    fp16 = load_backend(str(out / "last.fp16.pipeline.json"))
    dets16, dets32 = model.postprocess(fp16.raw(x)), model.postprocess([ref])
    top16, top32 = dets16[0]["boxes"][:5], dets32[0]["boxes"][:5]
    assert torch.allclose(top16, top32, atol=1.0)  # the strongest boxes agree within a pixel at float16
    assert fp32.size_mb > fp16.size_mb > 0


def test_fa_bench_harness_over_the_exported_files(exported, tmp_path):
    w, out, _ = exported
    js = tmp_path / "h.json"
    r = CliRunner().invoke(bench_main, ["--weights", str(w), "--backend", str(out / "last.fp32.pipeline.json"),
                                        "--backend", str(out / "last.fp16.pipeline.json"), "--backend",
                                        str(out / "last.int8.pipeline.json"), "--max-images", "4", "--steps", "1",
                                        "--workers", "0", "--json", str(js), "--quiet", "--max-drop", "1",
                                        "--max-deploy-misses", "1", "--min-clean-ap", "0"])  # columns, not the gate
    assert r.exit_code == 0, r.output
    rows = json.loads(js.read_text())["rows"]
    # the default --threat all: per pipeline transfer, white-box and differential on its twin (the two part files
    # interpreted in torch with torchvision's glue), and the worst case
    assert [(row["backend"], row["threat"]) for row in rows] == [("source", "own")] + [
        (f"last.{p}.pipeline.json", t) for p in ("fp32", "fp16", "int8")
        for t in ("transfer", "whitebox", "differential", "worst")]
    src, fp32 = rows[0], rows[1]
    assert all(r["misses_clean"] in (0.0, None) for r in rows[1:5])  # the fp32 pipeline is the source
    assert fp32["clean"] == pytest.approx(src["clean"], abs=1e-6) and fp32["drift_clean"] < 1e-3
    assert all(row["ms/img"] > 0 and "PGD-1" in row for row in rows)
    assert rows[1]["provider"] == "ort-cpu (glue: torch-cpu)"


def test_bad_manifest_and_engine_without_tensorrt(exported, tmp_path):
    w, out, _ = exported
    bad = tmp_path / "x.pipeline.json"
    bad.write_text(json.dumps({"format": "something"}))
    with pytest.raises(BackendError, match="not a fa-export pipeline manifest"):
        load_backend(str(bad))
    if tensorrt_available()[0]:
        pytest.skip("TensorRT is available here: the GPU test covers engines")
    r = CliRunner().invoke(export_main, [str(w), "--engine", "fp16", "--out", str(tmp_path / "e"),
                                         "--verify-images", "2"])
    assert r.exit_code == 2
    assert "TensorRT engines not built" in r.output and "--engine fp16" in r.output
    assert (tmp_path / "e" / "last.fp16.pipeline.json").is_file()  # the ONNX parts are written for the GPU


@pytest.mark.skipif(not tensorrt_available()[0], reason="needs TensorRT and an NVIDIA GPU (pip install -e '.[gpu]')")
def test_tensorrt_engines_of_the_parts(exported, tmp_path):
    w, _, _ = exported
    r = CliRunner().invoke(export_main, [str(w), "--engine", "fp16", "--out", str(tmp_path), "--verify-images", "4",
                                         "--dynamic-batch", "1:2:4"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "last.fp16.engine.pipeline.json").read_text())
    assert m["format"] == "tensorrt-pipeline" and all(p["passed"] for p in m["parity"].values())
    be = load_backend(str(tmp_path / "last.fp16.engine.pipeline.json"))
    assert be.format == "tensorrt"
    x = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    assert be.raw(x)[0].shape == (2, 100, 6)


def test_part_engines_through_the_tensorrt_double(exported, tmp_path, monkeypatch):
    """fa-export --engine with a static batch of 1 and the default 8 verify images: each part's parity runs in
    chunks of its own profile (the RoI heads' in RoIs); the backbone's 15 outputs come back by name in the
    manifest's order; the pipeline over the engines gives the ONNX pipeline's detections. Through the TEST DOUBLE of
    TensorRT (tests/trt_double.py; not TensorRT)."""
    import trt_double

    trt_double.install(monkeypatch)
    w, onnx_out, _ = exported
    out = tmp_path / "eng"
    r = CliRunner().invoke(export_main, [str(w), "--engine", "fp32", "--batch", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "last.fp32.engine.pipeline.json").read_text())
    assert m["format"] == "tensorrt-pipeline" and all(p["passed"] for p in m["parity"].values())
    side = json.loads((out / "last.fp32.backbone.engine.json").read_text())
    assert side["outputs"] == m["part_io"]["backbone"]["outputs"] and len(side["outputs"]) == 15
    shapes = [s for _, s in trt_double._Context.executions]
    assert max(s[0] for s in shapes if len(s) == 4 and s[1] == 3) == 1  # backbone: one image at a time
    be = load_backend(str(out / "last.fp32.engine.pipeline.json"))
    assert be.format == "tensorrt" and be.provider.startswith("tensorrt")
    x = np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)
    ref = load_backend(str(onnx_out / "last.fp32.pipeline.json")).raw(x)[0]
    np.testing.assert_allclose(be.raw(x)[0], ref, atol=1e-4, rtol=1e-4)
