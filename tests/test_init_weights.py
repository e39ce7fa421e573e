"""--init (issue 22): robust ImageNet ResNet backbones in their published layouts, torchvision detectors, Darknet-53
backbones, refusals of everything else, and the two-stage recipe (adversarial base, then fine-tuning) end to end.

References are independent of the loader: torchvision's own resnet18 / Faster R-CNN state dicts saved in each
layout, the Darknet-53 tensors of a source model, and a snapshot of the model before loading (what must not change).
"""
import os

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner

from fa_train.initial_weights import InitError, load_init
from fa_train.models import create_model

FRCNN = dict(backbone="resnet18", fpn_channels=32, min_size=64, max_size=64)
YOLO = dict(width_mult=0.125, depth_mult=0.2)
TINY = ["--data", "synth:60", "--img-size", "64", "--batch-size", "4", "--width-mult", "0.125", "--depth-mult", "0.2",
        "--workers", "0", "--max-images", "8", "--max-test-images", "4", "--quiet", "--warmup-iters", "2",
        "--eval-every", "0"]


def _randomised(module, seed):
    """`module` with every float tensor drawn afresh (BN statistics too), so a loaded tensor cannot equal an
    initialised one by chance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in module.state_dict().items():
            if t.dtype.is_floating_point:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "running_var" in k else
                        torch.randn(t.shape, generator=g) * 0.1)
    return module


@pytest.fixture(scope="module")
def resnet18_state():
    torch.manual_seed(1)
    return {k: v.clone() for k, v in _randomised(torchvision.models.resnet18(weights=None), 1).state_dict().items()}


def _frcnn(seed=0):
    torch.manual_seed(seed)
    return create_model("fasterrcnn_resnet50_fpn", 4, **FRCNN)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


def _robustness_layout(state, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """The MadryLab robustness library's checkpoint: {"model": AttackerModel state dict under DataParallel,
    "epoch": ...}: module.model.*, module.attacker.model.* (a copy; zeros here, so loading it would show),
    module.normalizer.* and module.attacker.normalizer.*"""
    norm = {"new_mean": torch.tensor(mean).view(3, 1, 1), "new_std": torch.tensor(std).view(3, 1, 1)}
    sd = {**_prefixed(state, "module.model."), **_prefixed({k: torch.zeros_like(v) for k, v in state.items()},
                                                             "module.attacker.model."),
          **_prefixed(norm, "module.normalizer."), **_prefixed(norm, "module.attacker.normalizer.")}
    return {"model": sd, "epoch": 90, "schedule": None}


LAYOUTS = {
    "plain": lambda s: s,
    "state_dict+module.": lambda s: {"state_dict": _prefixed(s, "module.")},
    "model+model.": lambda s: {"model": _prefixed(s, "model."), "epoch": 10},
    "state_dict+module.model.": lambda s: {"state_dict": _prefixed(s, "module.model."), "arch": "resnet18"},
    "robustness": _robustness_layout,
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_frcnn_resnet_backbone_in_each_published_layout(tmp_path, resnet18_state, layout):
    path = tmp_path / f"{layout}.pt"
    torch.save(LAYOUTS[layout](resnet18_state), path)
    model = _frcnn()
    before = _snapshot(model)
    logs = []
    report = load_init(model, str(path), logs.append)
    body = "detector.backbone.body."
    reference = {k: v for k, v in resnet18_state.items() if not k.startswith("fc.") and "num_batches" not in k}
    after = model.state_dict()
    for k, v in reference.items():  # torchvision's tensors, each one in the body
        assert torch.equal(after[body + k], v), k
    assert {k[len(body):] for k in after if k.startswith(body)} == set(reference)
    for k, v in before.items():  # FPN, RPN, RoI heads: as initialised
        if not k.startswith(body):
            assert torch.equal(after[k], v), k
    assert report.kind == "backbone" and report.tensors == len(reference)
    assert len(logs) == 1 and f"{len(reference)} tensors" in logs[0] and "resnet18" in logs[0], logs
    assert "FPN" in logs[0] and str(path) in logs[0]


def test_frcnn_resnet_backbone_from_plain_safetensors(tmp_path, resnet18_state):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in _prefixed(resnet18_state, "module.").items()}
    save_file(state, str(tmp_path / "r.safetensors"))
    model = _frcnn()
    report = load_init(model, str(tmp_path / "r.safetensors"), lambda m: None)
    assert report.kind == "backbone"
    assert torch.equal(model.detector.backbone.body.layer2[0].downsample[1].running_var,
                       resnet18_state["layer2.0.downsample.1.running_var"])


def test_robustness_normalizer_other_than_imagenet_is_noted(tmp_path, resnet18_state):
    path = tmp_path / "cifar_norm.pt"
    torch.save(_robustness_layout(resnet18_state, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010)), path)
    logs = []
    load_init(_frcnn(), str(path), logs.append)
    assert any("normalizer" in m and "0.4914" in m and "0.485" in m for m in logs), logs


def test_frcnn_torchvision_detector_checkpoint(tmp_path):
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(5)
    ref = FasterRCNN(resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3), num_classes=10,
                     min_size=64, max_size=64)
    _randomised(ref, 5)
    torch.save({"model": ref.state_dict(), "epoch": 25}, tmp_path / "det.pth")  # torchvision references' layout
    model = create_model("fasterrcnn_resnet50_fpn", 4, backbone="resnet18", fpn_channels=256, min_size=64,
                         max_size=64)
    before = _snapshot(model.detector)
    logs = []
    report = load_init(model, str(tmp_path / "det.pth"), logs.append)
    after, theirs = model.detector.state_dict(), ref.state_dict()
    for k in after:
        if k.startswith("roi_heads.box_predictor."):  # 10 classes there, 5 here: left at its initialisation
            assert torch.equal(after[k], before[k]) and after[k].shape != theirs[k].shape, k
        elif "num_batches" not in k:
            assert torch.equal(after[k], theirs[k]), k
    assert report.kind == "detector" and "box_predictor" in logs[0] and "whole detector" in logs[0]


def _one_line_refusal(model, path, *needles):
    with pytest.raises(InitError) as e:
        load_init(model, str(path), lambda m: None)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def test_frcnn_refuses_other_files_clearly(tmp_path, resnet18_state):
    model = _frcnn()
    before = _snapshot(model)
    # a ResNet of another depth: its extra blocks are named
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    _one_line_refusal(model, tmp_path / "r34.pth", "resnet18 state dict", "unexpected ['layer1.2.")
    # a state dict of something else, and a dict without tensors
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pt")
    _one_line_refusal(model, tmp_path / "other.pt", "encoder.weight", "expected", "torchvision resnet18")
    torch.save({"epoch": 3, "acc": 0.5}, tmp_path / "meta.pt")
    _one_line_refusal(model, tmp_path / "meta.pt", "'epoch'", "'state_dict' or 'model' entry")
    # the ResNet with some of its tensors missing
    torch.save({k: v for k, v in resnet18_state.items() if not k.startswith("layer4.1.")}, tmp_path / "cut.pth")
    _one_line_refusal(model, tmp_path / "cut.pth", "missing ['layer4.1.")
    # a YOLOv3 checkpoint of fa-train, Darknet weights: other models
    from fa_train.models.darknet import save_darknet_weights

    yolo = create_model("yolov3", 4, **YOLO)
    torch.save({"model": yolo.state_dict(), "arch": yolo.arch_config()}, tmp_path / "yolo.pt")
    _one_line_refusal(model, tmp_path / "yolo.pt", "checkpoint is for another model", "yolov3",
                      "fasterrcnn_resnet50_fpn")
    save_darknet_weights(yolo, str(tmp_path / "darknet53.conv.74"), backbone_only=True)
    _one_line_refusal(model, tmp_path / "darknet53.conv.74", "Darknet weights initialise YOLOv3 only")
    # YOLOv3 weights in a plain state dict: named for what they look like
    torch.save(yolo.state_dict(), tmp_path / "yolo_state.pt")
    _one_line_refusal(model, tmp_path / "yolo_state.pt", "fa-train YOLOv3 weights")
    # a pickle that would run code: refused by the safe loader, never run, never the advice to load it unsafely
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"state_dict": Evil()}, str(tmp_path / "evil.pt"))
    msg = _one_line_refusal(model, tmp_path / "evil.pt", "cannot be loaded safely")
    assert "weights_only" not in msg and not (tmp_path / "pwned").exists()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing was half-loaded


def test_frcnn_weights_backbone_option_reads_robust_layouts(tmp_path, resnet18_state):
    torch.save(_robustness_layout(resnet18_state), tmp_path / "robust.ckpt")
    m = create_model("fasterrcnn_resnet50_fpn", 4, weights_backbone=str(tmp_path / "robust.ckpt"), **FRCNN)
    assert torch.equal(m.detector.backbone.body.layer3[1].conv2.weight, resnet18_state["layer3.1.conv2.weight"])
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(InitError, match=r"model.weights_backbone .*bad.pth: cannot initialise"):
        create_model("fasterrcnn_resnet50_fpn", 4, weights_backbone=str(tmp_path / "bad.pth"), **FRCNN)


# ---------------------------------------------------------------------------------------------- YOLOv3


@pytest.fixture
def source_yolo():
    torch.manual_seed(7)
    return _randomised(create_model("yolov3", 4, **YOLO), 7)


def _yolo(seed=0, **kw):
    torch.manual_seed(seed)
    return create_model("yolov3", 4, **dict(YOLO, **kw))


def _backbone_only_loaded(model, before, source_backbone: dict):
    after = model.state_dict()
    for k, v in source_backbone.items():
        if "num_batches" not in k:
            assert torch.equal(after["backbone." + k], v), k
    changed = [k for k, v in before.items() if not k.startswith("backbone.") and not torch.equal(after[k], v)]
    assert not changed, changed  # neck and heads keep their initialisation


def test_yolo_darknet_backbone_cut_loads_only_darknet53(tmp_path, source_yolo):
    from fa_train.models.darknet import save_darknet_weights

    path = tmp_path / "darknet53.conv.74"
    save_darknet_weights(source_yolo, str(path), backbone_only=True)
    # the file holds the backbone's tensors only: header (5 words) + every Darknet-53 tensor, counted independently
    n_backbone = sum(t.numel() for k, t in source_yolo.backbone.state_dict().items() if "num_batches" not in k)
    assert len(np.fromfile(path, dtype=np.float32)) == 5 + n_backbone
    model = _yolo()
    before = _snapshot(model)
    logs = []
    report = load_init(model, str(path), logs.append)
    _backbone_only_loaded(model, before, source_yolo.backbone.state_dict())
    assert report.kind == "darknet" and "Darknet-53 backbone" in logs[0] and "keep their initialisation" in logs[0]
    # the full network's file loads every convolution
    save_darknet_weights(source_yolo, str(tmp_path / "full.weights"))
    model = _yolo()
    load_init(model, str(tmp_path / "full.weights"), logs.append)
    assert "whole network" in logs[-1]
    for k, v in source_yolo.state_dict().items():
        if v.dtype.is_floating_point:
            assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("layout", ["plain", "state_dict+module.", "model+model.", "state_dict+module.model."])
def test_yolo_darknet53_state_dict_in_our_layout(tmp_path, source_yolo, layout):
    state = source_yolo.backbone.state_dict()
    torch.save(LAYOUTS[layout](state), tmp_path / "dn53.pt")
    model = _yolo()
    before = _snapshot(model)
    logs = []
    report = load_init(model, str(tmp_path / "dn53.pt"), logs.append)
    _backbone_only_loaded(model, before, state)
    n = len([k for k in state if "num_batches" not in k])
    assert report.kind == "backbone" and f"{n} tensors" in logs[0] and "Darknet-53" in logs[0]


def test_yolo_refuses_other_files_clearly(tmp_path, source_yolo, resnet18_state):
    model = _yolo()
    before = _snapshot(model)
    torch.save(resnet18_state, tmp_path / "r18.pth")
    _one_line_refusal(model, tmp_path / "r18.pth", "torchvision ResNet", "Darknet-53 state dict")
    # Darknet-53 of another width: the shapes are named
    torch.save(_yolo(width_mult=0.25).backbone.state_dict(), tmp_path / "wide.pt")
    _one_line_refusal(model, tmp_path / "wide.pt", "shapes differ",
                      "stages.0.down.conv.weight (16, 8, 3, 3) vs (8, 8, 3, 3)")
    # a Faster R-CNN checkpoint of fa-train
    frcnn = _frcnn()
    torch.save({"model": frcnn.state_dict(), "arch": frcnn.arch_config()}, tmp_path / "frcnn.pt")
    _one_line_refusal(model, tmp_path / "frcnn.pt", "checkpoint is for another model", "fasterrcnn_resnet50_fpn")
    # a fa-train YOLOv3 checkpoint of another width: the differences in one line
    wide = _yolo(width_mult=0.25)
    torch.save({"model": wide.state_dict(), "arch": wide.arch_config()}, tmp_path / "wide_ckpt.pt")
    _one_line_refusal(model, tmp_path / "wide_ckpt.pt", "checkpoint is for another model: width_mult: model has "
                      "0.125, checkpoint has 0.25")
    # an exported model
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    _one_line_refusal(model, tmp_path / "m.onnx", "exported model")
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_yolo_whole_model_state_dict_and_checkpoint(tmp_path, source_yolo):
    torch.save({"state_dict": _prefixed(source_yolo.state_dict(), "module.")}, tmp_path / "whole.pt")
    model = _yolo()
    report = load_init(model, str(tmp_path / "whole.pt"), lambda m: None)
    assert report.kind == "model"
    for k, v in source_yolo.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


# ---------------------------------------------------------------------------------------------- the command


def test_cli_init_refusal_is_one_line(tmp_path, resnet18_state):
    from fa_train.cli import main

    torch.save(resnet18_state, tmp_path / "r18.pth")
    r = CliRunner().invoke(main, TINY + ["--epochs", "1", "--init", str(tmp_path / "r18.pth"), "--out",
                                         str(tmp_path / "run")])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("fa-train:")]
    assert len(errors) == 1 and errors[0].startswith("fa-train: error: --init ") and errors[0].endswith(
        "or a fa-train yolov3 checkpoint"), r.output
    assert "torchvision ResNet" in errors[0] and r.output.endswith(errors[0] + "\n")
    assert "Traceback" not in r.output


def test_two_stage_recipe_adversarial_base_then_robust_fine_tuning(tmp_path):
    """`fa-train --method at` (the adversarially trained base), then `fa-train --config configs/demo_robust.yaml
    --init BASE --method fa`, tiny sizes, one epoch each; the fine-tuning starts from the base's weights: with
    lr 0 its parameters stay the base's, tensor for tensor (the base checkpoint read back independently)."""
    from fa_train.checkpoint import load_checkpoint
    from fa_train.cli import main

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    small = TINY + ["--max-images", "4", "--max-test-images", "2"]  # one step per run
    base = tmp_path / "base"
    r = CliRunner().invoke(main, small + ["--epochs", "1", "--method", "at", "--lr", "0.001", "--out", str(base)])
    assert r.exit_code == 0, r.output
    fine = tmp_path / "fa"
    r = CliRunner().invoke(main, ["--config", os.path.join(root, "configs", "demo_robust.yaml"), *small, "--epochs",
                                  "1", "--init", str(base / "last.pt"), "--method", "fa", "--lr", "0",
                                  "--out", str(fine)])
    assert r.exit_code == 0, r.output
    assert f"init: fa-train checkpoint {base / 'last.pt'}: the whole model" in r.output
    ck = load_checkpoint(str(fine / "last.pt"))
    m = ck["config"]["method"]
    assert (m["name"], m["pgd_steps"], m["train_eps"], m["objective"], m["random_start"]) == ("fa", 3, 0.03, "mix",
                                                                                             True)
    assert ck["config"]["train"]["init"] == str(base / "last.pt") and ck["step"] == 1
    base_ck = torch.load(base / "last.pt", map_location="cpu", weights_only=True)
    params = {n for n, _ in _yolo().named_parameters()}
    for k in params:
        assert torch.equal(ck["model"][k], base_ck["model"][k]), k
    # the fine-tuning trained adversarially against the teacher (the initial weights): both alignment terms logged
    rec = [__import__("json").loads(l) for l in open(fine / "metrics.jsonl")]
    assert {"train/ssfa", "train/kdfa", "train/adv"} <= set(rec[-1])


