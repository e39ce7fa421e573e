"""Every training method and training attack on the new detectors (issue 25): standard, at, tod, kdfa, ssfa and fa,
with issue 22's inner attacks (PGD-k from a random start, the objectives det / cls / loc / tog-vanishing / mix / max,
Free AT, the budget warm-up), through fa-train's engine in-process on tiny RetinaNet, FCOS, SSDlite320 and YOLOv8
(64 px, ResNet-18 / MobileNetV3 x 0.25 / yolov8n, 4 images, one epoch, no workers). The YOLOv8 cases skip with a
reason where the optional extra is absent.

Which run covers which code path (objectives.py; the pairs are chosen so that each path runs on every detector once,
not the full cross product of methods x attacks):
- standard: `StandardObjective`, the model's own loss dict summed.
- at (`--alpha 0 --pgd-steps 2 --random-start --train-objective max`): the adversarial step without a clean pass
  (alpha 0, no SSFA, random start: k + 1 passes), `run_attack` from a random start on every training objective
  (det, cls, loc, tog-vanishing: the detector's loss domains and what stands for its objectness) and
  `choose_larger_loss` on the detector's `loss_terms_per_image`.
- tod: the clean pass's gradient per loss domain (gradient reuse), `tod_attack`'s candidates per domain.
- kdfa (`--train-objective cls --pgd-steps 2`): the teacher (the initial weights, eval mode) at the M-th layer, a
  clean-start attack on one loss domain.
- ssfa (`--alpha 0 --train-objective tog-vanishing --random-start`): the clean pass with alpha 0 (its gradient taken
  without back-propagating into the parameters), SSFA's target from it, the TOG objective in training.
- fa (`--free-replays 2 --epochs 2 --eps-warmup-epochs 1 --random-start --train-eps 0.03`): Free AT (the carried
  perturbation, one forward/backward per replay, epochs divided), both alignment terms, the warm-up's budgets.
- mix, on RetinaNet only: the per-batch draw is the same code for every detector (seeded by run seed, epoch,
  batch), and each objective it draws is the one `max` runs on every detector.
The attack objectives themselves are checked against a pure-PyTorch PGD on each detector's loss dict
(`test_training_objectives_are_the_models_loss_terms`).
"""
import json
import math
import os
import unittest.mock as mock

import pytest
import torch
from click.testing import CliRunner

from conftest import built_once, make_targets

os.environ.setdefault("YOLO_OFFLINE", "1")  # never an online check from the tests
os.environ.setdefault("YOLO_VERBOSE", "False")
from fa_train.adversarial.objectives import TRAIN_OBJECTIVES, AdversarialObjective, StepInfo, step_generator  # noqa
from fa_train.models import create_model  # noqa: E402
from fa_train.models import ultralytics_yolo as U  # noqa: E402  (Ultralytics only through our module)

NO_EXTRA = "the optional extra is not installed: pip install -e '.[ultralytics]'"
HAS_ULTRALYTICS = U.available()

# detector: (model section of the preset, create_model arguments, the loss terms of its loss dict by domain, written
# here from torchvision's and Ultralytics' own loss names)
DETECTORS = {
    "retinanet": ("{name: retinanet_resnet50_fpn, backbone: resnet18, fpn_channels: 32, min_size: 64, max_size: 64}",
                  ("retinanet_resnet50_fpn", dict(backbone="resnet18", fpn_channels=32, min_size=64, max_size=64)),
                  {"cls": {"classification"}, "loc": {"bbox_regression"}}),
    # FCOS's head is GroupNorm(32): 64 FPN channels
    "fcos": ("{name: fcos_resnet50_fpn, backbone: resnet18, fpn_channels: 64, min_size: 64, max_size: 64}",
             ("fcos_resnet50_fpn", dict(backbone="resnet18", fpn_channels=64, min_size=64, max_size=64)),
             {"cls": {"classification"}, "loc": {"bbox_regression", "bbox_ctrness"}}),
    # SSDlite320: a fixed 64 px resize, a quarter-width MobileNetV3
    "ssdlite": ("{name: ssdlite320_mobilenet_v3_large, size: 64, width_mult: 0.25}",
                ("ssdlite320_mobilenet_v3_large", dict(size=64, width_mult=0.25)),
                {"cls": {"classification"}, "loc": {"bbox_regression"}}),
    "yolov8": ("{name: ultralytics, cfg: yolov8n.yaml}", ("ultralytics", dict(cfg="yolov8n.yaml")),
               {"cls": {"cls"}, "loc": {"box", "dfl"}}),
}
DETECTOR_PARAMS = [pytest.param(d, marks=pytest.mark.skipif(d == "yolov8" and not HAS_ULTRALYTICS, reason=NO_EXTRA))
                   for d in DETECTORS]

