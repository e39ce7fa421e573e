"""torchvision's one-stage detectors (RetinaNet, FCOS) behind the Detector contract, against torchvision's own
models: module tree and weights, losses of its training forward, detections of its eval forward; per-image
independence of the attacks; fa-train (standard, fa), fa-bench --attack suite and fa-export on tiny variants."""
import json

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner

from conftest import built_once, make_targets
from fa_train.adversarial import attacks as A
from fa_train.adversarial.attack_objectives import ClassWise
from fa_train.adversarial.suite import ATTACKS, AttackSettings, attack_plan
from fa_train.models import create_model

NAMES = ("retinanet_resnet50_fpn", "fcos_resnet50_fpn")
TINY = dict(backbone="resnet18", fpn_channels=32, min_size=64, max_size=64)
EPS = 0.03


def tiny(name, **kw):
    torch.manual_seed(0)
    return create_model(name, 4, **{**tiny_arch(name), **kw})


def tiny_arch(name):
    # FCOS's head is GroupNorm(32): 64 FPN channels keep two values per group on P7's 1 x 1 map at 64 px
    return dict(TINY, fpn_channels=64) if name.startswith("fcos") else TINY


def _images(n, dtype=torch.float32, size=64):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(n, 3, size, size, generator=g, dtype=dtype)
    x[0, :, :8, :8] = 0.0
    return x


def _scored(model):
    """Class biases spread out so that an untrained model has detections above torchvision's thresholds."""
    with torch.no_grad():
        b = model.detector.head.classification_head.cls_logits.bias
        b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(5)) * 2)
    return model


@pytest.mark.parametrize("name", NAMES)
def test_wrapper_keeps_torchvisions_modules_and_loads_its_weights(name):
    from torchvision.models import detection

    ours = create_model(name, 7).detector
    ref = getattr(detection, name)(weights=None, weights_backbone=None, num_classes=7)
    # torchvision's builder without pretrained weights uses BatchNorm2d; ours is FrozenBatchNorm2d as with weights
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()  # noqa: E731
                        if not k.endswith("num_batches_tracked")}
    assert shapes(ours) == shapes(ref)
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in ref.named_modules()]
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")})


