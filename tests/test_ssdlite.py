"""torchvision's SSDlite320 MobileNetV3-Large behind the Detector contract, against torchvision's own model: module
tree and weights, losses of its training forward (hard negative mining), detections of its eval forward; the
not-background objectness; per-image independence of the attacks; fa-train (standard, fa), fa-bench --attack suite
and --sanity, fa-predict, fa-export at three precisions, the twin of the exported file on a tiny variant."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import built_once, make_targets
from fa_train.adversarial import attacks as A
from fa_train.adversarial.attack_objectives import ClassWise
from fa_train.adversarial.suite import ATTACKS, AttackSettings, attack_plan
from fa_train.models import create_model

NAME = "ssdlite320_mobilenet_v3_large"
TINY = dict(size=64, width_mult=0.25)
EPS = 0.03


def tiny(**kw):
    torch.manual_seed(0)
    return create_model(NAME, 4, **{**TINY, **kw})


def _images(n, dtype=torch.float32, size=64):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(n, 3, size, size, generator=g, dtype=dtype)
    x[0, :, :8, :8] = 0.0
    return x


def _scored(model):
    """Class biases spread out so that an untrained model has detections above torchvision's thresholds."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for i in range(6):
            b = model.detector.head.classification_head.module_list[i][1].bias
            b.copy_(torch.randn(b.shape, generator=g) * 2)
    return model


def _tv_targets(t):
    """Our targets as torchvision's SSD takes them: ignored objects left out, labels + 1 (0 is its background)."""
    keep = [~tt["ignore"] for tt in t]
    return [{"boxes": tt["boxes"][k].double(), "labels": tt["labels"][k] + 1} for tt, k in zip(t, keep)]


def test_wrapper_keeps_torchvisions_modules_and_loads_its_weights(tmp_path):
    from torchvision.models import detection

    ours = create_model(NAME, 7)
    ref = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=8)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours.detector) == shapes(ref)
    assert [n for n, _ in ours.detector.named_modules()] == [n for n, _ in ref.named_modules()]
    assert ours.arch_config() == {"name": NAME, "num_classes": 7, "size": 320, "width_mult": 1.0,
                                  "trainable_layers": 6, "reduced_tail": True, "score_thresh": 0.001,
                                  "nms_thresh": 0.55, "detections_per_img": 300, "topk_candidates": 300}
    assert ours.mid_channels == 480 and ours.detector.transform.fixed_size == (320, 320)
    # torchvision's file of this detector, another class count: everything but the class predictors loaded
    path = tmp_path / "ssd.pth"
    torch.save(ref.state_dict(), path)
    other = create_model(NAME, 3, weights=str(path))
    for k, v in other.detector.state_dict().items():
        if not k.startswith(other.class_predictor_prefixes()):
            assert torch.equal(v, ref.state_dict()[k]), k
    assert other.detector.head.classification_head.module_list[0][1].out_channels == 6 * 4
    # an ImageNet MobileNetV3-Large (full tail) as backbone weights: loaded into the body the SSD extractor uses
    from torchvision.models import mobilenet_v3_large

    torch.manual_seed(1)
    mn = mobilenet_v3_large(weights=None)
    torch.save(mn.state_dict(), tmp_path / "mn.pth")
    with_bb = create_model(NAME, 3, weights_backbone=str(tmp_path / "mn.pth"))
    assert with_bb.arch_config()["reduced_tail"] is False and with_bb.mid_channels == 960
    torch.testing.assert_close(with_bb.detector.backbone.features[1][-1][0].weight, mn.features[-1][0].weight)
    torch.testing.assert_close(with_bb.detector.backbone.features[0][0][0].weight, mn.features[0][0].weight)
    from fa_train.models.faster_rcnn import WeightsMismatchError

    with pytest.raises(WeightsMismatchError, match="mn.pth: not a torchvision mobilenet_v3_large state dict"):
        create_model(NAME, 3, weights_backbone=str(tmp_path / "mn.pth"), reduced_tail=True)


