"""The engine runtime's control flow (fa_deploy.runtime.engine.EngineRunner, TrtBackend, build_engine) driven through the
TEST DOUBLE of TensorRT's name-based API and of pycuda (tests/trt_double.py). These are not TensorRT results: the
double enforces the documented contract (profile checks, -1 output dims, I/O order unlike the ONNX file's, a stream
of its own, buffer sizes) and computes with ONNX Runtime on the same ONNX file."""
import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import trt_double
from trt_double import tiny_onnx


def expected(x):
    return [2 * x, x + 1, x.sum(1, keepdims=True)]


@pytest.fixture
def trt(monkeypatch):
    return trt_double.install(monkeypatch)


def build(tmp_path, batch="n", profile=(1, 2, 4), cache=None, log=None):
    from fa_deploy.runtime.metadata import write_sidecar
    from fa_deploy.exporting.tensorrt_build import build_engine

    src = tiny_onnx(tmp_path / f"tiny_{batch}.onnx", batch)
    eng = str(tmp_path / f"tiny_{batch}.engine")
    shapes = tuple((b, 3) for b in profile)
    meta = build_engine(src, eng, "x", 0, profile, 64, cache, log=log or (lambda m: None), profile_shapes=shapes)
    write_sidecar(eng, {**meta, "precision": "fp32"})
    return eng, meta


def test_outputs_by_name_in_the_recorded_order_not_the_engines(tmp_path, trt):
    from fa_deploy.runtime.engine import EngineRunner

    eng, meta = build(tmp_path)
    assert meta["outputs"] == ["twice", "plus1", "total"]  # the ONNX file's order, from the parsed network
    runner = EngineRunner(eng)
    engine_order = [runner.engine.get_tensor_name(i) for i in range(runner.engine.num_io_tensors)]
    assert engine_order != ["x", "twice", "plus1", "total"]  # the double lists them otherwise, as TensorRT may
    x = np.arange(9, dtype=np.float32).reshape(3, 3)
    for got, want in zip(runner.raw(x), expected(x)):
        np.testing.assert_array_equal(got, want)


def test_more_images_than_the_profile_run_in_chunks(tmp_path, trt):
    from fa_deploy.runtime.engine import EngineRunner

    eng, _ = build(tmp_path, profile=(1, 2, 4))
    runner = EngineRunner(eng)
    assert runner.batch_range == (1, 2, 4)
    x = np.random.default_rng(0).random((10, 3), dtype=np.float32)
    out = runner.raw(x)
    assert [s for _, s in trt_double._Context.executions] == [(4, 3), (4, 3), (2, 3)]
    for got, want in zip(out, expected(x)):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_static_engine_pads_the_remainder_and_trims_it(tmp_path, trt):
    from fa_deploy.runtime.engine import EngineRunner

    eng, _ = build(tmp_path, batch=2, profile=(2, 2, 2))
    runner = EngineRunner(eng)
    assert runner.batch_range == (2, 2, 2)
    x = np.random.default_rng(1).random((5, 3), dtype=np.float32)
    out = runner.raw(x)
    assert [s for _, s in trt_double._Context.executions] == [(2, 3)] * 3
    assert all(len(o) == 5 for o in out)
    np.testing.assert_allclose(out[2], x.sum(1, keepdims=True), rtol=1e-6)


def test_what_cannot_fit_is_refused_clearly(tmp_path, trt):
    from fa_deploy.runtime.engine import BackendError, EngineRunner

    eng, _ = build(tmp_path)
    runner = EngineRunner(eng)
    with pytest.raises(BackendError, match=r"input shape \(2, 5\) is outside the engine's profile"):
        runner.raw(np.zeros((2, 5), np.float32))  # wrong row length: no chunking can help
    with pytest.raises(BackendError, match="no images"):
        runner.raw(np.zeros((0, 3), np.float32))


def test_one_stream_and_buffers_reused_until_a_shape_grows(tmp_path, trt):
    from fa_deploy.runtime.engine import EngineRunner

    eng, _ = build(tmp_path, profile=(1, 2, 4))
    runner = EngineRunner(eng)
    x = np.ones((4, 3), np.float32)
    runner.raw(x)
    allocs = trt_double._Registry.allocs
    runner.raw(x)
    runner.raw(x[:2])  # smaller: the same buffers
    assert trt_double._Registry.allocs == allocs
    handles = {h for h, _ in trt_double._Context.executions}
    assert len(handles) == 1 and 0 not in handles  # one stream of its own, never the legacy default stream
    runner2 = EngineRunner(eng)
    runner2.raw(x[:1])
    before = trt_double._Registry.allocs
    runner2.raw(x)  # larger than before: those buffers grow
    assert trt_double._Registry.allocs > before


def test_sidecar_outputs_must_match_the_engine(tmp_path, trt):
    from fa_deploy.runtime.metadata import read_sidecar, write_sidecar
    from fa_deploy.runtime.engine import BackendError, EngineRunner

    eng, _ = build(tmp_path)
    write_sidecar(eng, {**read_sidecar(eng), "outputs": ["twice", "plus1"]})
    with pytest.raises(BackendError, match="are not the ones its sidecar records"):
        EngineRunner(eng)


def test_builder_clears_tf32_and_keeps_the_timing_cache(tmp_path, trt):
    from fa_deploy.runtime.engine import EngineRunner

    cache = tmp_path / "trt.cache"
    eng, meta = build(tmp_path, cache=str(cache))
    assert meta["timing_cache"] == "new" and meta["tf32"] is False
    assert EngineRunner(eng).engine.tf32 is False  # the flag TensorRT sets by default was cleared
    assert json.loads(cache.read_bytes())["builds"] == 1  # serialised from config.get_timing_cache() after the build
    _, meta = build(tmp_path, cache=str(cache))
    assert meta["timing_cache"] == "loaded" and json.loads(cache.read_bytes())["builds"] == 2
    cache.write_bytes(json.dumps({"version": "another TensorRT", "builds": 7}).encode())
    said = []
    _, meta = build(tmp_path, cache=str(cache), log=said.append)
    assert meta["timing_cache"] == "rejected, new" and "another TensorRT version or GPU" in said[0]


def test_a_refused_build_is_one_clear_error(tmp_path, trt):
    """ONNX Runtime's default int8 (INT32 bias DequantizeLinear): the parser's refusal becomes TensorRTBuildError."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from fa_deploy.exporting.tensorrt_build import TensorRTBuildError, build_engine

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    b = onnx.numpy_helper.from_array(np.ones(4, np.float32), "b")
    g = helper.make_graph([helper.make_node("Conv", ["images", "w", "b"], ["y"], pads=[1, 1, 1, 1])], "c", [x], [y],
                          [w, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "conv.onnx"))

    class Reader:
        def __init__(self):
            self.it = iter([{"images": np.random.default_rng(1).random((2, 3, 8, 8), dtype=np.float32)}])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(tmp_path / "conv.onnx"), str(tmp_path / "old.int8.onnx"), Reader(),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    with pytest.raises(TensorRTBuildError, match="only activation types allowed"):
        build_engine(str(tmp_path / "old.int8.onnx"), str(tmp_path / "old.engine"), "images", 8, (1, 1, 2), 64)
    assert not os.path.exists(tmp_path / "old.engine")
