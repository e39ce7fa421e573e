"""Ultralytics YOLOv8 / YOLO11 behind the Detector contract (issue 25): our detections against Ultralytics' own
`predict`, our loss against its loss, per-image losses batch-independent, fa-train (standard and fa), fa-bench's
suite and fa-export's ONNX parity on a yolov8n at 64 px, and the refusal of an untrusted pickle with its safe route.
The whole file skips where the optional extra is not installed."""
import copy
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

os.environ.setdefault("YOLO_OFFLINE", "1")  # never an online check from the tests
os.environ.setdefault("YOLO_VERBOSE", "False")
from fa_train.models import ultralytics_yolo as U  # noqa: E402

if not U.available():  # through the project's import, which puts back what Ultralytics patches in other libraries
    pytest.skip("the optional extra is not installed: pip install -e '.[ultralytics]'", allow_module_level=True)

from conftest import built_once, make_targets  # noqa: E402
from fa_train.models import create_model  # noqa: E402
from fa_train.models.ultralytics_yolo import UltralyticsError, convert_checkpoint  # noqa: E402


def test_importing_ultralytics_leaves_the_other_libraries_alone(tmp_path):
    """Ultralytics replaces PIL.Image.open on import (an unreadable image then makes it try to install a HEIF
    plugin, and our 'corrupt image' error became an internal error), torch.save and cv2's image I/O: after the
    project's import they are the libraries' own, and a corrupt image is still named."""
    import subprocess
    import sys

    code = ("import PIL.Image, torch, cv2; before = (PIL.Image.open, torch.save, cv2.imread); "
            "from fa_train.models.ultralytics_yolo import _import_ultralytics; _import_ultralytics(); "
            "import ultralytics.utils.patches; "
            "assert (PIL.Image.open, torch.save, cv2.imread) == before, 'patched'; "
            "from fa_train.data.common import load_image; "
            f"open({str(tmp_path / 'bad.jpg')!r}, 'wb').write(b'not an image'); "
            f"load_image({str(tmp_path / 'bad.jpg')!r})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "patched" not in r.stderr and "pi_heif" not in r.stderr, r.stderr
    assert "bad.jpg" in r.stderr.splitlines()[-1], r.stderr

YAMLS = ("yolov8n.yaml", "yolo11n.yaml")


def _model(yaml="yolov8n.yaml", nc=3, seed=0):
    torch.manual_seed(seed)
    return create_model("ultralytics", nc, cfg=yaml)


def _image(seed=0, size=64):
    """An HxWx3 uint8 RGB image: smooth blobs, so that the network's outputs vary over it."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 8, size // 8, 3)).astype(np.float32)
    return np.kron(small, np.ones((8, 8, 1), np.float32)).astype(np.uint8)


def _confident(model):
    """Class 0's logits spread around 0 (scores 0.2-0.8 over the anchors), class 1's far below any threshold: a
    randomly initialised network with detections to compare, and no anchor above the threshold in two classes (our
    NMS takes every class above it, Ultralytics' predict the best class of each anchor)."""
    head = model.net.model[-1]
    with torch.no_grad():
        for seq in head.cv3:
            conv = seq[-1]
            conv.weight.mul_(20.0)
            conv.bias.fill_(-20.0)
            conv.bias[0] = 0.0
    return model


@pytest.mark.parametrize("yaml", YAMLS)
def test_detections_match_ultralytics_predict(yaml):
    """The same weights and image through Ultralytics' own predict (its letterbox is the identity on a 64x64 image at
    imgsz 64; it fuses Conv+BN, and clips boxes to the image) and through our export_module + postprocess: the same boxes, scores and labels."""
    from ultralytics import YOLO

    model = _confident(_model(yaml, nc=2)).eval()
    rgb = _image()
    yolo = YOLO(yaml, task="detect")
    yolo.model = copy.deepcopy(model.net)  # the very same network (Ultralytics fuses its own copy)
    res = yolo.predict(rgb[..., ::-1].copy(), imgsz=64, conf=0.25, iou=0.7, max_det=300, device="cpu",
                       verbose=False, save=False)[0]
    theirs = res.boxes
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    ours = model.postprocess(model.export_module()(x), conf_thres=0.25, iou_thres=0.7, max_det=300)[0]
    assert len(theirs) > 10, "the test image gives Ultralytics too few detections to compare"
    assert len(ours["boxes"]) == len(theirs)
    o_order, t_order = ours["scores"].argsort(descending=True), theirs.conf.argsort(descending=True)
    torch.testing.assert_close(ours["scores"][o_order], theirs.conf[t_order].float(), atol=1e-4, rtol=1e-4)
    # Ultralytics clips its boxes to the image after NMS; our postprocess leaves them as predicted (as for YOLOv3)
    torch.testing.assert_close(ours["boxes"][o_order].clamp(0, 64), theirs.xyxy[t_order].float(), atol=2e-3,
                               rtol=1e-4)
    assert torch.equal(ours["labels"][o_order].long(), theirs.cls[t_order].long())
    assert (ours["labels"] == 0).all()


@pytest.mark.parametrize("yaml", YAMLS)
def test_export_module_is_ultralytics_decode(yaml):
    """images -> [N, A, 4 + C]: Ultralytics' own inference output (cx, cy, w, h; class probabilities) in xyxy."""
    import torchvision

    model = _model(yaml).eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        ref = model.net(x)[0].transpose(1, 2)  # [N, A, 4 + C]
        out = model.export_module()(x)
    torch.testing.assert_close(out[..., :4], torchvision.ops.box_convert(ref[..., :4], "cxcywh", "xyxy"),
                               atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out[..., 4:], ref[..., 4:], atol=1e-6, rtol=1e-5)


def _ultralytics_batch(targets, size):
    """Ultralytics' batch format built by hand: image index, class, normalised cx, cy, w, h (ignored left out)."""
    idx, cls, boxes = [], [], []
    for i, t in enumerate(targets):
        for b, c, ign in zip(t["boxes"].tolist(), t["labels"].tolist(), t["ignore"].tolist()):
            if ign:
                continue
            x1, y1, x2, y2 = b
            idx.append(i)
            cls.append([c])
            boxes.append([(x1 + x2) / 2 / size, (y1 + y2) / 2 / size, (x2 - x1) / size, (y2 - y1) / size])
    return {"batch_idx": torch.tensor(idx, dtype=torch.float32), "cls": torch.tensor(cls, dtype=torch.float32),
            "bboxes": torch.tensor(boxes, dtype=torch.float32)}


@pytest.mark.parametrize("yaml", YAMLS)
def test_loss_is_ultralytics_loss(yaml):
    """forward_train's terms against Ultralytics' DetectionModel.loss on the same batch (its loss is its terms times
    the batch size), an ignored object left out of Ultralytics' targets; in training mode (BatchNorm on the batch)."""
    model = _model(yaml, nc=3).train()
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    targets = make_targets(3)
    targets[1]["ignore"] = torch.tensor([False, True])
    ours, mid = model.forward_train(x, targets)
    assert set(ours) == {"box", "cls", "dfl"} and mid.shape == (3, model.mid_channels, 2, 2)
    batch = _ultralytics_batch(targets, 64)
    batch["img"] = x
    total, items = model.net.loss(batch)
    torch.testing.assert_close(torch.stack([ours["box"], ours["cls"], ours["dfl"]]) * 3, total, atol=1e-5, rtol=1e-5)
    assert all(float(v.detach()) > 0 for v in ours.values())
    # the gradient reaches the images through every term (the attacks' need)
    xg = x.clone().requires_grad_(True)
    model.eval()
    sum(model.forward_train(xg, targets)[0].values()).backward()
    assert xg.grad.abs().sum() > 0


def test_per_image_losses_do_not_depend_on_the_batch():
    """loss_terms_per_image and object_losses of a batch of 3 == each image alone (eval mode), and a batch of one
    gives forward_train's terms (Ultralytics' own get_assigned_targets_and_loss on that image alone), input
    gradients included; ignored objects NaN; an image without objects (box and dfl 0) beside the others."""
    model = _model("yolov8n.yaml", nc=3).eval()
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    targets = make_targets(3) + [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    targets[2]["ignore"] = torch.tensor([True, False])
    crit = model.criterion()
    assigner = crit.assigner

    def louder(*a, **k):  # target scores x 1e4 for both routes: normalisers above clamp(min=1)
        out = list(assigner(*a, **k))
        out[2] = out[2] * 1e4
        return tuple(out)

    object.__setattr__(crit, "assigner", louder)
    xg = x.clone().requires_grad_(True)
    rows = model.loss_terms_per_image(xg, targets)
    (grad,) = torch.autograd.grad(sum(v.sum() for v in rows.values()), xg)
    for i in range(4):
        xi = x[i:i + 1].clone().requires_grad_(True)
        whole, _ = model.forward_train(xi, [targets[i]])
        (gi,) = torch.autograd.grad(sum(whole.values()), xi)
        torch.testing.assert_close(grad[i:i + 1], gi, atol=1e-6 * float(gi.abs().max()) + 1e-9, rtol=1e-4)
    assert float(rows["box"][3].detach()) == 0 == float(rows["dfl"][3].detach()) < float(rows["cls"][3].detach())
    object.__setattr__(crit, "assigner", assigner)
    with torch.no_grad():
        batched = model.loss_terms_per_image(x, targets)
        objects = model.object_losses(x, targets)
        for i in range(3):
            single = model.loss_terms_per_image(x[i:i + 1], [targets[i]])
            whole, _ = model.forward_train(x[i:i + 1], [targets[i]])
            for k in ("box", "cls", "dfl"):
                torch.testing.assert_close(batched[k][i], single[k][0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(batched[k][i], whole[k], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(objects[i], model.object_losses(x[i:i + 1], [targets[i]])[0], equal_nan=True,
                                       atol=1e-5, rtol=1e-5)
    assert torch.isnan(objects[2][0])  # ignored (an object the assigner gives no anchor is NaN too)
    assert (~torch.isnan(torch.cat(objects))).sum() >= 3
    assert [len(o) for o in objects] == [2, 2, 2, 0]


def test_attack_outputs_have_the_contract_shapes():
    model = _model("yolov8n.yaml", nc=3).eval()
    x = torch.rand(2, 3, 64, 64)
    slots = model.output_slots(x)
    a = 8 * 8 + 4 * 4 + 2 * 2
    assert slots["boxes"].shape == (2, a, 4) and slots["cls"].shape == (2, a, 3)
    assert torch.sigmoid(slots["obj"]).eq(1.0).all() and slots["cls_activation"] == "sigmoid"
    (score, mask), = model.objectness_logits(x).values()
    assert mask is None
    torch.testing.assert_close(score, slots["cls"].max(-1).values)


def test_an_untrusted_yaml_runs_no_code(tmp_path):
    """A model YAML (from a checkpoint's arch, a preset, a file) is refused when it names anything but network
    layers or an activation that is more than a torch.nn module: Ultralytics would eval it."""
    from fa_train.models.ultralytics_yolo import load_yaml

    model = _model("yolov8n.yaml")
    marker = tmp_path / "ran"
    evil = dict(model.yaml_dict, activation=f"__import__('os').system('touch {marker}')")
    with pytest.raises(UltralyticsError, match="activation"):
        create_model("ultralytics", 3, cfg=evil)
    evil = copy.deepcopy(model.yaml_dict)
    evil["backbone"][0][2] = "torch_safe_load"  # a function in Ultralytics' namespace, not a layer
    with pytest.raises(UltralyticsError, match="not a network layer"):
        create_model("ultralytics", 3, cfg=evil)
    assert not marker.exists()
    seg = load_yaml("yolov8n.yaml")
    seg["head"][-1][2] = "Segment"
    with pytest.raises(UltralyticsError, match="Detect head"):
        create_model("ultralytics", 3, cfg=seg)
    with pytest.raises(UltralyticsError, match="no such Ultralytics model YAML"):
        create_model("ultralytics", 3, cfg="yolov99n.yaml")


@pytest.fixture(scope="module")
def ultralytics_pt(tmp_path_factory):
    """An Ultralytics .pt as Ultralytics writes it (YOLO.save: a pickle of the whole model), 80 classes."""
    from ultralytics import YOLO

    p = tmp_path_factory.mktemp("ultra-pt") / "user.pt"
    torch.manual_seed(5)
    YOLO("yolov8n.yaml", task="detect").save(str(p))
    return p


def test_an_ultralytics_pickle_is_refused_without_trust_and_converted_once(ultralytics_pt, tmp_path):
    from fa_train.models import load_model
    from fa_train.cli import main as train_main
    from fa_train.models.ultralytics_yolo import main as convert_main

    pt = str(ultralytics_pt)
    with pytest.raises(UltralyticsError, match="--trust-checkpoint"):
        create_model("ultralytics", 80, cfg=pt)
    out = tmp_path / "run"
    r = CliRunner().invoke(train_main, ["--model", f"ultralytics:{pt}", "--img-size", "64", "--out", str(out)])
    assert r.exit_code == 2, r.output
    line = r.output.strip().splitlines()
    assert len(line) == 1 and pt in line[0] and "--trust-checkpoint" in line[0] and "runs code" in line[0]
    assert not out.exists()

    # trusted: the file's weights, the same outputs as the Ultralytics model it holds
    ref = torch.load(pt, map_location="cpu", weights_only=False)["model"].float().eval()
    trusted = create_model("ultralytics", 80, cfg=pt, trust_checkpoint=True).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(trusted.export_module()(x)[..., 4:], ref(x)[0].transpose(1, 2)[..., 4:],
                                   atol=1e-5, rtol=1e-4)

    # the safe route: one trusted conversion (the command), then a checkpoint read with weights_only everywhere
    dst = tmp_path / "converted.pt"
    convert_main([pt, str(dst)])  # exits only on an error
    torch.load(str(dst), map_location="cpu", weights_only=True)  # no pickle of code in it
    model, ckpt = load_model(str(dst))
    assert ckpt["arch"]["name"] == "ultralytics" and len(ckpt["class_names"]) == 80
    again = create_model("ultralytics", 80, cfg=str(dst)).eval()  # --model ultralytics:converted.pt, no trust
    with torch.no_grad():
        for m in (model.eval(), again):
            torch.testing.assert_close(m.export_module()(x), trusted.export_module()(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(UltralyticsError, match="--trust-checkpoint"):
        convert_checkpoint(pt, str(tmp_path / "x.pt"))  # the function wants the trust said too


TRAIN = ["--data", "synth:60", "--img-size", "64", "--batch-size", "2", "--workers", "0", "--max-images", "4",
         "--max-test-images", "2", "--epochs", "1", "--eval-every", "0", "--quiet", "--lr", "0.001"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ultralytics_pt):
    """yolov8n at 64 px: one epoch of standard training from the user's .pt (trusted: 80 classes there, 4 here, the
    class layers new), then one epoch of --method fa from it. Paths of both runs' last.pt."""
    from fa_train.cli import main as train_main

    def build(d):
        r = CliRunner().invoke(train_main, ["--model", f"ultralytics:{ultralytics_pt}", "--trust-checkpoint", *TRAIN,
                                            "--out", str(d / "std")])
        assert r.exit_code == 0, r.output
        r2 = CliRunner().invoke(train_main, ["--model", "ultralytics:yolov8n.yaml", "--method", "fa", "--init",
                                             str(d / "std" / "last.pt"), *TRAIN, "--out", str(d / "fa")])
        return [str(d / "std" / "last.pt"), str(d / "fa" / "last.pt"), r.exit_code, r2.exit_code, r.output + r2.output]

    return built_once(tmp_path_factory, "ultralytics-trained", build)


def test_fa_train_standard_and_fa_one_epoch(trained):
    import yaml

    std, fa, code_std, code_fa, output = trained
    assert code_std == 0 and code_fa == 0, output
    from fa_train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(std)
    cfg = ckpt["config"]["model"]
    # the run recorded the architecture read from the .pt, not the file, and no trust
    assert cfg["name"] == "ultralytics" and isinstance(cfg["cfg"], dict) and not cfg.get("trust_checkpoint")
    assert yaml.safe_load(open(os.path.join(os.path.dirname(std), "config.yaml")))["model"]["cfg"]["nc"] == 80
    def keys(run):
        return set().union(*[json.loads(line) for line in open(os.path.join(os.path.dirname(run), "metrics.jsonl"))])

    assert {"train/box", "train/cls", "train/dfl"} <= keys(std)
    assert {"train/adv_box", "train/adv_cls", "train/adv_dfl", "train/ssfa", "train/kdfa"} <= keys(fa)
    assert load_checkpoint(fa)["config"]["method"]["name"] == "fa"


def test_resume_of_a_run_from_a_pt_needs_neither_the_file_nor_trust(trained, tmp_path, ultralytics_pt):
    import shutil

    from fa_train.cli import main as train_main

    run = tmp_path / "std"
    shutil.copytree(os.path.dirname(trained[0]), run)
    r = CliRunner().invoke(train_main, ["--resume", str(run / "last.pt"), "--epochs", "2", "--quiet"])
    assert r.exit_code == 0, r.output


def test_fa_bench_suite(trained, tmp_path):
    from fa_deploy.cli import main as bench_main

    js = tmp_path / "b.json"
    r = CliRunner().invoke(bench_main, ["--weights", trained[1], "--attack", "suite", "--steps", "1",
                                        "--apgd-iterations", "2", "--max-images", "2", "--batch-size", "2",
                                        "--workers", "0", "--quiet", "--tog-score", "0.01", "--json", str(js)])
    assert r.exit_code == 0, r.output
    out = json.loads(js.read_text())
    assert out["columns"][-1] == "worst"
    for c in ("clean", "PGD-1", "apgd", "tog-vanishing", "tog-fabrication", "tog-mislabel", "tog-untargeted", "cwa"):
        assert c in out["columns"]


EXPORT = ["--onnx", "fp32", "--onnx", "fp16", "--onnx", "int8", "--calib-images", "8", "--verify-images", "4"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained):
    """trained[1] (yolov8n, --method fa) through fa-export at fp32, fp16 and int8 (each with its parity check)."""
    from fa_deploy.export_cli import export_main

    def build(d):
        r = CliRunner().invoke(export_main, [trained[1], *EXPORT, "--out", str(d)])
        return [str(d), r.exit_code, r.output]

    return built_once(tmp_path_factory, "ultralytics-exported", build)


@pytest.fixture(scope="module")
def trained11(tmp_path_factory):
    """yolo11n at 64 px: one epoch of --method fa from its YAML, then fa-export at fp32, fp16 and int8 (with parity).
    [weights, export folder, train exit code, export exit code, output]."""
    from fa_deploy.export_cli import export_main
    from fa_train.cli import main as train_main

    def build(d):
        r = CliRunner().invoke(train_main, ["--model", "ultralytics:yolo11n.yaml", "--method", "fa", *TRAIN,
                                            "--out", str(d / "run")])
        w = d / "run" / "last.pt"
        r2 = CliRunner().invoke(export_main, [str(w), *EXPORT, "--out", str(d / "exp")]) if r.exit_code == 0 else r
        return [str(w), str(d / "exp"), r.exit_code, r2.exit_code, r.output + r2.output]

    return built_once(tmp_path_factory, "ultralytics-yolo11", build)


@pytest.fixture(params=["yolov8n", "yolo11n"])
def deployed(request):
    """(family, weights, folder of its fp32 / fp16 / int8 exports) of each Ultralytics family."""
    if request.param == "yolov8n":
        exported = request.getfixturevalue("exported")
        assert exported[1] == 0, exported[2]
        return request.param, request.getfixturevalue("trained")[1], exported[0]
    t11 = request.getfixturevalue("trained11")
    assert t11[2] == 0 and t11[3] == 0, t11[4]
    return request.param, t11[0], t11[1]


def test_fa_export_onnx_parity_at_three_precisions(deployed):
    import onnxruntime as ort

    from fa_train.models import load_model

    _, weights, out = deployed
    for prec in ("fp32", "fp16", "int8"):
        side = json.loads(open(os.path.join(out, f"last.{prec}.onnx.json")).read())
        assert side["parity"]["passed"], (prec, side["parity"])
        assert side["tensorrt_compat"]["ok"], (prec, side["tensorrt_compat"]["problems"])  # static check
    onnx_file = os.path.join(out, "last.fp32.onnx")
    model, _ = load_model(weights)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = model.eval().export_module()(x).numpy()
    sess = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=1e-4)


def test_fa_predict_and_sanity(trained, shapes_devkit, tmp_path):
    from conftest import predict_and_sanity

    predict_and_sanity(trained[1], shapes_devkit, tmp_path)


def test_yolo11_suite_sanity_and_predict(trained11, shapes_devkit, tmp_path):
    """YOLO11 through the same commands as YOLOv8 (one module for both): one epoch of --method fa from its YAML
    (the fixture; its exports at three precisions are checked in the parity test), fa-bench's whole --attack suite,
    --sanity and fa-predict (source and ONNX file)."""
    from conftest import predict_and_sanity
    from fa_deploy.cli import main as bench_main

    w, _, code_train, _, output = trained11
    assert code_train == 0, output
    js = tmp_path / "b.json"
    r = CliRunner().invoke(bench_main, ["--weights", w, "--attack", "suite", "--steps", "1", "--apgd-iterations", "1",
                                        "--max-images", "1", "--batch-size", "1", "--workers", "0", "--quiet",
                                        "--tog-score", "0.01", "--json", str(js), "--min-clean-ap", "0"])
    assert r.exit_code == 0, r.output
    cols = json.loads(js.read_text())["columns"]
    assert cols[-1] == "worst"
    for c in ("clean", "PGD-1", "apgd", "tog-vanishing", "tog-fabrication", "tog-mislabel", "tog-untargeted", "cwa"):
        assert c in cols
    predict_and_sanity(w, shapes_devkit, tmp_path)


def test_twins_of_the_exported_files_equal_onnxruntime_and_the_source(deployed, tmp_path):
    """The twin of each exported file (the ONNX graph interpreted in torch up to the Detect head's raw maps, our
    wrapper's loss and postprocess on them): verified against ONNX Runtime (outputs and the taps the loss reads;
    int8 layer by layer), its predictions equal to ONNX Runtime's; at fp32 its losses, M-th layer and input gradient
    equal the source checkpoint's (the same function, computed by another route); at fp16 / int8 the input gradient
    points where the source's does; fa-bench --threat all over the file (transfer, whitebox, differential)."""
    import onnxruntime as ort

    from fa_deploy.cli import main as bench_main
    from fa_deploy.robustness.twin import load_twin
    from fa_deploy.robustness.twin import UltralyticsTwin
    from fa_train.models import load_model

    family, weights, out = deployed
    model, _ = load_model(weights)
    model.eval()
    x = torch.from_numpy(np.random.default_rng(1).random((2, 3, 64, 64), dtype=np.float32))
    t = make_targets(2)
    xs = x.clone().requires_grad_(True)
    src_loss = model.loss_terms_per_image(xs, t)
    sum(src_loss.values()).sum().backward()
    for prec in ("fp32", "fp16", "int8"):
        path = os.path.join(out, f"last.{prec}.onnx")
        twin = load_twin(path, verify_images=x)
        assert isinstance(twin, UltralyticsTwin) and twin.precision == prec and twin.verification["model"]["passed"]
        taps = twin.verification["model"]["outputs"]
        assert set(twin.box_names + twin.cls_names + [twin.mid_name]) <= set(taps)
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        with torch.no_grad():
            ours = twin.export_module()(x).numpy()
        theirs = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        if prec == "int8":  # free-running: a rounding step now and then (verify checks each layer on ORT's inputs)
            near = (np.mean(np.abs(ours - theirs)[..., :4] <= 0.5), np.mean(np.abs(ours - theirs)[..., 4:] <= 0.01))
            assert min(near) > 0.99, near  # boxes within half a pixel, probabilities within 0.01
        else:
            np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3)
        xg = x.clone().requires_grad_(True)
        loss = twin.loss_terms_per_image(xg, t)
        sum(loss.values()).sum().backward()
        assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
        a, b = xg.grad.flatten().double(), xs.grad.flatten().double()  # ~1e-9: no eps in the cosine
        cos = float(a @ b / (a.norm() * b.norm()))
        if prec == "fp32":
            for k in src_loss:
                torch.testing.assert_close(loss[k], src_loss[k].detach(), rtol=1e-4, atol=1e-5)
            with torch.no_grad():
                torch.testing.assert_close(twin.features(x), model.features(x), rtol=1e-4, atol=1e-4)
            scale = float(xs.grad.abs().max())
            torch.testing.assert_close(xg.grad, xs.grad, rtol=1e-3, atol=1e-3 * scale)
        else:
            assert cos > (0.99 if prec == "fp16" else 0.9), (prec, cos)  # measured 0.99999 / 0.99 (yolov8n)
    attacked = "int8" if family == "yolov8n" else "fp16"  # one file each: the threats on two precisions
    js = tmp_path / "b.json"
    r = CliRunner().invoke(bench_main, ["--weights", weights, "--backend", os.path.join(out, f"last.{attacked}.onnx"),
                                        "--threat", "all", "--max-images", "2", "--steps", "1", "--workers", "0",
                                        "--json", str(js), "--quiet", "--max-drop", "1", "--max-deploy-misses", "1",
                                        "--min-clean-ap", "0"])
    assert r.exit_code == 0, r.output
    assert "twin verified against ONNX Runtime" in r.output
    rows = json.loads(js.read_text())["rows"]
    assert [(row["backend"], row["threat"]) for row in rows] == [("source", "own")] + [
        (f"last.{attacked}.onnx", th) for th in ("transfer", "whitebox", "differential", "worst")]
