"""Differentiable twins of the deployed files (fa_deploy/robustness/twin.py, fa_deploy/robustness/interpreter.py): equal to ONNX Runtime's
outputs of the same file for fp32 / fp16 / int8 YOLOv3 and both Faster R-CNN parts, int8 with int32 and with float
biases; a wrong twin refused with the numbers; gradients to the input; PGD on the int8 twin raises the loss of
the deployed file itself."""
import json

import numpy as np
import onnx
import pytest
import torch

from fa_deploy.robustness.interpreter import OnnxGraph
from conftest import checkpoint_images
from fa_deploy.robustness.twin import (TOLERANCES, FasterRCNNTwin, TwinError, TwinMismatch, YoloTwin, load_twin,
                                       reference_session, verify_twin)
from fa_train.models import load_model

PRECISIONS = ("fp32", "fp16", "int8")




@pytest.fixture(scope="module")
def yolo_data(overfit):
    return checkpoint_images(overfit, 2, "shapes:train")  # the overfit model's own two images: it detects them


@pytest.fixture(scope="module")
def frcnn(frcnn_exported):
    w, out, _ = frcnn_exported  # tests/conftest.py: shared with the deployment tests
    return w, out, checkpoint_images(w, 2, "shapes:test")


def _loss(model, x, targets):
    losses, _ = model.forward_train(x, targets)
    return sum(losses.values())


def test_yolo_twins_equal_onnxruntime(overfit, exported, yolo_data):
    x, targets = yolo_data
    source, _ = load_model(str(overfit))
    source.eval()
    for prec in PRECISIONS:
        twin = load_twin(str(exported[prec]), verify_images=x)
        assert isinstance(twin, YoloTwin) and twin.precision == prec
        rep = twin.verification["model"]
        assert rep["passed"] and rep["tolerance"] == TOLERANCES[prec]
        # the three head maps the loss reads and the M-th layer are checked too, not only the decoded output
        assert len(rep["outputs"]) == 5 and all(o["passed"] for o in rep["outputs"].values())
        if prec == "fp16":  # float16 kept as float16 torch tensors (for a GPU) verifies too
            assert load_twin(str(exported[prec]), verify_images=x, fp16="native").verification["model"]["passed"]
        if prec == "int8":  # every quantized activation, in steps, on ONNX Runtime's own inputs
            assert len(rep["activations"]) > 40
            assert max(a["max_steps"] for a in rep["activations"].values()) <= 1.0 + 1e-3
            assert "free_running" in rep
        with torch.no_grad():
            twin_loss, src_loss = float(_loss(twin, x, targets)), float(_loss(source, x, targets))
            pred = twin.predict(x)
        if prec == "fp32":  # the fp32 file is the source model: same loss, same detections
            assert twin_loss == pytest.approx(src_loss, rel=1e-4)
            ref = source.predict(x)
            assert torch.allclose(pred[0]["boxes"][:5], ref[0]["boxes"][:5], atol=1e-2)
        assert np.isfinite(twin_loss) and len(pred) == 2 and twin.features(x).shape[1] == source.mid_channels


def test_frcnn_twins_equal_onnxruntime_parts_and_pipeline(frcnn):
    from fa_deploy.runtime.pipeline import PipelineBackend

    w, out, (x, targets) = frcnn
    source, _ = load_model(str(w))
    source.eval()
    for prec in PRECISIONS:
        manifest = out / f"last.{prec}.pipeline.json"
        twin = load_twin(str(manifest), verify_images=x)
        assert isinstance(twin, FasterRCNNTwin)
        assert twin.precisions == {"backbone": prec, "roi_heads": "fp32" if prec == "int8" else prec}
        assert set(twin.verification) == {"backbone", "roi_heads"}
        assert all(r["passed"] for r in twin.verification.values())
        assert len(twin.verification["backbone"]["outputs"]) == 16  # 15 outputs + layer4 (the M-th layer)
        with torch.no_grad():
            torch.manual_seed(0)
            twin_loss = float(_loss(twin, x, targets))
            torch.manual_seed(0)  # the same proposal sampling for both
            src_loss = float(_loss(source, x, targets))
            raw = twin.export_module()(x).numpy()
        assert np.isfinite(twin_loss) and twin.features(x).shape[1] == source.mid_channels
        if prec == "fp32":
            assert twin_loss == pytest.approx(src_loss, rel=1e-4)
            # the twin's pipeline is the deployed pipeline: same detections as PipelineBackend on the same files
            np.testing.assert_allclose(raw, PipelineBackend(str(manifest), ["CPUExecutionProvider"]).raw(x.numpy())[0],
                                       atol=1e-3, rtol=1e-3)