@pytest.mark.parametrize("name", NAMES)
def test_losses_are_torchvisions_training_forward(name):
    model = tiny(name).double()
    x, t = _images(2, torch.float64), make_targets(2)
    t[1]["ignore"] = torch.tensor([False, True])
    for mode in (True, False):
        model.train(mode)
        losses, mid = model.forward_train(x, t)
        assert model.training == mode and model.detector.training == mode
        assert mid.shape == (2, 512, 2, 2) and model.mid_channels == 512
        was = model.detector.training
        model.detector.train()
        kept = [{"boxes": tt["boxes"][~tt["ignore"]].double(), "labels": tt["labels"][~tt["ignore"]]} for tt in t]
        ref = model.detector(list(x), kept)  # torchvision's own training forward (ignored object left out)
        model.detector.train(was)
        assert set(ref) == set(losses) == set(sum(model.loss_domains.values(), ()))
        for k in ref:
            torch.testing.assert_close(losses[k], ref[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_layer4_tap_matches_a_hook_on_torchvisions_forward(name):
    model = tiny(name).eval()
    x = _images(2)
    seen = []
    h = model.detector.backbone.body.layer4.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        model.detector(list(x))
        feats = model.features(x)
        _, mid = model.forward_train(x, make_targets(2))
    h.remove()
    torch.testing.assert_close(feats, seen[0])
    torch.testing.assert_close(mid, seen[0])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [dict(), dict(min_size=80, max_size=96), dict(min_size=96, max_size=96)])
def test_predictions_equal_torchvisions_eval_output(name, size):
    """Boxes, scores, labels of our export + postprocess against torchvision's eval forward on the same weights,
    with torchvision's resize (64 -> 80 px, padded to 96; 64 -> 96) and a top-k per level that binds (5)."""
    model = _scored(tiny(name, topk_candidates=5, **size)).eval()
    x = _images(3)
    with torch.no_grad():
        ref = model.detector(list(x))
    ours = model.predict(x, with_class_scores=True)
    with torch.no_grad():
        raw = model.export_module()(x)
    assert raw.shape[-1] == 4 + 4
    fresh = _scored(tiny(name, topk_candidates=5, **size)).eval()  # no pass seen: level sizes from the input size
    back = fresh.postprocess([raw.numpy()])
    for o, b, r in zip(ours, back, ref):
        assert len(r["boxes"]) > 0
        torch.testing.assert_close(o["boxes"], r["boxes"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(o["scores"], r["scores"])
        assert torch.equal(o["labels"], r["labels"])
        torch.testing.assert_close(b["boxes"], o["boxes"])
        assert torch.equal(b["labels"], o["labels"])
        assert o["class_scores"].shape == (len(o["labels"]), 4)
        torch.testing.assert_close(o["class_scores"].gather(1, o["labels"][:, None])[:, 0], o["scores"])
    with pytest.raises(ValueError, match="raw output with 7 anchors"):
        fresh.postprocess(torch.zeros(1, 7, 8))


@pytest.mark.parametrize("name", NAMES)
def test_loss_terms_per_image_are_torchvisions_for_one_image(name):
    model = tiny(name).eval().double()
    x, t = _images(3, torch.float64), make_targets(3)
    t[2] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
            "ignore": torch.zeros(0, dtype=torch.bool)}
    per = model.loss_terms_per_image(x, t)
    for i in range(3):
        model.detector.train()
        tv = model.detector(list(x[i:i + 1]), [{"boxes": t[i]["boxes"].double(), "labels": t[i]["labels"]}])
        model.detector.eval()
        for k, v in tv.items():
            torch.testing.assert_close(per[k][i], v, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_object_losses_by_hand(name):
    """Each object's loss is the mean over the anchors torchvision assigns to it (its matcher, read from its loss)
    of the sigmoid focal loss + box loss, written out here with torchvision.ops; ignored objects NaN; the class-wise
    objective averages them per class."""
    from torchvision.ops import sigmoid_focal_loss

    model = tiny(name).eval().double()
    x = _images(1, torch.float64)
    t = [{"boxes": torch.tensor([[4.0, 4, 30, 30], [30, 30, 60, 60], [10, 34, 30, 60]], dtype=torch.float64),
          "labels": torch.tensor([0, 0, 2]), "ignore": torch.tensor([False, False, False])}]
    per = model.object_losses(x, t)[0]
    p = model._pass(x, t)
    matched = model._matches(p)[0]
    d = model.detector
    for j in range(3):
        pos = torch.where(matched == j)[0]
        if not len(pos):
            assert torch.isnan(per[j])
            continue
        cls = p.head["cls_logits"][0, pos]
        target = torch.zeros_like(cls)
        target[:, int(t[0]["labels"][j])] = 1
        loss = sigmoid_focal_loss(cls, target, reduction="none").sum(1)
        gt = t[0]["boxes"][j].expand(len(pos), 4)
        if name.startswith("retinanet"):
            enc = d.head.regression_head.box_coder.encode_single(gt, p.anchors[pos])
            loss = loss + (p.head["bbox_regression"][0, pos] - enc).abs().sum(1)
        else:
            a = p.anchors[pos]
            box = d.head.box_coder.decode(p.head["bbox_regression"][0, pos], a)
            loss = loss + torchvision.ops.generalized_box_iou_loss(box, gt, reduction="none")
            cx, cy = (a[:, 0] + a[:, 2]) / 2, (a[:, 1] + a[:, 3]) / 2
            l, r, top, b = cx - gt[:, 0], gt[:, 2] - cx, cy - gt[:, 1], gt[:, 3] - cy
            ctr = torch.sqrt(torch.minimum(l, r) / torch.maximum(l, r) * torch.minimum(top, b) / torch.maximum(top, b))
            loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(
                p.head["bbox_ctrness"][0, pos, 0], ctr, reduction="none")
        torch.testing.assert_close(per[j], loss.mean(), rtol=1e-9, atol=1e-12)
    assert torch.isfinite(per[[0, 1]]).all() or name.startswith("fcos")
    finite = ~torch.isnan(per)
    assert finite.any()
    t[0]["ignore"] = torch.tensor([False, True, False])
    assert torch.isnan(model.object_losses(x, t)[0][1])
    cw = ClassWise()(model, x, [{**t[0], "ignore": torch.tensor([False, False, False])}])[0]
    c0 = per[[0, 1]][finite[[0, 1]]]
    means = ([c0.mean()] if len(c0) else []) + ([per[2]] if finite[2] else [])
    torch.testing.assert_close(cw, sum(means) / len(means))


@pytest.mark.parametrize("name", NAMES)
def test_tog_logits_stand_for_the_detection_score(name):
    """objectness_logits: the logit of each anchor's best detection score (what torchvision thresholds), so TOG's
    vanishing and fabrication move the scores; output_slots' boxes are the exported boxes."""
    model = _scored(tiny(name)).eval()
    x = _images(2)
    with torch.no_grad():
        (logit, mask), = model.objectness_logits(x).values()
        raw = model.export_module()(x)
        slots = model.output_slots(x)
    assert mask is None
    torch.testing.assert_close(torch.sigmoid(logit), raw[..., 4:].max(-1).values, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(slots["boxes"], raw[..., :4])
    score = torch.sigmoid(slots["obj"]) * torch.sigmoid(slots["cls"]).max(-1).values
    best = raw[..., 4:].max(-1).values
    torch.testing.assert_close(score, best ** 2, rtol=1e-4, atol=1e-6)  # TOG-mislabel's slot score: monotone
    assert slots["fixed"] and slots["valid"].all() and slots["cls_activation"] == "sigmoid"


def _plan(model, names=ATTACKS, iterations=3):
    return attack_plan(model, names, AttackSettings(EPS, (1, 2), iterations, 2, tog_score=0.0))


@pytest.mark.parametrize("name", NAMES)
def test_every_attack_stays_in_the_ball_and_the_unit_box(name):
    model = _scored(tiny(name)).eval()
    x, t = _images(2), make_targets(2)
    for col in _plan(model):
        res = A.run_attack(model, col.objective, col.rule, col.budget, x, t, image_keys=[7, 8])
        adv = res.images
        assert (adv - x).abs().max() <= EPS + 1e-6, col.column
        assert adv.min() >= 0 and adv.max() <= 1, col.column
        assert not torch.equal(adv, x), col.column
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_attack_results_do_not_depend_on_the_batch_size(name):
    """Batch of 3 against one image at a time (float64): same adversarial images for every attack of the suite."""
    model = _scored(tiny(name)).eval().double()
    x, t = _images(3, torch.float64), make_targets(3)
    keys = [11, 12, 13]
    for col in _plan(model, ("pgd", "apgd", "tog-vanishing", "tog-mislabel", "tog-untargeted", "cwa"), iterations=2):
        batch = A.run_attack(model, col.objective, col.rule, col.budget, x, t, image_keys=keys)
        single = [A.run_attack(model, col.objective, col.rule, col.budget, x[i:i + 1], t[i:i + 1],
                               image_keys=keys[i:i + 1]) for i in range(3)]
        torch.testing.assert_close(batch.images, torch.cat([s.images for s in single]), rtol=0, atol=1e-9,
                                   msg=col.column)


# ---------------------------------------------------------------------------------------------- the commands


def train_tiny(folder, name, *extra):
    from fa_train.cli import main

    cfg = folder / f"{name}.yaml"
    fpn = tiny_arch(name)["fpn_channels"]
    cfg.write_text(f"model: {{name: {name}, backbone: resnet18, fpn_channels: {fpn}, min_size: 64, max_size: 64}}\n")
    return CliRunner().invoke(main, ["--config", str(cfg), "--data", "synth:60", "--img-size", "64", "--batch-size",
                                     "2", "--workers", "0", "--max-images", "4", "--max-test-images", "2", "--epochs",
                                     "1", "--eval-every", "0", "--quiet", "--lr", "0.001", "--out",
                                     str(folder / "run"), *extra])


@pytest.fixture(scope="module", params=NAMES)
def trained(request, tmp_path_factory):
    """(name, last.pt) of a tiny one-stage detector after one epoch of fa-train --method standard."""
    from pathlib import Path

    name = request.param

    def build(d):
        r = train_tiny(d, name)
        assert r.exit_code == 0, r.output
        return str(d / "run" / "last.pt")

    return name, Path(built_once(tmp_path_factory, f"{name}-trained", build))


def test_standard_training_writes_a_checkpoint_of_the_model(trained):
    from fa_train.models import load_model

    name, w = trained
    model, ckpt = load_model(str(w))
    assert model.arch_config() == {"name": name, "num_classes": 4, **dict(tiny_arch(name), trainable_layers=3)}
    assert json.loads((w.parent / "eval.json").read_text())["clean"]["AP50"] >= 0


def test_torchvision_options_are_kept_in_the_checkpoint(tmp_path):
    """Options passed on to torchvision's detector (score threshold, NMS, detections per image) are part of the
    model a checkpoint rebuilds: set, saved, loaded, read back from torchvision's own modules; a value no checkpoint
    can store is refused naming the option."""
    from fa_train.checkpoint import save_safetensors
    from fa_train.models import load_model

    cases = {"retinanet_resnet50_fpn": dict(tiny_arch("retinanet"), score_thresh=0.2, nms_thresh=0.3,
                                            detections_per_img=17, topk_candidates=50),
             "fcos_resnet50_fpn": dict(tiny_arch("fcos"), score_thresh=0.2, nms_thresh=0.3, detections_per_img=17,
                                       center_sampling_radius=2.0),
             "fasterrcnn_resnet50_fpn": dict(TINY, box_score_thresh=0.2, box_nms_thresh=0.3,
                                             box_detections_per_img=17, rpn_post_nms_top_n_test=99),
             "ssdlite320_mobilenet_v3_large": dict(size=64, width_mult=0.25, score_thresh=0.2, nms_thresh=0.3,
                                                   detections_per_img=17, topk_candidates=50)}
    reads = {"score_thresh": lambda d: d.score_thresh, "nms_thresh": lambda d: d.nms_thresh,
             "detections_per_img": lambda d: d.detections_per_img, "topk_candidates": lambda d: d.topk_candidates,
             "center_sampling_radius": lambda d: d.center_sampling_radius,
             "box_score_thresh": lambda d: d.roi_heads.score_thresh, "box_nms_thresh": lambda d: d.roi_heads.nms_thresh,
             "box_detections_per_img": lambda d: d.roi_heads.detections_per_img,
             "rpn_post_nms_top_n_test": lambda d: d.rpn._post_nms_top_n["testing"]}
    for name, kw in cases.items():
        path = str(tmp_path / f"{name}.safetensors")
        save_safetensors(create_model(name, 3, **kw), path, ["a", "b", "c"])
        model, _ = load_model(path)
        for k, v in kw.items():
            if k in reads:
                assert reads[k](model.detector) == v, (name, k)
    with pytest.raises(ValueError, match=r"retinanet_resnet50_fpn: model options \['anchor_generator'\]"):
        create_model("retinanet_resnet50_fpn", 3, anchor_generator=object(), **tiny_arch("retinanet"))
    # options never make another model: a checkpoint from before they were stored loads (torchvision's defaults),
    # and a run's own options stand when a checkpoint of other options is loaded into it (--init); a structural
    # setting still refuses
    from fa_train.checkpoint import CheckpointError, load_into

    ssd = create_model("ssdlite320_mobilenet_v3_large", 3, size=64, width_mult=0.25)
    old = {k: v for k, v in ssd.arch_config().items() if k in ssd.structural_arch}
    torch.save({"model": ssd.state_dict(), "arch": old, "class_names": ["a", "b", "c"], "config": {}},
               tmp_path / "old.pt")
    model, _ = load_model(str(tmp_path / "old.pt"))
    assert model.detector.score_thresh == 0.001 and model.detector.detections_per_img == 300
    mine = create_model("ssdlite320_mobilenet_v3_large", 3, size=64, width_mult=0.25, score_thresh=0.4)
    load_into(mine, load_model(str(tmp_path / "ssdlite320_mobilenet_v3_large.safetensors"))[1], "ckpt")  # 0.2
    assert mine.detector.score_thresh == 0.4
    other = create_model("retinanet_resnet50_fpn", 3, **dict(tiny_arch("retinanet"), fpn_channels=64))
    with pytest.raises(CheckpointError, match="fpn_channels: model has 64, checkpoint has 32"):
        load_into(other, load_model(str(tmp_path / "retinanet_resnet50_fpn.safetensors"))[1], "ckpt")


@pytest.mark.parametrize("name", NAMES)
def test_fa_training_aligns_layer4(tmp_path, name):
    r = train_tiny(tmp_path, name, "--method", "fa")
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train/ssfa", "train/kdfa", "train/adv_classification", "train/adv_bbox_regression"} <= set(rec), rec


def test_fa_bench_attack_suite(trained, tmp_path):
    from fa_deploy.cli import main as bench_main

    name, w = trained
    js = tmp_path / "b.json"
    r = CliRunner().invoke(bench_main, ["--weights", str(w), "--max-images", "2", "--batch-size", "2", "--workers",
                                        "0", "--quiet", "--steps", "1", "--apgd-iterations", "2", "--attack", "suite",
                                        "--tog-score", "0.0", "--json", str(js), "--min-clean-ap", "0"])
    assert r.exit_code in (0, 1), r.output  # 1: a gate on an untrained model's AP, not an error
    cols = json.loads(js.read_text())["columns"]
    assert {"clean", "PGD-1", "apgd", "tog-vanishing", "tog-fabrication", "tog-mislabel", "tog-untargeted", "cwa",
            "worst"} <= set(cols), cols


def test_fa_export_onnx_with_parity(trained, tmp_path):
    from fa_deploy.export_cli import export_main
    from fa_deploy.runtime.loading import load_backend
    from fa_train.models import load_model

    name, w = trained
    r = CliRunner().invoke(export_main, [str(w), "--onnx", "fp32", "--onnx", "fp16", "--onnx", "int8",
                                         "--calib-images", "4", "--verify-images", "4", "--out", str(tmp_path),
                                         "--dynamic-batch", "1:2:4"])
    assert r.exit_code == 0, r.output
    for prec in ("fp32", "fp16"):
        side = json.loads((tmp_path / f"last.{prec}.onnx.json").read_text())
        assert side["parity"]["passed"], (prec, side["parity"])
    for prec in ("fp32", "fp16", "int8"):  # TensorRT's ONNX parser takes every file (static check; engines need a GPU)
        compat = json.loads((tmp_path / f"last.{prec}.onnx.json").read_text())["tensorrt_compat"]
        assert compat["ok"], (name, prec, compat["problems"])
    x = np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)
    be = load_backend(str(tmp_path / "last.fp32.onnx"))
    with torch.no_grad():
        ref = load_model(str(w))[0].eval().export_module()(torch.from_numpy(x)).numpy()
    # batch 3 of a file traced at batch 2; fa-export's fp32 tolerance (boxes in pixels)
    np.testing.assert_allclose(be.raw(x)[0], ref, rtol=1e-3, atol=1e-3)


def test_a_checkpoint_of_another_detector_is_refused(trained, tmp_path):
    """Wherever a file of one detector meets another (--init, --teacher, model.weights, Darknet weights, load_into):
    one line naming the file and both detectors, exit 2, never a traceback."""
    from fa_train.checkpoint import CheckpointError, load_checkpoint, load_into
    from fa_train.models.faster_rcnn import WeightsMismatchError

    name, w = trained
    other = "fcos_resnet50_fpn" if name.startswith("retinanet") else "retinanet_resnet50_fpn"
    model = create_model(other, 4, **tiny_arch(other))
    with pytest.raises(CheckpointError, match=f"a {name} checkpoint cannot be loaded into a {other} model"):
        load_into(model, load_checkpoint(str(w)), str(w))
    for flags, says in ((["--init", str(w)], f"a fa-train {name} checkpoint cannot initialise {other}"),
                        (["--method", "kdfa", "--teacher", str(w)], f"--teacher {w}: a {name} checkpoint"),
                        (["--init", str(tmp_path / "x.weights")], "Darknet weights initialise YOLOv3 only")):
        (tmp_path / "x.weights").write_bytes(b"\0" * 64)
        r = train_tiny(tmp_path, other, *flags)
        assert r.exit_code == 2, r.output
        assert says in r.output and "Traceback" not in r.output and "internal error" not in r.output, r.output
    # torchvision weights of another family, a fa-train checkpoint where torchvision's file is expected
    tv = tmp_path / "retina.pth"
    torch.save(create_model("retinanet_resnet50_fpn", 4, **tiny_arch("fcos")).detector.state_dict(), tv)
    with pytest.raises(WeightsMismatchError, match="retina.pth: not a torchvision fcos_resnet50_fpn checkpoint"):
        create_model("fcos_resnet50_fpn", 4, weights=str(tv), **tiny_arch("fcos"))
    with pytest.raises(WeightsMismatchError, match=f"a fa-train checkpoint of {name}, not torchvision's"):
        create_model(name, 4, weights=str(w), **tiny_arch(name))


def test_twin_of_the_exported_file_equals_onnxruntime_and_attacks_through_it(trained, tmp_path):
    """The twin (the ONNX file interpreted in torch) against ONNX Runtime at fp32, fp16 and int8 (int8 layer by
    layer): the file's output, losses through the head maps it reads equal to the source's losses at fp32,
    gradients reaching the input at every precision; fa-bench --threat all over the int8 file."""
    from fa_deploy.cli import main as bench_main
    from fa_deploy.export_cli import export_main
    from fa_deploy.robustness.twin import load_twin
    from fa_deploy.runtime.loading import load_backend
    from fa_train.models import load_model

    name, w = trained
    r = CliRunner().invoke(export_main, [str(w), "--onnx", "fp32", "--onnx", "fp16", "--onnx", "int8",
                                         "--calib-images", "4", "--verify-images", "2", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    model, _ = load_model(str(w))
    model.eval()
    x = torch.from_numpy(np.random.default_rng(1).random((2, 3, 64, 64), dtype=np.float32))
    t = make_targets(2)
    precisions = ("fp32", "fp16", "int8")
    for prec in precisions:
        twin = load_twin(str(tmp_path / f"last.{prec}.onnx"), verify_images=x)
        rep = twin.verification["model"]
        if prec == "int8":  # every quantized activation within a step of ONNX Runtime's, on its own inputs
            assert len(rep["activations"]) > 20
            assert max(a["max_steps"] for a in rep["activations"].values()) <= 1.0 + 1e-3
        elif "layers" in rep:
            # FCOS at 64 px: the GroupNorm over the 2 values of a 1 x 1 level (ill-conditioned) moves its free-running
            # outputs past the gate by the last bits of float sums; every layer on ONNX Runtime's inputs passes
            assert name.startswith("fcos") and rep["layers"]["passed"] and rep["layers"]["checked"] > 50, rep["layers"]
            assert not all(o["passed"] for o in rep["free_running"].values())
            assert all(o["passed"] for o in rep["outputs"].values()) and set(rep["outputs"]) == set(rep["free_running"])
        else:
            raw = load_backend(str(tmp_path / f"last.{prec}.onnx")).raw(x.numpy())[0]
            with torch.no_grad():
                np.testing.assert_allclose(twin.export_module()(x).numpy(), raw, rtol=1e-3, atol=1e-3)
        if prec == "fp32":
            ours, src = twin.loss_terms_per_image(x, t), model.loss_terms_per_image(x, t)
            # FCOS at 64 px: its GroupNorm over 2 values on the 1 x 1 P6 / P7 maps is ill-conditioned, and the file
            # (and so its twin, verified against ONNX Runtime above) evaluates it in ONNX Runtime's order, which
            # moves the loss about 0.2 % from the eager source; RetinaNet has no GroupNorm: the same to 1e-4
            tol = dict(rtol=1e-2, atol=1e-4) if name.startswith("fcos") else dict(rtol=1e-4, atol=1e-5)
            for k in src:
                torch.testing.assert_close(ours[k], src[k], **tol)
            torch.testing.assert_close(twin.features(x), model.features(x), rtol=1e-4, atol=1e-4)
        xg = x.clone().requires_grad_(True)
        sum(twin.loss_terms_per_image(xg, t).values()).sum().backward()
        assert xg.grad is not None and xg.grad.abs().sum() > 0
    js = tmp_path / "b.json"
    attacked = f"last.{precisions[-1]}.onnx"
    r = CliRunner().invoke(bench_main, ["--weights", str(w), "--backend", str(tmp_path / attacked),
                                        "--max-images", "2", "--steps", "1", "--workers", "0", "--json", str(js),
                                        "--quiet", "--max-drop", "1", "--max-deploy-misses", "1", "--min-clean-ap",
                                        "0"])
    assert r.exit_code == 0, r.output
    rows = json.loads(js.read_text())["rows"]
    assert [(row["backend"], row["threat"]) for row in rows] == [("source", "own")] + [
        (attacked, th) for th in ("transfer", "whitebox", "differential", "worst")]


def test_fa_predict_and_sanity(trained, shapes_devkit, tmp_path):
    from conftest import predict_and_sanity

    predict_and_sanity(trained[1], shapes_devkit, tmp_path)


def test_fcos_twin_at_256_px_equals_onnxruntime(tmp_path):
    """FCOS's twin where its smallest FPN level is larger than 1 x 1 (256 px: P7 is 2 x 2): the fp32
    twin verifies against ONNX Runtime, its losses equal the source's (within 2e-3) and gradients reach the input
    (the 64 px variant above is skipped with its measured gap; 128 px, P7 1 x 1, missed the gate too)."""
    from fa_deploy.exporting import onnx_export as ex
    from fa_deploy.robustness.twin import load_twin
    from fa_deploy.runtime.loading import load_backend

    torch.manual_seed(0)
    model = create_model("fcos_resnet50_fpn", 4, backbone="resnet18", fpn_channels=64, min_size=256,
                         max_size=256).eval()
    path = str(tmp_path / "m.fp32.onnx")
    ex.export_fp32(model, path, 256, batch=1)
    ex.write_sidecar(path, {"model": model.arch_config(), "precision": "fp32"})
    x = torch.from_numpy(np.random.default_rng(1).random((2, 3, 256, 256), dtype=np.float32))
    twin = load_twin(path, verify_images=x)
    raw = load_backend(path).raw(x.numpy())[0]
    with torch.no_grad():
        np.testing.assert_allclose(twin.export_module()(x).numpy(), raw, rtol=1e-3, atol=1e-3)
    t = make_targets(2, size=256)
    ours, src = twin.loss_terms_per_image(x, t), model.loss_terms_per_image(x, t)
    for k in src:  # GroupNorm on small maps amplifies the twin's last-bit differences (measured 5.4e-4 relative)
        torch.testing.assert_close(ours[k], src[k], rtol=2e-3, atol=1e-4)
    xg = x.clone().requires_grad_(True)
    sum(twin.loss_terms_per_image(xg, t).values()).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
