"""fa-export (ONNX fp32 / fp16 / int8, sidecars, parity, --engine without TensorRT) and fa-bench's harness
(backends on the same adversarial images, drift, latency, the gate)."""
import json
import os
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from conftest import broken_copy
from fa_deploy.cli import export_main, main as bench_main
from fa_deploy.export import ExportError, check_onnx, parity, sha256
from fa_deploy.tensorrt import tensorrt_available
from fa_train.checkpoint import load_model

needs_trt = pytest.mark.skipif(not tensorrt_available()[0], reason=f"TensorRT/GPU unavailable: "
                                                                 f"{tensorrt_available()[1]}")


def _ort(path, x):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"images": x})[0]


def test_fp32_export_matches_torch(overfit, exported):
    model, _ = load_model(str(overfit))
    x = torch.rand(3, 3, 64, 64)  # batch 3: the batch axis is dynamic
    with torch.no_grad():
        ref = model.eval().export_module()(x).numpy()
    np.testing.assert_allclose(_ort(exported["fp32"], x.numpy()), ref, rtol=1e-4, atol=1e-3)
    m = onnx.load(str(exported["fp32"]))
    assert m.opset_import[0].version >= 17
    assert [i.name for i in m.graph.input] == ["images"] and [o.name for o in m.graph.output] == ["predictions"]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_fp16_keeps_io_and_decode_in_float32(exported):
    m = onnx.load(str(exported["fp16"]))
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert m.graph.input[0].type.tensor_type.elem_type == f32
    assert m.graph.output[0].type.tensor_type.elem_type == f32
    assert sum(i.data_type == f16 for i in m.graph.initializer) > 10  # conv weights are float16
    # Exp (box decode) computes in float32: its input comes through a Cast to float32 or a float32 tensor
    inferred = onnx.shape_inference.infer_shapes(m)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(m.graph.output)}
    exps = [n for n in m.graph.node if n.op_type == "Exp"]
    assert exps and all(types.get(n.output[0]) == f32 for n in exps)