def test_checkpoint_init_notes_other_class_names(tmp_path, source_yolo):
    torch.save({"model": source_yolo.state_dict(), "arch": source_yolo.arch_config(),
                "class_names": ["a", "b", "c", "d"]}, tmp_path / "ck.pt")
    model, logs = _yolo(), []
    load_init(model, str(tmp_path / "ck.pt"), logs.append, class_names=["circle", "square", "triangle", "star"])
    assert any("note" in m and "['a', 'b', 'c', 'd']" in m and "'circle'" in m for m in logs), logs
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source_yolo.state_dict().items())
    logs.clear()
    load_init(_yolo(), str(tmp_path / "ck.pt"), logs.append, class_names=["a", "b", "c", "d"])
    assert len(logs) == 1 and "the whole model" in logs[0]


@pytest.mark.parametrize("name", ["retinanet_resnet50_fpn", "fcos_resnet50_fpn"])
def test_one_stage_detectors_take_a_robust_resnet_backbone(tmp_path, resnet18_state, name):
    """RetinaNet and FCOS take the same backbone files as Faster R-CNN (robustness layout here): the ResNet body
    gets torchvision's tensors (layer1 included, though their FPN starts at layer2), the FPN and head stay."""
    path = tmp_path / "robust.pt"
    torch.save(LAYOUTS["robustness"](resnet18_state), path)
    torch.manual_seed(0)
    model = create_model(name, 4, backbone="resnet18", fpn_channels=64, min_size=64, max_size=64)
    before = _snapshot(model)
    report = load_init(model, str(path), lambda m: None)
    body = "detector.backbone.body."
    after = model.state_dict()
    for k, v in resnet18_state.items():
        if not k.startswith("fc.") and "num_batches" not in k:
            assert torch.equal(after[body + k], v), k
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith(body))
    assert report.kind == "backbone"