def _int8_with_bias(fp32_path, out_path, x, quantize_bias: bool):
    """The int8 form with float convolution biases (ONNX Runtime's QuantizeBias: False, fa-export's form) or with
    int32 biases dequantized (ONNX Runtime's default, which TensorRT cannot parse; others' files may have it)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from fa_deploy.exporting.onnx_export import _CalibrationReader, decode_nodes
    from fa_train.models.yolov3 import YoloV3

    exclude = decode_nodes(onnx.load(str(fp32_path)), YoloV3.export_keep_float32)
    quantize_static(str(fp32_path), str(out_path), _CalibrationReader([x]), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": quantize_bias})


def _int32_bias_dqs(path):
    m = onnx.load(str(path))
    inits = {i.name: i.data_type for i in m.graph.initializer}
    return sum(n.op_type == "DequantizeLinear" and inits.get(n.input[0]) == onnx.TensorProto.INT32
               for n in m.graph.node)


def test_int8_twin_with_int32_and_with_float_biases(exported, yolo_data, tmp_path):
    x, _ = yolo_data
    assert _int32_bias_dqs(exported["int8"]) == 0  # fa-export's int8: float biases
    int32_bias = tmp_path / "last.int8.onnx"
    _int8_with_bias(exported["fp32"], int32_bias, x.numpy(), quantize_bias=True)
    assert _int32_bias_dqs(int32_bias) > 0
    rep = verify_twin(OnnxGraph(str(int32_bias)), str(int32_bias), x.numpy())
    assert rep["precision"] == "int8" and rep["passed"]


def _scaled_activation(path, which, factor):
    """The int8 model with one activation's quantization scale multiplied by `factor` (in memory)."""
    name = OnnxGraph(str(path)).fake_quant_steps()[which].attrs["q_output"]
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.output[0] == name)
    s = inits[q.input[1]]
    s.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(s) * np.float32(factor), s.name))
    return m, q.output[0]


def test_wrong_twin_is_refused_with_the_numbers(exported, yolo_data, frcnn):
    x, targets = yolo_data
    for which in (3, -5):  # an early and a late activation
        wrong, name = _scaled_activation(exported["int8"], which, 2.0)
        with pytest.raises(TwinMismatch) as e:
            verify_twin(OnnxGraph(wrong), str(exported["int8"]), x.numpy())
        msg = str(e.value)
        assert str(exported["int8"]) in msg and name in msg and "steps" in msg and "away from a rounding tie" in msg
    # a twin is never used unverified, and a failed verify leaves it unusable
    twin = load_twin(str(exported["int8"]))
    with pytest.raises(TwinError, match="not verified"):
        twin.forward_train(x, targets)
    twin.graphs["model"] = OnnxGraph(_scaled_activation(exported["int8"], 3, 2.0)[0])
    with pytest.raises(TwinMismatch):
        twin.verify(x)
    with pytest.raises(TwinError, match="not verified"):
        twin.predict(x)
    # the same for a Faster R-CNN part
    w, out, (fx, _) = frcnn
    part = out / "last.int8.backbone.onnx"
    wrong, name = _scaled_activation(part, 10, 0.5)
    transformed = load_model(str(w))[0].detector.transform(list(fx))[0].tensors.numpy()
    with pytest.raises(TwinMismatch, match="last.int8.backbone.onnx"):
        verify_twin(OnnxGraph(wrong), str(part), transformed)