def test_int8_is_symmetric_per_channel_qdq(exported):
    m = onnx.load(str(exported["int8"]))
    ops = [n.op_type for n in m.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    per_channel = int8 = 0
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
            zp = inits[n.input[2]]
            assert zp.dtype in (np.int8, np.int32) and not zp.any()  # symmetric: zero point 0 (int32: biases)
            int8 += int(zp.dtype == np.int8)
            per_channel += int(zp.dtype == np.int8 and zp.ndim == 1 and zp.size > 1)
    assert int8 > 0 and per_channel > 0  # int8 activations and per-channel int8 weights


def test_sidecars(overfit, exported):
    for prec, path in exported.items():
        side = json.loads(open(str(path) + ".json").read())
        assert side["precision"] == prec and side["source_sha256"] == sha256(str(overfit))
        assert side["classes"] == ["circle", "square", "triangle", "star"]
        assert side["input"]["shape"] == ["batch", 3, 64, 64] and side["opset"] >= 17
        assert {"torch", "onnx", "onnxruntime"} <= set(side["versions"])
        assert "parity" in side
    assert json.loads(open(str(exported["fp32"]) + ".json").read())["parity"]["passed"]
    assert json.loads(open(str(exported["fp16"]) + ".json").read())["parity"]["passed"]


def test_parity_gate_function():
    a = [np.ones((2, 5), np.float32)]
    assert parity(a, [a[0] + 1e-5], "fp32")["passed"]
    assert not parity(a, [a[0] + 0.1], "fp32")["passed"]
    assert parity(a, [a[0] + 0.01], "fp16")["passed"]
    assert not parity(a, [np.full((2, 5), np.nan, np.float32)], "fp16")["passed"]
    assert parity(a, [a[0] + 5], "int8")["passed"]  # reported, not gated


def test_engine_without_tensorrt_exits_2_after_writing_onnx(overfit, tmp_path):
    if tensorrt_available()[0]:
        pytest.skip("TensorRT and a GPU are present here")
    r = CliRunner().invoke(export_main, [str(overfit), "--engine", "fp16", "--out", str(tmp_path)])
    assert r.exit_code == 2, r.output
    assert (tmp_path / "last.fp16.onnx").is_file() and (tmp_path / "last.fp16.onnx.json").is_file()
    assert "--engine fp16" in r.output and "pip install -e '.[gpu]'" in r.output


def test_corrupt_onnx_is_refused(tmp_path):
    p = tmp_path / "bad.onnx"
    p.write_bytes(b"not an onnx file")
    with pytest.raises(ExportError, match="bad.onnx: not a valid ONNX model"):
        check_onnx(str(p))


def test_harness_table_and_gate(overfit, exported, tmp_path):
    broken = tmp_path / "broken.fp32.onnx"
    broken_copy(exported["fp32"], broken)
    common = ["--weights", str(overfit), "--test-split", "shapes:train", "--max-images", "2", "--batch-size", "2",
              "--steps", "1,2", "--workers", "0", "--quiet"]
    js = tmp_path / "h.json"
    r = CliRunner().invoke(bench_main, common + ["--backend", str(exported["fp32"]), "--backend",
                                                 str(exported["fp16"]), "--json", str(js),
                                                 "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 0, r.output
    assert "gate (max drop 0.02): PASS" in r.output
    rows = json.loads(js.read_text())["rows"]
    assert [row["backend"] for row in rows] == ["source", "last.fp32.onnx", "last.fp16.onnx"]
    src, fp32 = rows[0], rows[1]
    assert src["clean"] > 0.5
    assert fp32["clean"] == pytest.approx(src["clean"], abs=1e-3) and fp32["drift_clean"] < 1e-3
    for row in rows:
        assert row["ms/img"] > 0 and row["img/s"] > 0 and set(row) >= {"PGD-1", "PGD-2", "advAP", "acAP"}
    assert len(os.listdir(tmp_path / "cache")) == 2  # one file per (batch, k)
    # the broken backend (weights perturbed after export) fails the gate with exit code 1
    rep = tmp_path / "report"
    r = CliRunner().invoke(bench_main, common + ["--backend", str(broken), "--cache-dir", str(tmp_path / "cache"),
                                                 "--report", str(rep), "--num-vis", "1"])
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.output and "broken.fp32.onnx: clean lower by" in r.output
    # the report is written before the exit code: drop plot, trade-off, steps, one picture (source + backend rows)
    for f in ("report.html", "report.md", "deploy_drop.png", "tradeoff.png", "steps.png"):
        assert (rep / f).is_file(), f
    html = (rep / "report.html").read_text()
    assert "class='fail'" in html and html.count("<img ") == 4 and "broken.fp32.onnx" in html
    (pic,) = os.listdir(rep / "detections")
    from PIL import Image

    assert Image.open(rep / "detections" / pic).size == (640, 640)  # 2 rows x 2 columns


def test_bench_attack_none_with_backends(overfit, exported):
    r = CliRunner().invoke(bench_main, ["--weights", str(overfit), "--attack", "none", "--backend",
                                        str(exported["int8"]), "--test-split", "shapes:train", "--max-images", "2",
                                        "--workers", "0", "--quiet", "--max-drop", "1"])  # columns, not the gate
    assert r.exit_code == 0, r.output
    assert "ms/img" in r.output and "PGD-1" not in r.output


@needs_trt
def test_tensorrt_engine_build_and_parity(overfit, tmp_path):
    r = CliRunner().invoke(export_main, [str(overfit), "--engine", "fp16", "--out", str(tmp_path),
                                         "--dynamic-batch", "1:2:4"])
    assert r.exit_code == 0, r.output
    eng = tmp_path / "last.fp16.engine"
    side = json.loads(open(str(eng) + ".json").read())
    assert side["tensorrt"] and side["gpu"] and side["parity"]["passed"]
    # an engine "built elsewhere" is refused before deserialising
    side["gpu"] = "Some Other GPU"
    open(str(eng) + ".json", "w").write(json.dumps(side))
    from fa_deploy.backends import TrtBackend
    from fa_deploy.tensorrt import EngineMismatch

    with pytest.raises(EngineMismatch, match="built elsewhere"):
        TrtBackend(str(eng))
