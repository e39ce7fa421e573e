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
from fa_deploy.exporting.onnx_export import ExportError, check_onnx, parity
from fa_deploy.runtime.metadata import sha256
from fa_deploy.runtime.tensorrt import tensorrt_available
from fa_train.models import load_model

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


def int32_dequantize_nodes(model):
    inits = {i.name: i.data_type for i in model.graph.initializer}
    return [n for n in model.graph.node
            if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) == onnx.TensorProto.INT32]


def test_int8_is_symmetric_per_channel_qdq(exported):
    m = onnx.load(str(exported["int8"]))
    ops = [n.op_type for n in m.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    per_channel = int8 = 0
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
            zp = inits[n.input[2]]
            assert zp.dtype == np.int8 and not zp.any()  # symmetric int8: zero point 0, no INT32 (bias) Q/DQ
            int8 += 1
            per_channel += int(zp.ndim == 1 and zp.size > 1)
    assert int8 > 0 and per_channel > 0  # int8 activations and per-channel int8 weights
    assert not int32_dequantize_nodes(m)  # Conv biases stay float: TensorRT's parser refuses INT32 DequantizeLinear


def test_tensorrt_compatibility_of_every_file_and_of_the_old_int8(exported, tmp_path):
    """fp32/fp16/int8 pass the CPU-side TensorRT check; the int8 file as ONNX Runtime writes it by default (INT32
    bias DequantizeLinear, what fa-export wrote before) fails it, naming the nodes."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from fa_deploy.exporting import onnx_export as ex
    from fa_deploy.exporting.compat import check_tensorrt_compat

    for prec, path in exported.items():
        rep = check_tensorrt_compat(str(path))
        assert rep.ok, rep.summary()
        side = json.loads(open(str(path) + ".json").read())
        assert side["tensorrt_compat"]["ok"]
    cal = ex.rebatch([np.random.default_rng(0).random((4, 3, 64, 64), dtype=np.float32)], (1, 2, 4))
    old = tmp_path / "old.int8.onnx"
    quantize_static(str(exported["fp32"]), str(old), ex._CalibrationReader(cal), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    n_int32 = len(int32_dequantize_nodes(onnx.load(str(old))))
    assert n_int32 > 0
    rep = check_tensorrt_compat(str(old))
    assert not rep.ok and len([p for p in rep.problems if "dequantizes a INT32" in p]) == n_int32
    assert "TensorRT takes INT8/FP8/INT4/FP4 only" in " ".join(rep.problems) and not rep.ok


def test_onnx_metadata_records_the_origin(overfit, exported):
    from fa_deploy.runtime.metadata import onnx_metadata

    for prec, path in exported.items():
        meta = onnx_metadata(str(path))
        assert meta["source_sha256"] == sha256(str(overfit)) and meta["precision"] == prec
        assert meta["batch_range"] == [1, 2, 4] and meta["img_size"] == 64 and meta["fa_toolkit_version"]
        assert meta["classes"] == ["circle", "square", "triangle", "star"]


def test_sidecars(overfit, exported):
    for prec, path in exported.items():
        side = json.loads(open(str(path) + ".json").read())
        assert side["precision"] == prec and side["source_sha256"] == sha256(str(overfit))
        assert side["classes"] == ["circle", "square", "triangle", "star"]
        assert side["input"]["shape"] == ["batch", 3, 64, 64] and side["opset"] >= 17
        assert side["batch_range"] == [1, 2, 4] and side["dynamic_batch"]
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
              "--steps", "1,2", "--workers", "0", "--quiet", "--threat", "transfer"]  # threats: test_threats.py
    js = tmp_path / "h.json"
    r = CliRunner().invoke(bench_main, common + ["--backend", str(exported["fp32"]), "--backend",
                                                 str(exported["fp16"]), "--json", str(js),
                                                 "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 0, r.output
    assert "gate (max drop 0.02, max deployment-only misses 10%, max drift per precision): PASS" in r.output
    rows = json.loads(js.read_text())["rows"]
    assert [row["backend"] for row in rows] == ["source", "last.fp32.onnx", "last.fp16.onnx"]
    assert [row["provider"] for row in rows] == ["torch-cpu", "ort-cpu", "ort-cpu"]
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


def bench_attack_none(weights, backend, *extra):
    """fa-bench --attack none of one backend against its source on the source's two training images."""
    return CliRunner().invoke(bench_main, ["--weights", str(weights), "--attack", "none", "--backend", str(backend),
                                           "--test-split", "shapes:train", "--max-images", "2", "--workers", "0",
                                           "--quiet", *extra])


def test_bench_attack_none_with_backends(overfit, exported):
    r = bench_attack_none(overfit, exported["int8"], "--max-drop", "1")  # columns, not the gate
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
    from fa_deploy.runtime.backends import TrtBackend
    from fa_deploy.runtime.tensorrt import EngineMismatch

    with pytest.raises(EngineMismatch, match="built elsewhere"):
        TrtBackend(str(eng))


def test_static_batch_export_then_bench_with_a_larger_batch(overfit, tmp_path):
    """As a new user would: fa-export --batch 1 (a static batch; int8 calibrates with batches the fp32 file accepts),
    then fa-bench --backend with its default batch of 16: the backends run it in chunks, the AP is the source's."""
    out = tmp_path / "static"
    r = CliRunner().invoke(export_main, [str(overfit), "--onnx", "fp32", "--onnx", "int8", "--batch", "1",
                                         "--out", str(out), "--calib-images", "8", "--verify-images", "3"])
    assert r.exit_code == 0, r.output
    m = onnx.load(str(out / "last.fp32.onnx"))
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    js = tmp_path / "b.json"
    r = bench_attack_none(overfit, out / "last.fp32.onnx", "--json", str(js))
    assert r.exit_code == 0, r.output
    rows = json.loads(js.read_text())["rows"]
    assert rows[1]["clean"] == pytest.approx(rows[0]["clean"], abs=1e-6) and rows[1]["drift_clean"] < 1e-3


def test_errors_exit_2_never_the_gates_1(overfit, exported, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    common = ["--weights", str(overfit), "--attack", "none", "--test-split", "shapes:train", "--max-images", "2",
              "--workers", "0", "--quiet"]
    r = CliRunner().invoke(bench_main, common + ["--backend", str(bad)])
    assert r.exit_code == 2 and "not a valid ONNX model" in r.output
    r = CliRunner().invoke(bench_main, common + ["--backend", str(exported["fp32"]), "--provider", "cuda"])
    assert r.exit_code == 2 and "not in this build" in r.output  # onnxruntime (CPU) has no CUDA provider
    r = CliRunner().invoke(export_main, [str(overfit), "--onnx", "fp32", "--batch", "2", "--dynamic-batch", "1:2:4",
                                         "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "exclude each other" in r.output


def test_engines_through_the_tensorrt_double(overfit, tmp_path, monkeypatch):
    """fa-export --engine (static batch 1, 8 verify images: chunked by the engine's profile) and fa-bench --backend
    over the engines (batch 16), through the TEST DOUBLE of TensorRT (tests/trt_double.py; not TensorRT)."""
    import trt_double

    trt_double.install(monkeypatch)
    out = tmp_path / "eng"
    r = CliRunner().invoke(export_main, [str(overfit), "--engine", "fp32", "--engine", "int8", "--batch", "1",
                                         "--out", str(out), "--calib-images", "8", "--verify-images", "8"])
    assert r.exit_code == 0, r.output
    for prec in ("fp32", "int8"):
        side = json.loads((out / f"last.{prec}.engine.json").read_text())
        assert side["tensorrt"] == trt_double.DOUBLE_VERSION and side["outputs"] == ["predictions"]
        assert side["tf32"] is False and side["batch_range"] == [1, 1, 1]
        if prec == "fp32":
            assert side["parity"]["passed"]
    assert {s for _, s in trt_double._Context.executions} == {(1, 3, 64, 64)}  # never more than the profile
    js = tmp_path / "e.json"
    r = bench_attack_none(overfit, out / "last.fp32.engine", "--json", str(js))
    assert r.exit_code == 0, r.output
    rows = json.loads(js.read_text())["rows"]
    assert rows[1]["provider"] == "tensorrt" and rows[1]["clean"] == pytest.approx(rows[0]["clean"], abs=1e-6)