def test_losses_are_torchvisions_training_forward():
    model = tiny().double()
    x, t = _images(2, torch.float64), make_targets(2)
    t[1]["ignore"] = torch.tensor([False, True])
    model.eval()  # BatchNorm on running statistics in both passes (torchvision's forward in train mode otherwise)
    losses, mid = model.forward_train(x, t)
    assert mid.shape == (2, model.mid_channels, 2, 2) and model.mid_channels == 144
    was = model.detector.training
    model.detector.train()
    for m in model.detector.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    ref = model.detector(list(x), _tv_targets(t))  # torchvision's own training forward (ignored object left out)
    model.detector.train(was)
    assert set(ref) == set(losses) == set(sum(model.loss_domains.values(), ()))
    for k in ref:
        torch.testing.assert_close(losses[k], ref[k], rtol=1e-10, atol=1e-12)
    model.train()
    losses, _ = model.forward_train(x, t)
    assert model.training and all(v.requires_grad for v in losses.values())


def test_mid_layer_tap_matches_a_hook_on_torchvisions_forward():
    """The alignment layer: the end of the MobileNetV3 body (the extractor's second output), in torchvision's own
    eval forward."""
    model = tiny().eval()
    x = _images(2)
    seen = []
    h = model.detector.backbone.features[1].register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        model.detector(list(x))
        feats = model.features(x)
        _, mid = model.forward_train(x, make_targets(2))
    h.remove()
    assert seen[0].shape[1] == model.mid_channels and model.mid_stride == 64 // seen[0].shape[-1]
    torch.testing.assert_close(feats, seen[0])
    torch.testing.assert_close(mid, seen[0])


