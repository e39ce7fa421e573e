"""Issue 23, the verdict's last errors, each tested against an independent reference: twins whose per-image outputs
and gradients do not depend on the batch (ONNX Runtime one image at a time the reference), a worst row whose
aggregates come from its own columns, the gate failing a file that computes another function (--max-drift), the
ONNX interpreter's attributes against ONNX Runtime on hand-made graphs, TOG-mislabel on Faster R-CNN following
each clean detection, and twin verification on more and on perturbed images."""
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from conftest import checkpoint_images
from fa_deploy.robustness.interpreter import GraphError, OnnxGraph
from fa_deploy.robustness.twin import TOLERANCES, compare, load_twin, reference_session, verify_twin
from fa_train.models import load_model

PRECISIONS = ("fp32", "fp16", "int8")




@pytest.fixture(scope="module")
def frcnn_export(frcnn_exported):
    w, out, _ = frcnn_exported  # tests/conftest.py: the shared tiny Faster R-CNN and its pipelines
    return w, out


def _eight(weights, split):
    """8 images: 4 test images and the same 4 with uniform noise of 0.03 (the twin is used on attacked images)."""
    x, _ = checkpoint_images(weights, 4, split)
    g = torch.Generator().manual_seed(3)
    noisy = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * 0.03).clamp(0, 1)
    return torch.cat([x, noisy])


# ---------------------------------------------------------------------------------------------- defect 1


def _rows_and_grads(fn, x):
    """fn(images) -> list of [N,...] tensors; returns the outputs and the gradient of a fixed per-image linear
    functional of them (so image i's gradient depends on image i only, if the twin is batch-independent)."""
    xx = x.clone().requires_grad_(True)
    outs = fn(xx)
    g = torch.Generator().manual_seed(5)
    total = 0
    for o in outs:
        r = torch.randn(o.shape[1:], generator=g)
        total = total + (o.float() * r).sum()
    total.backward()
    return [o.detach() for o in outs], xx.grad


def _batch_independent(fn, x):
    outs8, grad8 = _rows_and_grads(fn, x)
    for i in range(len(x)):
        outs1, grad1 = _rows_and_grads(fn, x[i:i + 1])
        for a, b in zip(outs8, outs1):
            assert torch.equal(a[i:i + 1], b), (i, float((a[i:i + 1] - b).abs().max()))
        assert torch.equal(grad8[i:i + 1], grad1), (i, float((grad8[i:i + 1] - grad1).abs().max()))


def test_yolo_twins_are_batch_independent_and_equal_onnxruntime_per_image(overfit, exported):
    x = _eight(overfit, "shapes:test")
    for prec in PRECISIONS:
        twin = load_twin(str(exported[prec]), verify_images=x[:2])
        names = twin.head_names + twin.graphs["model"].output_names
        _batch_independent(lambda im: twin._run("model", {twin.input_name: im}, names), x)
        # ONNX Runtime per image is the reference: the exported file is batch-independent (static scales), and the
        # twin's batch of 8 equals it image by image within the twin's tolerance (int8: layer by layer)
        g = twin.graphs["model"]
        sess = reference_session(str(exported[prec]), prec)
        with torch.no_grad():
            rows = [o.numpy() for o in g.run({twin.input_name: x}, g.output_names)]
        batched = sess.run(g.output_names, {twin.input_name: x.numpy()})
        for i in range(len(x)):
            one = sess.run(g.output_names, {twin.input_name: x[i:i + 1].numpy()})
            for a, b in zip(one, batched):
                np.testing.assert_array_equal(a[0], b[i])  # the file itself: batch-independent
            if prec == "int8":
                assert verify_twin(g, str(exported[prec]), x[i:i + 1].numpy())["passed"]
            else:
                rep = compare(one, [r[i:i + 1] for r in rows], g.output_names, TOLERANCES[prec])
                assert all(o["passed"] for o in rep.values()), rep


def test_frcnn_twins_are_batch_independent(frcnn_export):
    w, out = frcnn_export
    x = _eight(w, "shapes:test")
    for prec in PRECISIONS:
        twin = load_twin(str(out / f"last.{prec}.pipeline.json"), verify_images=x[:2])
        bb = twin.graphs["backbone"]
        _batch_independent(lambda im: twin._run("backbone", {twin.backbone_input: im}, twin.backbone_outputs), x)
        # the RoI head part runs on each image's RoIs alone: a group's rows are those of the group run by itself
        rh = twin.graphs["roi_heads"]
        torch.manual_seed(0)
        feats = torch.randn(24, *_roi_shape(out, prec))
        with torch.no_grad():
            grouped = twin._run("roi_heads", {rh.input_names[0]: feats}, rh.output_names, sizes=[5, 7, 12])
            for lo, hi in ((0, 5), (5, 12), (12, 24)):
                alone = twin._run("roi_heads", {rh.input_names[0]: feats[lo:hi]}, rh.output_names, sizes=[hi - lo])
                for a, b in zip(grouped, alone):
                    assert torch.equal(a[lo:hi], b)
        # the whole pipeline: detections (transform, proposals, RoI heads, post-processing) and their gradient
        _batch_independent(lambda im: [twin.export_module()(im)], x)
        assert bb is twin.graphs["backbone"]