def _scaled_convs(path, factor, first_only=False):
    """The float model with its first (or every) convolution's weights multiplied by `factor` (in memory), and the
    first such convolution."""
    m = onnx.load(path)
    inits = {i.name: i for i in m.graph.initializer}
    convs = [n for n in m.graph.node if n.op_type == "Conv" and n.input[1] in inits]
    for conv in convs[:1] if first_only else convs:
        w = inits[conv.input[1]]
        arr = onnx.numpy_helper.to_array(w)
        w.CopyFrom(onnx.numpy_helper.from_array((arr.astype(np.float32) * factor).astype(arr.dtype), w.name))
    return m, convs[0]


def test_float_twin_with_one_wrong_layer_is_refused_layer_by_layer(exported, yolo_data):
    """A float twin whose free-running outputs miss the gate by less than LAYER_CHECK_SLACK x is checked layer by
    layer (each layer fed ONNX Runtime's own inputs; what lets an ill-conditioned network such as FCOS at 64 px
    verify): one convolution's weights off by 0.02 % (fp32; 5 % at fp16, whose gate is 3e-2 x rms) is still
    refused, and the check names that layer and no other."""
    x, _ = yolo_data
    for prec, factor in (("fp32", 1.0002), ("fp16", 1.05)):
        path = str(exported[prec])
        m, conv = _scaled_convs(path, factor, first_only=True)
        with pytest.raises(TwinMismatch) as e:
            verify_twin(OnnxGraph(m), path, x.numpy())
        msg = str(e.value)
        assert "layer by layer" in msg and path in msg, msg
        layers = msg.split("layer by layer")[1]
        assert f"tap {conv.output[0]}:" in layers, msg
        assert layers.count("of elements outside") == layers.count(f"tap {conv.output[0]}:") >= 1, msg
        # the untouched twin passes on the same inputs, free running
        rep = verify_twin(OnnxGraph(path), path, x.numpy())
        assert rep["passed"] and "layers" not in rep