EPS = 0.03
RUNS = {  # method run: (flags, eps of each optimizer step's inner attack, whether the attack starts at random)
    "standard": (["--method", "standard"], None, False),
    "at": (["--method", "at", "--alpha", "0", "--pgd-steps", "2", "--random-start", "--train-eps", str(EPS),
            "--train-objective", "max"], [EPS] * 2, True),
    "tod": (["--method", "tod"], [0.01] * 2, False),
    "kdfa": (["--method", "kdfa", "--train-objective", "cls", "--pgd-steps", "2", "--train-eps", str(EPS)],
             [EPS] * 2, False),
    "ssfa": (["--method", "ssfa", "--alpha", "0", "--train-objective", "tog-vanishing", "--random-start",
              "--train-eps", str(EPS)], [EPS] * 2, True),
    # 2 batches a pass, 2 replays: 4 optimizer steps; the warm-up's epoch is 2 steps: eps/2 then the full eps
    "fa": (["--method", "fa", "--free-replays", "2", "--epochs", "2", "--eps-warmup-epochs", "1", "--random-start",
            "--train-eps", str(EPS)], [EPS / 2, EPS, EPS, EPS], True),
    "mix": (["--method", "at", "--train-objective", "mix", "--random-start", "--train-eps", str(EPS)], [EPS] * 2, True),
}
METHODS_OF = {d: [m for m in RUNS if m != "mix" or d == "retinanet"] for d in DETECTORS}
BASE = ["--data", "synth:60", "--img-size", "64", "--batch-size", "2", "--workers", "0", "--max-images", "4",
        "--max-test-images", "2", "--epochs", "1", "--eval-every", "0", "--quiet", "--lr", "0.001", "--seed", "3"]


def _train(folder, det, *flags):
    from fa_train.cli import main

    cfg = folder / f"{det}.yaml"
    cfg.write_text(f"model: {DETECTORS[det][0]}\n")
    return CliRunner().invoke(main, ["--config", str(cfg), *BASE, *flags])


def _run_all(folder, det):
    """Every method run of `det`, each with what its inner attack made at each optimizer step: the step's budget,
    the largest |x_adv - x| and the range of x_adv (recorded around `AdversarialObjective._adversarial_part`)."""
    real = AdversarialObjective._adversarial_part
    out = {}
    for method in METHODS_OF[det]:
        steps = []

        def recording(self, model, x_clean, x_adv, *a, **k):
            info = self.info or StepInfo()
            steps.append({"eps": self.budget_at(info.step)[0], "dev": float((x_adv - x_clean).detach().abs().max()),
                          "min": float(x_adv.detach().min()), "max": float(x_adv.detach().max()),
                          "objective": None if self.tod else self.objective_of(info)})
            return real(self, model, x_clean, x_adv, *a, **k)

        run = folder / method
        with mock.patch.object(AdversarialObjective, "_adversarial_part", recording):
            r = _train(folder, det, *RUNS[method][0], "--out", str(run))
        out[method] = {"exit": r.exit_code, "output": r.output, "steps": steps, "dir": str(run)}
    return out


@pytest.fixture(scope="module", params=DETECTOR_PARAMS)
def runs(request, tmp_path_factory):
    det = request.param
    return det, built_once(tmp_path_factory, f"detector-methods-{det}", lambda d: _run_all(d, det))