def _roi_shape(out, prec):
    m = onnx.load(str(out / f"last.{prec}.roi_heads.onnx"))
    return [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim[1:]]


# ---------------------------------------------------------------------------------------------- defect 4


def test_the_worst_row_is_one_row_and_the_gate_reads_it():
    from fa_deploy.robustness.harness import gate
    from fa_deploy.robustness.threats import worst_over_threats

    # each threat's advAP is the mean of its PGD-1 / PGD-3: 0.30 and 0.25; the worst columns are 0.20 and 0.10
    rows = [{"backend": "b", "threat": "whitebox", "clean": 0.80, "PGD-1": 0.50, "PGD-3": 0.10, "advAP": 0.30,
             "acAP": 0.55},
            {"backend": "b", "threat": "differential", "clean": 0.79, "PGD-1": 0.20, "PGD-3": 0.30, "advAP": 0.25,
             "acAP": 0.52}]
    keys = ["clean", "PGD-1", "PGD-3", "advAP", "acAP"]
    w = worst_over_threats(rows, keys, [], ["PGD-1", "PGD-3"])
    assert (w["clean"], w["PGD-1"], w["PGD-3"]) == (0.79, 0.20, 0.10)
    assert w["advAP"] == pytest.approx(0.15) and w["acAP"] == pytest.approx((0.79 + 0.15) / 2)  # by hand
    assert w["worst_threat"]["advAP"] == "differential/whitebox"
    # the gate on the row's own columns: the source's advAP 0.20 is 0.05 above the row's, 0.05 > 0.04 fails
    # (the minimum of the threats' advAPs, 0.25, would have passed)
    src = {"backend": "source", "threat": "own", "clean": 0.80, "advAP": 0.20}
    for key in ("clean", "advAP"):
        w[f"drop_{key}"] = src[key] - w[key]
    for r in rows:
        r.update({f"drop_{k}": src[k] - r[k] for k in ("clean", "advAP")})
    failures = gate([src, *rows, w], max_drop=0.04)
    assert len(failures) == 1 and "advAP lower by 0.0500" in failures[0] and "differential/whitebox" in failures[0]
    assert gate([src, *rows[:1]], max_drop=0.04) == []  # one threat: its own row


# ---------------------------------------------------------------------------------------------- defect 6


def _graph(node, x_shape, inits=(), opset=13):
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _against_onnxruntime(model, x):
    import onnxruntime as ort

    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        got = OnnxGraph(model)(torch.from_numpy(x))[0].numpy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID", "NOTSET"])
@pytest.mark.parametrize("size", [7, 8])
def test_conv_and_maxpool_auto_pad_against_onnxruntime(auto_pad, size):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, size, size + 3)).astype(np.float32)
    w = onnx.numpy_helper.from_array(rng.standard_normal((4, 3, 4, 3)).astype(np.float32), "w")
    extra = {"pads": [1, 0, 2, 1]} if auto_pad == "NOTSET" else {}
    conv = helper.make_node("Conv", ["x", "w"], ["y"], "conv", auto_pad=auto_pad, strides=[2, 3], **extra)
    _against_onnxruntime(_graph(conv, x.shape, [w]), x)
    pool = helper.make_node("MaxPool", ["x"], ["y"], "pool", auto_pad=auto_pad, kernel_shape=[3, 2], strides=[2, 2],
                            **({"pads": [1, 0, 1, 1]} if auto_pad == "NOTSET" else {}))
    _against_onnxruntime(_graph(pool, x.shape), x)


def test_clip_without_bounds_is_the_identity_and_one_bound_clips():
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 4)).astype(np.float32) * 5
    _against_onnxruntime(_graph(helper.make_node("Clip", ["x"], ["y"], "clip"), x.shape), x)
    hi = onnx.numpy_helper.from_array(np.array(1.5, np.float32), "hi")
    _against_onnxruntime(_graph(helper.make_node("Clip", ["x", "", "hi"], ["y"], "clip"), x.shape, [hi]), x)
    old = _graph(helper.make_node("Clip", ["x"], ["y"], "clip", min=-0.5), x.shape, opset=6)  # bounds as attributes
    _against_onnxruntime(old, x)