def _clip_model(path, top):
    """x -> Mul 10 -> Clip(0, top) -> y: a float graph with one decision per element."""
    from onnx import TensorProto, helper

    inits = [onnx.numpy_helper.from_array(np.array(10.0, np.float32), "ten"),
             onnx.numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
             onnx.numpy_helper.from_array(np.array(top, np.float32), "hi")]
    g = helper.make_graph([helper.make_node("Mul", ["x", "ten"], ["m"], name="mul"),
                           helper.make_node("Clip", ["m", "lo", "hi"], ["y"], name="clip")], "clip",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1, 4, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return m


def test_float_layer_check_covers_every_input_and_only_near_misses(tmp_path):
    """The layer-by-layer decision is open only to a twin whose free-running outputs are within LAYER_CHECK_SLACK x
    the gate, and then runs on every verification input: a twin wrong only on the later (bright) inputs is refused
    by its Clip layer there; a twin whose every layer is a little off (free running far past the gate) is refused
    without it (small errors that stay within the gate layer by layer add up free running)."""
    from fa_deploy.robustness.twin import LAYER_CHECK_SLACK

    path = tmp_path / "clip.onnx"
    _clip_model(path, 6.0)
    x = np.concatenate([np.full((2, 1, 4, 4), 0.1, np.float32), np.ones((2, 1, 4, 4), np.float32)])
    # Clip(0, 6.003): 0.003 apart on the bright inputs only, 7e-4 x rms: past the fp32 gate, within the slack
    with pytest.raises(TwinMismatch, match=r"layer by layer .*inputs 0-3: output y"):
        verify_twin(OnnxGraph(_clip_model(tmp_path / "wrong.onnx", 6.003)), str(path), x)
    # Clip(0, 6.1): 50x the gate free running: refused as it stands
    with pytest.raises(TwinMismatch, match=f"beyond {LAYER_CHECK_SLACK:g}x the gate: no layer-by-layer check"):
        verify_twin(OnnxGraph(_clip_model(tmp_path / "wrong2.onnx", 6.1)), str(path), x)
    assert verify_twin(OnnxGraph(str(path)), str(path), x)["passed"]


def test_float_twin_off_a_little_in_every_layer_is_refused(exported, yolo_data):
    """Every convolution's weights of the fp16 twin x 1.01 (each layer alone within the fp16 gate): refused."""
    x, _ = yolo_data
    path = str(exported["fp16"])
    with pytest.raises(TwinMismatch):
        verify_twin(OnnxGraph(_scaled_convs(path, 1.01)[0]), path, x.numpy())


def test_int8_flips_at_a_rounding_tie_are_float_order_not_a_wrong_twin():
    """The int8 gate counts the elements a step apart from ONNX Runtime's only where the twin's value before rounding
    was not on a rounding boundary (within `tie_steps`): one channel of a squeeze-excitation layer that sits on a
    boundary for every image flips together (measured on a tiny SSDlite: 16 of 128 elements, 12.5 %, every flip
    within 0.0023 steps of a boundary), while a wrong scale moves values that are nowhere near one. Hand-made
    tensors: scale 0.5, zero point 0."""
    from types import SimpleNamespace

    from fa_deploy.robustness.twin import _activation_steps

    class G:  # the two constants _activation_steps reads
        def constant(self, name):
            return {"s": torch.tensor(0.5), "z": torch.tensor(0.0)}[name]

    st = SimpleNamespace(outputs=["y"], inputs=["x", "s", "z"], attrs={"q_output": "y_q", "axis": 1})
    onnxruntime = torch.tensor([[1.0, 2.0, 3.0, 0.5, -1.0, 1.5, 2.5, 0.0]])  # ONNX Runtime's dequantized values
    unrounded = onnxruntime.clone()
    unrounded[0, :2] = torch.tensor([1.2501, 1.7499])  # 2.5002 / 3.4998 steps: a tie, rounded the other way
    twin = onnxruntime.clone()
    twin[0, :2] = torch.tensor([1.5, 1.5])
    tie = TOLERANCES["int8"]["tie_steps"]
    (a,) = _activation_steps(G(), [st], {"y": twin}, {"y": onnxruntime}, {"x": unrounded}, tie).values()
    assert a["flip_fraction"] == 0.25 and a["off_tie_flip_fraction"] == 0.0 and a["max_steps"] == 1.0
    unrounded[0, :2] = torch.tensor([1.40, 1.60])  # 2.8 / 3.2 steps: not a tie, yet a step apart
    (a,) = _activation_steps(G(), [st], {"y": twin}, {"y": onnxruntime}, {"x": unrounded}, tie).values()
    assert a["flip_fraction"] == 0.25 and a["off_tie_flip_fraction"] == 0.25


def test_exposing_int8_activations_leaves_onnxruntime_outputs_unchanged(exported, yolo_data, frcnn):
    """The int8 check reads ONNX Runtime's integer activations; exposing them must not change what it computes. It
    runs at ONNX Runtime's basic optimisations (QDQ as ONNX defines it: fused integer kernels cannot fuse around an
    exposed tensor and would round otherwise): there, exposing changes nothing, bit for bit."""
    x, _ = yolo_data
    w, out, (fx, _) = frcnn
    transformed = load_model(str(w))[0].detector.transform(list(fx))[0].tensors.numpy()
    for path, inp in ((exported["int8"], x.numpy()), (out / "last.int8.backbone.onnx", transformed)):
        g = OnnxGraph(str(path))
        expose = {st.attrs["q_output"]: st.attrs["q_type"] for st in g.fake_quant_steps()}
        plain = reference_session(str(path), "int8", unfused=True).run(g.output_names, {g.input_names[0]: inp})
        exposed = reference_session(str(path), "int8", expose).run(g.output_names, {g.input_names[0]: inp})
        for a, b in zip(plain, exposed):
            np.testing.assert_array_equal(a, b)


def test_gradients_reach_the_input(exported, yolo_data, frcnn):
    x, targets = yolo_data
    w, out, (fx, ftargets) = frcnn
    twins = [(load_twin(str(exported[p]), verify_images=x), x, targets) for p in PRECISIONS]
    twins.append((load_twin(str(out / "last.int8.pipeline.json"), verify_images=fx), fx, ftargets))
    for twin, images, t in twins:
        xx = images.clone().requires_grad_(True)
        _loss(twin, xx, t).backward()
        g = xx.grad
        assert torch.isfinite(g).all() and g.abs().sum() > 0, twin.source
        assert not list(twin.parameters())  # the file's weights are constants of the twin, never trained


def _deployed_loss(path, twin, x, targets):
    """The detection loss of the deployed file itself: ONNX Runtime's head maps (exposed from a session configured
    as the backend runs int8 files on the CPU: its high-precision integer mode; the default x86 kernels without VNNI
    saturate and compute another function), through the model's own yolo_loss."""
    import onnxruntime as ort

    from fa_train.models.yolov3 import yolo_loss

    m = onnx.load(str(path))
    for name in twin.head_names:
        m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.add_session_config_entry("session.x64quantprecision", "1")
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    heads = [torch.from_numpy(h) for h in s.run(twin.head_names, {"images": x.numpy()})]
    return float(sum(yolo_loss(heads, targets, twin.anchors, twin.strides, twin.num_classes, twin.cfg.loss).values()))


def test_pgd_on_the_int8_twin_raises_the_deployed_files_loss(exported, yolo_data):
    from fa_train.adversarial.attacks import pgd_attack

    x, targets = yolo_data
    twin = load_twin(str(exported["int8"]), verify_images=x)
    adv = pgd_attack(twin, x, targets, eps=0.03, steps=3)
    assert (adv - x).abs().max() <= 0.03 + 1e-6 and not torch.equal(adv, x)
    with torch.no_grad():
        assert float(_loss(twin, adv, targets)) > 1.2 * float(_loss(twin, x, targets))
    # the file itself: ONNX Runtime's loss rises with the twin's, and the twin still matches it on the attacked images
    clean, attacked = (_deployed_loss(exported["int8"], twin, im, targets) for im in (x, adv))
    assert attacked > 1.2 * clean
    assert twin.verify(adv)["model"]["passed"]


def test_load_twin_of_engines_and_bad_inputs(exported, yolo_data, frcnn, tmp_path):
    x, _ = yolo_data
    engine = tmp_path / "last.int8.engine"  # a TensorRT engine is attacked through the ONNX file it was built from
    engine.write_bytes(b"not read")
    (tmp_path / "last.int8.engine.json").write_text(json.dumps({"format": "tensorrt", "onnx": str(exported["int8"])}))
    twin = load_twin(str(engine), verify_images=x)
    assert twin.files["model"] == str(exported["int8"]) and twin.precision == "int8"
    # an engine pipeline: each part's engine names its ONNX part
    _, out, _ = frcnn
    info = json.loads((out / "last.fp16.pipeline.json").read_text())
    for part, onnx_name in info["parts"].items():
        (tmp_path / f"{part}.engine").write_bytes(b"not read")
        (tmp_path / f"{part}.engine.json").write_text(json.dumps({"onnx": str(out / onnx_name)}))
    info.update(format="tensorrt-pipeline", parts={p: f"{p}.engine" for p in info["parts"]})
    (tmp_path / "last.fp16.engine.pipeline.json").write_text(json.dumps(info))
    twin = load_twin(str(tmp_path / "last.fp16.engine.pipeline.json"))
    assert isinstance(twin, FasterRCNNTwin) and twin.files["backbone"] == str(out / "last.fp16.backbone.onnx")
    assert twin.precision == "fp16" and twin.verification is None
    (tmp_path / "last.int8.engine.json").write_text(json.dumps({"format": "tensorrt"}))
    with pytest.raises(TwinError, match="built from"):
        load_twin(str(engine))
    bare = tmp_path / "bare.onnx"  # no sidecar: the model is read from the file's own metadata
    bare.write_bytes(exported["fp32"].read_bytes())
    assert isinstance(load_twin(str(bare)), YoloTwin)
    m = onnx.load(str(bare))
    del m.metadata_props[:]  # and a file nothing describes is refused, named
    onnx.save(m, str(bare))
    with pytest.raises(TwinError, match="neither a fa-export sidecar .* nor the file's metadata"):
        load_twin(str(bare))
    m = onnx.load(str(exported["fp32"]))
    m.graph.node[-1].op_type = "Einsum"
    with pytest.raises(Exception, match="operators outside what the twin interprets"):
        OnnxGraph(m)