def _records(run):
    with open(os.path.join(run["dir"], "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"event"' not in line]


def _batch(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 64, 64, generator=g)
    x[:, :, :8] = 0.0  # saturated pixels: every iterate must stay in [0, 1]
    x[:, :, -8:] = 1.0
    return x, make_targets(n)


# ---------------------------------------------------------------------------------------------- each method


def test_every_method_writes_a_checkpoint_whose_loss_is_finite(runs):
    """Each run exits 0 and writes last.pt of its own detector and method; the model rebuilt from it alone has a
    finite loss, every term of the detector's loss dict, on a fresh batch."""
    from fa_train.models import load_model

    det, results = runs
    _, (name, _), domains = DETECTORS[det]
    for method, run in results.items():
        assert run["exit"] == 0, (method, run["output"])
        model, ckpt = load_model(os.path.join(run["dir"], "last.pt"))
        assert model.arch_config()["name"] == ckpt["arch"]["name"] == name, method
        assert ckpt["config"]["method"]["name"] == RUNS[method][0][1], method
        x, t = _batch()
        with torch.no_grad():
            losses, mid = model.train().forward_train(x, t)
        assert set(losses) == set().union(*domains.values()), (method, set(losses))
        assert all(math.isfinite(float(v)) for v in losses.values()), (method, losses)
        assert mid.shape[1] == model.mid_channels and torch.isfinite(mid).all(), method
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()), method


def test_each_methods_own_terms_are_logged_and_finite(runs):
    """The epoch's logged means: the detector's loss terms (standard), the adversarial loss and each of its terms,
    the clean loss where a clean pass ran, and the alignment terms of KDFA / SSFA / FA (weight x (1 - cos) of the
    pooled M-th layer: between 0 and twice the weight, its cosine in [-1, 1])."""
    det, results = runs
    terms = set().union(*DETECTORS[det][2].values())
    for method, run in results.items():
        rec = _records(run)[-1]
        train = {k[len("train/"):]: v for k, v in rec.items() if k.startswith("train/")}
        assert all(math.isfinite(v) for v in train.values()), (method, train)
        if method == "standard":
            assert set(train) == terms | {"loss"}, train
            assert train["loss"] == pytest.approx(sum(train[k] for k in terms), rel=1e-5)
            continue
        want = {"loss", "adv"} | {f"adv_{k}" for k in terms}
        if method not in ("at", "ssfa"):  # alpha 0 in those: no clean loss in the total
            want.add("clean")
        if method in ("kdfa", "fa"):
            want |= {"kdfa", "cos_kdfa"}
        if method in ("ssfa", "fa"):
            want |= {"ssfa", "cos_ssfa"}
        assert want <= set(train), (method, want - set(train))
        assert train["adv"] == pytest.approx(sum(train[f"adv_{k}"] for k in terms), rel=1e-5), method
        for a in ("kdfa", "ssfa"):
            if a in train:
                assert -1 - 1e-6 <= train[f"cos_{a}"] <= 1 + 1e-6 and 0 <= train[a] <= 2 * 1.0 + 1e-6, (method, a)
        assert "kdfa" not in train or method in ("kdfa", "fa"), method
        assert "ssfa" not in train or method in ("ssfa", "fa"), method


def test_inner_attacks_stay_in_the_ball_and_the_unit_box(runs):
    """At every optimizer step of every adversarial method, the images the loss is taken at are within the step's
    budget of the clean images (the warm-up's eps/2 on Free AT's first step) and in [0, 1]; a random start moves
    them across the ball; mix draws only the training objectives."""
    det, results = runs
    for method, run in results.items():
        want = RUNS[method][1]
        if want is None:
            assert run["steps"] == [], method
            continue
        steps = run["steps"]
        assert [s["eps"] for s in steps] == pytest.approx(want), (method, steps)
        for s in steps:
            assert s["dev"] <= s["eps"] + 1e-6, (method, s)
            assert s["min"] >= 0.0 and s["max"] <= 1.0, (method, s)
            if RUNS[method][2]:
                assert s["dev"] > 0.5 * s["eps"], (method, s)
        if method == "mix":
            assert {s["objective"] for s in steps} <= set(TRAIN_OBJECTIVES), steps


def test_free_at_divides_the_epochs(runs):
    """--epochs 2 --free-replays 2 on 4 images of batch 2: one pass over the data, 4 optimizer steps, said in the
    start line; the checkpoint carries the perturbation, inside the budget."""
    from fa_train.checkpoint import load_checkpoint

    det, results = runs
    run = results["fa"]
    assert "each batch replayed 2 times, so 1 passes over the data, 4 optimizer steps" in run["output"], run["output"]
    assert [r["epoch"] for r in _records(run)] == [1]
    ckpt = load_checkpoint(os.path.join(run["dir"], "last.pt"))
    assert ckpt["epoch"] == 1 and ckpt["step"] == 4
    delta = ckpt["objective_state"]["free_delta"]
    assert delta.shape == (2, 3, 64, 64) and 0 < float(delta.abs().max()) <= EPS + 1e-6


# ---------------------------------------------------------------------------------------------- the objectives


def _reference_value(model, det, name, x, targets):
    """What each training objective maximises, written from the model's loss dict (by the loss names of DETECTORS,
    not the model's `loss_domains`) and, for TOG-vanishing, from the exported detection scores: each anchor's best
    class score s (SSDlite: the sum of its softmax class probabilities, 1 - P(background)), mean over anchors of
    log(1 - s) (= minus the BCE of its logit against background)."""
    if name == "tog-vanishing":
        p = model.export_module()(x)[..., 4:]
        s = p.sum(-1) if det == "ssdlite" else p.max(-1).values
        return torch.log1p(-s).mean(1).sum()
    losses, _ = model.forward_train(x, targets)
    keys = set(losses) if name == "det" else DETECTORS[det][2][name]
    return sum(losses[k] for k in keys)


def _reference_pgd(model, det, name, x0, targets, start, eps, step, steps):
    """Pure-PyTorch PGD with the whole model in eval mode (no BatchNorm update)."""
    x, was = start.clone(), model.training
    model.eval()
    for _ in range(steps):
        xg = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(_reference_value(model, det, name, xg, targets), xg)
        x = torch.min(torch.max(x + step * g.sign(), x0 - eps), x0 + eps).clamp(0, 1).detach()
    model.train(was)
    return x


@pytest.mark.parametrize("det", DETECTOR_PARAMS)
def test_training_objectives_are_the_models_loss_terms(det):
    """--train-objective det / cls / loc / tog-vanishing on each detector: the inner attack's images (PGD-2 from a
    random start) equal a pure-PyTorch PGD on the loss terms of that domain in the model's loss dict (TOG: on the
    detection scores); the domains split the loss dict; cls and loc attacks differ."""
    _, (name, arch), domains = DETECTORS[det]
    torch.manual_seed(0)
    model = create_model(name, 4, **arch).train()
    x0, t = _batch()
    with torch.no_grad():
        losses, _ = model.forward_train(x0, t)
    assert set(losses) == domains["cls"] | domains["loc"] and not domains["cls"] & domains["loc"]
    assert {k: set(v) for k, v in model.loss_domains.items()} == domains
    step, seed, info = 0.0125, 4, StepInfo(epoch=0, batch=1)
    u = torch.rand(x0.shape, generator=step_generator(seed, "start", 0, 1, 0, 0))
    start = (x0 + EPS * (2 * u - 1)).clamp(0, 1)
    got = {}
    for objective in TRAIN_OBJECTIVES:
        obj = AdversarialObjective("at", torch.device("cpu"), pgd_steps=2, train_eps=EPS, step_size=step,
                                   random_start=True, objective=objective, seed=seed)
        got[objective] = obj.attack(model, x0, t, None, None, info)
        want = _reference_pgd(model, det, objective, x0, t, start, EPS, step, 2)
        torch.testing.assert_close(got[objective], want, rtol=0, atol=1e-6, msg=objective)
        assert model.training, "the attack left the model in eval mode"
    assert not torch.equal(got["cls"], got["loc"]) and not torch.equal(got["det"], got["tog-vanishing"])


# ---------------------------------------------------------------------------------------------- weights and teachers


@pytest.mark.skipif(not HAS_ULTRALYTICS, reason=NO_EXTRA)
def test_init_of_an_ultralytics_backbone_and_what_is_refused(tmp_path):
    """--init of a YOLOv8 backbone state dict in Ultralytics' own layout (its DetectionModel's keys model.0 ...
    model.9, e.g. an adversarially pre-trained backbone): layers 0-9 start from exactly those weights, the neck and
    the head from their own initialisation; Ultralytics' whole-network state dict of another class count loads
    all but the class branch; a ResNet backbone (Faster R-CNN's layout) is refused in one line, exit 2, before
    anything is written."""
    from fa_train.initial_weights import load_init

    tasks = U._import_ultralytics()
    torch.manual_seed(1)
    source = tasks.DetectionModel(U.load_yaml("yolov8n.yaml"), ch=3, nc=80, verbose=False).state_dict()
    backbone = {k: v for k, v in source.items() if int(k.split(".")[1]) <= 9}
    assert any(k.startswith("model.9.") for k in backbone) and len(backbone) < len(source)
    torch.save(backbone, tmp_path / "backbone.pt")
    torch.save(source, tmp_path / "whole.pt")
    torch.manual_seed(0)
    model = create_model("ultralytics", 4, cfg="yolov8n.yaml")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_init(model, str(tmp_path / "backbone.pt"), log=lambda m: None)
    assert report.kind == "backbone" and report.tensors == len([k for k in backbone if "num_batches" not in k])
    after = model.state_dict()
    for k, v in backbone.items():
        assert torch.equal(after["net." + k], v), k
    neck = [k for k in after if int(k.split(".")[2]) > 9 and after[k].is_floating_point()]
    assert neck and all(torch.equal(after[k], before[k]) for k in neck)
    report = load_init(model, str(tmp_path / "whole.pt"), log=lambda m: None)
    assert report.kind == "detector" and "left at their initialisation" in report.message
    after = model.state_dict()
    for k, v in source.items():
        own = after["net." + k]
        if ".cv3." in k and own.shape != v.shape:  # the class branch: 80 classes there, 4 here
            continue
        assert torch.equal(own, v), k

    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pt")
    r = _train(tmp_path, "yolov8", "--init", str(tmp_path / "resnet18.pt"), "--out", str(tmp_path / "refused"))
    assert r.exit_code == 2, r.output
    line = r.output.strip().splitlines()[-1]  # (before it: the shapes dataset's generation, the first time)
    assert "Traceback" not in r.output and line.startswith("fa-train: error: --init")
    assert "cannot initialise ultralytics" in line
    assert "an Ultralytics backbone state dict" in line and not (tmp_path / "refused").exists()


def _checkpoint_of(model, path):
    from fa_train.checkpoint import atomic_save

    atomic_save({"model": model.state_dict(), "arch": model.arch_config(),
                 "class_names": [str(i) for i in range(model.num_classes)]}, str(path))
    return str(path)


def test_a_kdfa_teacher_of_another_network_with_the_same_channels_is_refused(tmp_path):
    """A ResNet-34 RetinaNet's layer4 has the 512 channels of a ResNet-18's: as a --teacher of a ResNet-18 run it
    is refused in one line naming the backbones (exit 2); a teacher of the same network trained for other classes
    teaches (its M-th layer is the same layer)."""
    from fa_train.adversarial.objectives import teacher_differences

    _, (name, arch), _ = DETECTORS["retinanet"]
    other = _checkpoint_of(create_model(name, 4, **dict(arch, backbone="resnet34")), tmp_path / "r34.pt")
    r = _train(tmp_path, "retinanet", "--method", "kdfa", "--teacher", other, "--out", str(tmp_path / "refused"))
    assert r.exit_code == 2, r.output
    line = r.output.strip().splitlines()[-1]
    assert "Traceback" not in r.output and line.startswith("fa-train: error:"), r.output
    assert f"--teacher {other}: another retinanet_resnet50_fpn network" in line, line
    assert "backbone: 'resnet18' here, 'resnet34' in the teacher" in line and not (tmp_path / "refused").exists()
    same = _checkpoint_of(create_model(name, 7, **arch), tmp_path / "r18-7.pt")
    r = _train(tmp_path, "retinanet", "--method", "kdfa", "--teacher", same, "--max-images", "2",
               "--out", str(tmp_path / "ok"))
    assert r.exit_code == 0, r.output
    assert teacher_differences(create_model(name, 4, **arch).arch_config(),
                               create_model(name, 7, **dict(arch, fpn_channels=64)).arch_config()) == []
    if HAS_ULTRALYTICS:  # YOLOv8n's SPPF and YOLO11n's C2PSA: both 256 channels at stride 32
        v8, v11 = (create_model("ultralytics", 4, cfg=c) for c in ("yolov8n.yaml", "yolo11n.yaml"))
        assert v8.mid_channels == v11.mid_channels
        differ = teacher_differences(v8.arch_config(), v11.arch_config())
        assert differ and differ[0].startswith("YAML backbone:"), differ
        nine = create_model("ultralytics", 9, cfg="yolov8n.yaml")
        assert teacher_differences(v8.arch_config(), nine.arch_config()) == []