@pytest.mark.parametrize("mode", ["linear", "cubic"])
def test_resize_modes_other_than_nearest_are_refused(mode):
    x = np.random.default_rng(2).standard_normal((1, 2, 4, 4)).astype(np.float32)
    scales = onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], "up", mode=mode)
    with pytest.raises(GraphError, match=f"node up \\(Resize\\): attribute mode='{mode}' is not interpreted"):
        OnnxGraph(_graph(node, x.shape, [scales]))
    # nearest, as the exports hold it, against ONNX Runtime
    for ctm, nm in (("asymmetric", "floor"), ("half_pixel", "round_prefer_floor"), ("align_corners", "ceil")):
        node = helper.make_node("Resize", ["x", "", "scales"], ["y"], "up", mode="nearest",
                                coordinate_transformation_mode=ctm, nearest_mode=nm)
        _against_onnxruntime(_graph(node, x.shape, [scales]), x)
    anti = helper.make_node("Resize", ["x", "", "scales"], ["y"], "up", mode="nearest", antialias=1)
    with pytest.raises(GraphError, match="antialias"):
        OnnxGraph(_graph(anti, x.shape, [scales], opset=18))


# ---------------------------------------------------------------------------------------------- defect 8


def _scaled_stride32(src, dst, factor=0.7):
    """A copy of the fp32 export (and its sidecar) whose stride-32 prediction conv weights are scaled by `factor`
    after export: another function, whose AP50 on the small test images (no large objects) does not move."""
    import shutil

    m = onnx.load(str(src))
    hit = 0
    for init in m.graph.initializer:
        if init.name.startswith(("model.branch32.pred.", "branch32.pred.")) and init.name.endswith("weight"):
            init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * np.float32(factor),
                                                       init.name))
            hit += 1
    assert hit == 1
    onnx.save(m, str(dst))
    shutil.copy(str(src) + ".json", str(dst) + ".json")