@pytest.mark.parametrize("size,img", [(64, 64), (96, 64), (64, 80)])
def test_predictions_equal_torchvisions_eval_output(size, img):
    """Boxes, scores, labels of our export + postprocess against torchvision's eval forward on the same weights,
    with its fixed-size resize (64 -> 96, 80 -> 64) and a per-class top-k that binds (5)."""
    model = _scored(tiny(topk_candidates=5, size=size)).eval()
    x = _images(3, size=img)
    with torch.no_grad():
        ref = model.detector(list(x))
    ours = model.predict(x, with_class_scores=True)
    with torch.no_grad():
        raw = model.export_module()(x)
    assert raw.shape[-1] == 4 + 4
    back = _scored(tiny(topk_candidates=5, size=size)).eval().postprocess([raw.numpy()])
    for o, b, r in zip(ours, back, ref):
        assert len(r["boxes"]) > 5
        torch.testing.assert_close(o["boxes"], r["boxes"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(o["scores"], r["scores"])
        assert torch.equal(o["labels"] + 1, r["labels"])
        torch.testing.assert_close(b["boxes"], o["boxes"])
        assert torch.equal(b["labels"], o["labels"])
        assert o["class_scores"].shape == (len(o["labels"]), 4)
        torch.testing.assert_close(o["class_scores"].gather(1, o["labels"][:, None])[:, 0], o["scores"])
    with pytest.raises(ValueError, match="expected \\[N, anchors, 8\\]"):
        model.postprocess(torch.zeros(1, 7, 9))


def test_loss_terms_per_image_are_torchvisions_for_one_image():
    """Each image's terms as torchvision computes them for that image alone (its own foreground count), not the
    batch's normaliser: a batch of 3 against 3 forwards of one, an image without objects included."""
    model = tiny().eval().double()
    x, t = _images(3, torch.float64), make_targets(3)
    t[2] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
            "ignore": torch.zeros(0, dtype=torch.bool)}
    per = model.loss_terms_per_image(x, t)
    batch, _ = model.forward_train(x, t)
    for i in range(3):
        model.detector.train()
        for m in model.detector.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        tv = model.detector(list(x[i:i + 1]), _tv_targets(t[i:i + 1]))
        model.detector.eval()
        for k, v in tv.items():
            torch.testing.assert_close(per[k][i], v, rtol=1e-9, atol=1e-12)
    assert per["classification"][2] == 0 and per["bbox_regression"][2] == 0
    # the batch's loss divides by the batch's foreground count: not the mean of the per-image terms
    assert not torch.allclose(batch["classification"], per["classification"].mean())


def test_object_losses_by_hand():
    """Each object's loss is the mean over the default boxes torchvision's SSDMatcher assigns to it of softmax
    cross-entropy (label + 1) + Smooth-L1 of the box encoding, written out here with torch.nn.functional;
    ignored objects NaN; the class-wise objective averages them per class."""
    import torchvision
    from torch.nn import functional as F

    model = tiny().eval().double()
    x = _images(1, torch.float64)
    t = [{"boxes": torch.tensor([[4.0, 4, 30, 30], [30, 30, 60, 60], [10, 34, 30, 60]], dtype=torch.float64),
          "labels": torch.tensor([0, 0, 2]), "ignore": torch.tensor([False, False, False])}]
    per = model.object_losses(x, t)[0]
    p = model._pass(x, t)
    iou = torchvision.ops.box_iou(t[0]["boxes"], p.anchors)
    matched = torch.where(iou.max(0).values >= 0.5, iou.argmax(0), -1)
    matched[iou.argmax(1)] = torch.arange(3)  # SSD: each object's best default box is its own
    coder = torchvision.models.detection._utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
    for j in range(3):
        pos = torch.where(matched == j)[0]
        assert len(pos)
        cls = p.head["cls_logits"][0, pos]
        loss = F.cross_entropy(cls, torch.full((len(pos),), int(t[0]["labels"][j]) + 1), reduction="none")
        enc = coder.encode_single(t[0]["boxes"][j].expand(len(pos), 4), p.anchors[pos])
        loss = loss + F.smooth_l1_loss(p.head["bbox_regression"][0, pos], enc, reduction="none").sum(1)
        torch.testing.assert_close(per[j], loss.mean(), rtol=1e-9, atol=1e-12)
    t[0]["ignore"] = torch.tensor([False, True, False])
    assert torch.isnan(model.object_losses(x, t)[0][1])
    cw = ClassWise()(model, x, [{**t[0], "ignore": torch.tensor([False, False, False])}])[0]
    torch.testing.assert_close(cw, (per[[0, 1]].mean() + per[2]) / 2)


def test_tog_logits_stand_for_not_background():
    """objectness_logits: the logit of "not background", sigmoid = 1 - softmax background = the sum of the class
    probabilities the export gives; output_slots: sigmoid(obj) x softmax(cls) = torchvision's class probability
    (TOG-mislabel's slot score = the detection score); boxes are the exported boxes."""
    model = _scored(tiny()).eval()
    x = _images(2)
    with torch.no_grad():
        (logit, mask), = model.objectness_logits(x).values()
        raw = model.export_module()(x)
        slots = model.output_slots(x)
        head = model._pass(x).head["cls_logits"]
    assert mask is None
    bg = torch.softmax(head.double(), -1)[..., 0]
    torch.testing.assert_close(torch.sigmoid(logit.double()), 1 - bg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.sigmoid(logit), raw[..., 4:].sum(-1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(slots["boxes"], raw[..., :4])
    assert slots["cls_activation"] == "softmax" and slots["cls"].shape == raw[..., 4:].shape
    prob = torch.sigmoid(slots["obj"])[..., None] * torch.softmax(slots["cls"], -1)
    torch.testing.assert_close(prob, raw[..., 4:], rtol=1e-4, atol=1e-6)
    assert slots["fixed"] and slots["valid"].all()


def _plan(model, names=ATTACKS, iterations=3):
    return attack_plan(model, names, AttackSettings(EPS, (1, 2), iterations, 2, tog_score=0.0))


def test_every_attack_stays_in_the_ball_and_the_unit_box():
    model = _scored(tiny()).eval()
    x, t = _images(2), make_targets(2)
    for col in _plan(model, iterations=2):
        res = A.run_attack(model, col.objective, col.rule, col.budget, x, t, image_keys=[7, 8])
        adv = res.images
        assert (adv - x).abs().max() <= EPS + 1e-6, col.column
        assert adv.min() >= 0 and adv.max() <= 1, col.column
        assert not torch.equal(adv, x), col.column
    assert all(p.grad is None for p in model.parameters())


def test_attack_results_do_not_depend_on_the_batch_size():
    """Batch of 2 against one image at a time (float64): same adversarial images for the suite's attacks (PGD-1,
    APGD, TOG vanishing and mislabel, CWA; float64 depthwise convolutions are slow on a CPU, so two images and the
    attacks whose objectives differ: TOG-untargeted is the detection loss PGD runs, on other targets)."""
    model = _scored(tiny()).eval().double()
    x, t = _images(2, torch.float64), make_targets(2)
    keys = [11, 12]
    plan = attack_plan(model, ("pgd", "apgd", "tog-vanishing", "tog-mislabel", "cwa"),
                       AttackSettings(EPS, (1,), 2, 2, tog_score=0.0))
    for col in plan:
        batch = A.run_attack(model, col.objective, col.rule, col.budget, x, t, image_keys=keys)
        single = [A.run_attack(model, col.objective, col.rule, col.budget, x[i:i + 1], t[i:i + 1],
                               image_keys=keys[i:i + 1]) for i in range(2)]
        torch.testing.assert_close(batch.images, torch.cat([s.images for s in single]), rtol=0, atol=1e-9,
                                   msg=col.column)


# ---------------------------------------------------------------------------------------------- the commands


def train_tiny(folder, *extra, name=NAME, arch="size: 64, width_mult: 0.25"):
    from fa_train.cli import main

    cfg = folder / "ssd.yaml"
    cfg.write_text(f"model: {{name: {name}, {arch}}}\n")
    return CliRunner().invoke(main, ["--config", str(cfg), "--data", "synth:60", "--img-size", "64", "--batch-size",
                                     "2", "--workers", "0", "--max-images", "4", "--max-test-images", "2", "--epochs",
                                     "1", "--eval-every", "0", "--quiet", "--lr", "0.001", "--out",
                                     str(folder / "run"), *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """last.pt of the tiny SSDlite after one epoch of fa-train --method standard."""
    from pathlib import Path

    def build(d):
        r = train_tiny(d)
        assert r.exit_code == 0, r.output
        return str(d / "run" / "last.pt")

    return Path(built_once(tmp_path_factory, "ssdlite-trained", build))


def test_standard_training_writes_a_checkpoint_of_the_model(trained):
    from fa_train.models import load_model

    model, ckpt = load_model(str(trained))
    assert model.arch_config() == {"name": NAME, "num_classes": 4, "size": 64, "width_mult": 0.25,
                                   "trainable_layers": 6, "reduced_tail": True, "score_thresh": 0.001,
                                  "nms_thresh": 0.55, "detections_per_img": 300, "topk_candidates": 300}
    assert json.loads((trained.parent / "eval.json").read_text())["clean"]["AP50"] >= 0


def test_fa_training_aligns_the_mobilenet_body(tmp_path):
    r = train_tiny(tmp_path, "--method", "fa")
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train/ssfa", "train/kdfa", "train/adv_classification", "train/adv_bbox_regression"} <= set(rec), rec


def test_fa_bench_attack_suite(trained, tmp_path):
    from fa_deploy.cli import main as bench_main

    js = tmp_path / "b.json"
    r = CliRunner().invoke(bench_main, ["--weights", str(trained), "--max-images", "2", "--batch-size", "2",
                                        "--workers", "0", "--quiet", "--steps", "1", "--apgd-iterations", "2",
                                        "--attack", "suite", "--tog-score", "0.0", "--json", str(js),
                                        "--min-clean-ap", "0"])
    assert r.exit_code in (0, 1), r.output  # 1: a gate on an untrained model's AP, not an error
    cols = json.loads(js.read_text())["columns"]
    assert {"clean", "PGD-1", "apgd", "tog-vanishing", "tog-fabrication", "tog-mislabel", "tog-untargeted", "cwa",
            "worst"} <= set(cols), cols


def test_fa_export_onnx_with_parity(trained, tmp_path):
    from fa_deploy.export_cli import export_main
    from fa_deploy.runtime.loading import load_backend
    from fa_train.models import load_model

    r = CliRunner().invoke(export_main, [str(trained), "--onnx", "fp32", "--onnx", "fp16", "--onnx", "int8",
                                         "--calib-images", "4", "--verify-images", "4", "--out", str(tmp_path),
                                         "--dynamic-batch", "1:2:4"])
    assert r.exit_code == 0, r.output
    for prec in ("fp32", "fp16"):
        side = json.loads((tmp_path / f"last.{prec}.onnx.json").read_text())
        assert side["parity"]["passed"], (prec, side["parity"])
    assert "parity" in json.loads((tmp_path / "last.int8.onnx.json").read_text())  # reported, as for the others
    for prec in ("fp32", "fp16", "int8"):  # TensorRT's parser takes every file (HardSwish, HardSigmoid, Softmax)
        compat = json.loads((tmp_path / f"last.{prec}.onnx.json").read_text())["tensorrt_compat"]
        assert compat["ok"], (prec, compat["problems"])
    x = np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)
    be = load_backend(str(tmp_path / "last.fp32.onnx"))
    with torch.no_grad():
        ref = load_model(str(trained))[0].eval().export_module()(torch.from_numpy(x)).numpy()
    # batch 3 of a file traced at batch 2; fa-export's fp32 tolerance (boxes in pixels)
    np.testing.assert_allclose(be.raw(x)[0], ref, rtol=1e-3, atol=1e-3)


def test_a_checkpoint_of_another_detector_is_refused(trained, tmp_path):
    """Wherever a file of SSDlite meets another detector (and the reverse): one line naming the file and both
    detectors, exit 2, never a traceback."""
    from fa_train.checkpoint import CheckpointError, load_checkpoint, load_into
    from fa_train.models.faster_rcnn import WeightsMismatchError

    other = "retinanet_resnet50_fpn"
    model = create_model(other, 4, backbone="resnet18", fpn_channels=32, min_size=64, max_size=64)
    with pytest.raises(CheckpointError, match=f"a {NAME} checkpoint cannot be loaded into a {other} model"):
        load_into(model, load_checkpoint(str(trained)), str(trained))
    for flags, says in ((["--init", str(trained)], f"a fa-train {NAME} checkpoint cannot initialise {other}"),
                        (["--method", "kdfa", "--teacher", str(trained)], f"--teacher {trained}: a {NAME} checkpoint")):
        r = train_tiny(tmp_path, *flags, name=other,
                       arch="backbone: resnet18, fpn_channels: 32, min_size: 64, max_size: 64")
        assert r.exit_code == 2, r.output
        assert says in r.output and "Traceback" not in r.output and "internal error" not in r.output, r.output
    # a RetinaNet checkpoint given to SSDlite (--init), torchvision RetinaNet weights as SSDlite's model.weights
    retina = tmp_path / "retina.pth"
    torch.save(model.detector.state_dict(), retina)
    with pytest.raises(WeightsMismatchError, match=f"retina.pth: not a torchvision {NAME} checkpoint"):
        create_model(NAME, 4, weights=str(retina), **TINY)
    with pytest.raises(WeightsMismatchError, match=f"a fa-train checkpoint of {NAME}, not torchvision's"):
        create_model(NAME, 4, weights=str(trained), **TINY)
    r = train_tiny(tmp_path, "--init", str(retina))
    assert r.exit_code == 2 and "retina.pth" in r.output and "Traceback" not in r.output, r.output


def test_twin_of_the_exported_file_equals_onnxruntime_and_attacks_through_it(trained, tmp_path):
    """The twin (the ONNX file interpreted in torch, MobileNetV3's HardSwish / HardSigmoid / GlobalAveragePool and
    SSD's Softmax included) against ONNX Runtime: the file's output, losses through the head maps it reads equal
    to the source's losses at fp32, the int8 twin layer by layer, gradients reaching the input at every precision;
    fa-bench --threat all over the int8 file."""
    from fa_deploy.cli import main as bench_main
    from fa_deploy.export_cli import export_main
    from fa_deploy.robustness.twin import load_twin
    from fa_deploy.runtime.loading import load_backend
    from fa_train.models import load_model

    r = CliRunner().invoke(export_main, [str(trained), "--onnx", "fp32", "--onnx", "fp16", "--onnx", "int8",
                                         "--calib-images", "4", "--verify-images", "2", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    model, _ = load_model(str(trained))
    model.eval()
    x = torch.from_numpy(np.random.default_rng(1).random((2, 3, 64, 64), dtype=np.float32))
    t = make_targets(2)
    for prec in ("fp32", "fp16", "int8"):
        twin = load_twin(str(tmp_path / f"last.{prec}.onnx"), verify_images=x)
        if prec == "int8":  # every quantized activation within a step of ONNX Runtime's, on its own inputs
            acts = twin.verification["model"]["activations"]
            assert len(acts) > 20 and max(a["max_steps"] for a in acts.values()) <= 1.0 + 1e-3
        else:
            raw = load_backend(str(tmp_path / f"last.{prec}.onnx")).raw(x.numpy())[0]
            with torch.no_grad():
                np.testing.assert_allclose(twin.export_module()(x).numpy(), raw, rtol=1e-3, atol=1e-3)
        if prec == "fp32":
            ours, src = twin.loss_terms_per_image(x, t), model.loss_terms_per_image(x, t)
            for k in src:
                torch.testing.assert_close(ours[k], src[k], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(twin.features(x), model.features(x), rtol=1e-4, atol=1e-4)
        xg = x.clone().requires_grad_(True)
        sum(twin.loss_terms_per_image(xg, t).values()).sum().backward()
        assert xg.grad is not None and xg.grad.abs().sum() > 0
    js = tmp_path / "b.json"
    r = CliRunner().invoke(bench_main, ["--weights", str(trained), "--backend", str(tmp_path / "last.int8.onnx"),
                                        "--max-images", "2", "--steps", "1", "--workers", "0", "--json", str(js),
                                        "--quiet", "--max-drop", "1", "--max-deploy-misses", "1", "--min-clean-ap",
                                        "0"])
    assert r.exit_code == 0, r.output
    rows = json.loads(js.read_text())["rows"]
    assert [(row["backend"], row["threat"]) for row in rows] == [("source", "own")] + [
        ("last.int8.onnx", th) for th in ("transfer", "whitebox", "differential", "worst")]


def test_fa_predict_and_sanity(trained, shapes_devkit, tmp_path):
    from conftest import predict_and_sanity

    predict_and_sanity(trained, shapes_devkit, tmp_path)


def test_interpreter_mobilenet_ops_equal_onnxruntime(tmp_path):
    """HardSwish, HardSigmoid (ONNX's default alpha 0.2 and torch's 1/6), GlobalAveragePool and Softmax (last and
    middle axis) interpreted as ONNX Runtime computes them, gradients through them as torch's own ops; a Softmax of
    an opset before 13 (another definition) refused."""
    import onnx
    from onnx import TensorProto, helper

    from fa_deploy.robustness.interpreter import GraphError, OnnxGraph

    def graph(opset):
        nodes = [helper.make_node("HardSwish", ["x"], ["hs"]),
                 helper.make_node("HardSigmoid", ["x"], ["hg"]),
                 helper.make_node("HardSigmoid", ["x"], ["hg6"], alpha=1.0 / 6, beta=0.5),
                 helper.make_node("GlobalAveragePool", ["x"], ["gap"]),
                 helper.make_node("Softmax", ["x"], ["sm"]),
                 helper.make_node("Softmax", ["x"], ["sm1"], axis=1)]
        outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("hs", "hg", "hg6", "gap", "sm",
                                                                                     "sm1")]
        g = helper.make_graph(nodes, "ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5, 4])],
                              outs)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        path = str(tmp_path / f"ops{opset}.onnx")
        onnx.save(m, path)
        return path

    import onnxruntime as ort

    path = graph(17)
    x = (np.random.default_rng(0).standard_normal((2, 3, 5, 4)) * 4).astype(np.float32)
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    ours = OnnxGraph(path)(torch.from_numpy(x))
    for r, o in zip(ref, ours):
        np.testing.assert_allclose(o.numpy(), r, rtol=1e-6, atol=1e-6)
    xt = torch.from_numpy(x).double()  # float64 gradient of the interpreted ops against torch's own
    g = OnnxGraph(path).double()
    from torch.nn import functional as F

    twin = torch.autograd.functional.jacobian(lambda v: g(v)[0], xt[:1, :1, :2, :2])
    own = torch.autograd.functional.jacobian(F.hardswish, xt[:1, :1, :2, :2])
    torch.testing.assert_close(twin, own)
    with pytest.raises(GraphError, match=r"opset 11: \['Softmax'\]"):
        OnnxGraph(graph(11))