def test_the_gate_fails_a_file_that_computes_another_function(overfit, exported, tmp_path):
    from fa_deploy.bench_cli import main as bench_main

    broken = tmp_path / "last.fp32.onnx"
    _scaled_stride32(exported["fp32"], broken)
    common = ["--weights", str(overfit), "--test-split", "shapes:train", "--max-images", "2", "--steps", "1",
              "--threat", "transfer", "--max-drop", "1", "--max-deploy-misses", "1", "--quiet"]
    r = CliRunner().invoke(bench_main, [*common, "--backend", str(broken), "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 1, r.output
    out = json.loads((tmp_path / "b.json").read_text())
    row = out["rows"][1]
    # the independent reference: ONNX Runtime's outputs of the two files on the same images
    import onnxruntime as ort

    x, _ = checkpoint_images(overfit, 2, "shapes:train")
    ref, got = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
                for p in (exported["fp32"], broken))
    rel = np.abs(got - ref).mean() / np.abs(ref).mean()
    name = next(iter(row["drift_outputs"]))
    assert row["drift_outputs"][name]["clean"] == pytest.approx(rel, rel=1e-3)
    assert rel > 10 * 1e-4  # beyond the fp32 default, by far
    failures = out["gate"]["failures"]
    assert any(f"output {name} drifts" in f and "clean" in f and "fp32" in f for f in failures), failures
    assert "FAIL" in r.output and "--max-drift" in r.output
    # the file as exported passes; a --max-drift above the drift lets the broken one pass too
    r = CliRunner().invoke(bench_main, [*common, "--backend", str(exported["fp32"])])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(bench_main, [*common, "--backend", str(broken), "--max-drift", str(2 * rel)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(bench_main, [*common, "--backend", str(broken), "--max-drift", "-1"])
    assert r.exit_code == 2 and "--max-drift -1" in r.output


# ---------------------------------------------------------------------------------------------- defect 2


def test_tog_mislabel_on_faster_rcnn_follows_each_detection(frcnn_export):
    """Faster R-CNN's slots are its proposals, re-ranked for every input: the clean slot indices name other boxes
    after one step, and past an image's own proposal count, nothing (the reported IndexError at batch 1)."""
    from torchvision.ops import box_iou

    from fa_deploy.bench_cli import main as bench_main
    from fa_train.adversarial.attack_objectives import TogMislabel

    w, _ = frcnn_export
    r = CliRunner().invoke(bench_main, ["--weights", str(w), "--attack", "tog-mislabel", "--batch-size", "1",
                                        "--tog-score", "0.05", "--max-images", "4", "--workers", "0", "--quiet"])
    assert r.exit_code == 0, r.output
    model, _ = load_model(str(w))
    model.eval()
    x = _eight(w, "shapes:test")[:4]
    obj = TogMislabel(score_thres=0.05)
    ctx = obj.prepare(model, x, None)
    assert sum(len(c["slots"]) for c in ctx) > 0
    g = torch.Generator().manual_seed(7)
    moved = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * 0.03).clamp(0, 1)  # a random start
    slots = model.output_slots(moved)
    ious, beyond = [], 0
    for i, c in enumerate(ctx):  # the clean indices at the moved input name other boxes, or none at all
        inside = c["slots"] < int(slots["valid"][i].sum())
        beyond += int((~inside).sum())
        if inside.any():
            ious.append(box_iou(c["box"][inside].float(), slots["boxes"][i][c["slots"][inside]].detach().float())
                        .diagonal())
    assert beyond > 0 or float(torch.cat(ious).median()) < 0.9
    # the objective at the moved input: each image's value is that image's alone (mixed batch: images with and
    # without detections, different proposal counts), it is finite, and it has a gradient where there are slots
    xx = moved.clone().requires_grad_(True)
    batched = obj(model, xx, ctx)
    batched.sum().backward()
    for i in range(len(x)):
        alone = obj(model, moved[i:i + 1], ctx[i:i + 1])
        assert float(alone[0].detach()) == pytest.approx(float(batched[i].detach()), rel=1e-4, abs=1e-6)
        if len(ctx[i]["slots"]):
            assert float(xx.grad[i].abs().sum()) > 0
    assert torch.isfinite(batched).all()


# ---------------------------------------------------------------------------------------------- defect 7


def test_twins_are_verified_on_more_and_on_perturbed_images_and_the_disagreement_is_reported(overfit, exported):
    from fa_deploy.robustness.threats import load_twins

    x = _eight(overfit, "shapes:test")[:4]
    lines = []
    (twin,) = load_twins([str(exported["int8"])], ["last.int8.onnx"], x, "cpu", log=lines.append, eps=0.03)
    rep = twin.verification["model"]
    assert rep["inputs"]["images"] == [8, 3, 64, 64]  # the 4 images and the same with noise
    # the perturbed half, checked on its own: the twin is the file on noisy images too
    noisy = (x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.03).clamp(0, 1)
    assert verify_twin(twin.graphs["model"], str(exported["int8"]), noisy.numpy())["passed"]
    flips = [a["flip_fraction"] for a in rep["activations"].values()]
    assert 0 < max(flips) <= TOLERANCES["int8"]["max_flip_fraction"]
    (line,) = lines
    assert "8 images" not in line and "4 images and the same with uniform noise at eps 0.03" in line
    assert f"at most {max(flips):.2%}" in line and f"mean {np.mean(flips):.3%}" in line


def test_drift_defaults_per_precision_and_detector():
    from fa_deploy.robustness.harness import gate

    def rows(prec, drift):
        return [{"backend": "source", "threat": "own", "clean": 0.5},
                {"backend": f"m.{prec}", "threat": "transfer", "precision": prec, "drop_clean": 0.0,
                 "drift_outputs": {"detections": {"clean": drift, "adv": drift / 2}}}]

    for prec, ok, bad in (("fp32", 5e-5, 2e-4), ("fp16", 5e-4, 2e-3), ("int8", 0.05, 0.2)):
        assert gate(rows(prec, ok), 1.0, drift_gate=True, model="yolov3") == []
        (f,) = gate(rows(prec, bad), 1.0, drift_gate=True, model="yolov3")
        assert f"m.{prec}: output detections drifts" in f and "clean images" in f
        assert gate(rows(prec, bad), 1.0, max_drift=1.0, drift_gate=True, model="yolov3") == []
        assert gate(rows(prec, bad), 1.0) == []  # the drift gate is fa-bench's; others call gate() as before
    # Faster R-CNN's ranked detection list: fp32 gated, fp16 / int8 only with --max-drift
    assert len(gate(rows("fp32", 2e-4), 1.0, drift_gate=True, model="fasterrcnn_resnet50_fpn")) == 1
    assert gate(rows("int8", 0.9), 1.0, drift_gate=True, model="fasterrcnn_resnet50_fpn") == []
    assert len(gate(rows("int8", 0.9), 1.0, max_drift=0.4, drift_gate=True, model="fasterrcnn_resnet50_fpn")) == 2
