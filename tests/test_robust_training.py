"""Training-side attacks of issue 22 on tiny models (64 px): the random start, the budget warm-up, mixed objectives,
Free adversarial training, the alignment terms with each inner attack against a pure-PyTorch reference, exact
mid-epoch resume under each option, the study script's plan and its smoke scale."""
import copy
import json
import signal

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from conftest import make_targets
from fa_train.adversarial.objectives import (TRAIN_OBJECTIVES, AdversarialObjective, StandardObjective, StepInfo,
                                             build_objective, step_generator)
from fa_train.checkpoint import load_checkpoint
from fa_train.cli import main

CPU = torch.device("cpu")


class _NoScaler:
    def scale(self, t):
        return t


def _images(n=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 64, 64, generator=g, dtype=dtype)
    x[:, :, :8] = 0.0  # saturated pixels: the start and every iterate must stay in [0, 1]
    x[:, :, -8:] = 1.0
    return x


# ------------------------------------------------------------------------------------------------- random start


def test_random_start_is_uniform_in_the_ball_and_in_unit_range(tiny_yolo):
    """With a step too small to matter, PGD's result is its start: clean + eps * (2u - 1) clipped to [0, 1], u the
    step's own draw (seeded by run seed, epoch, batch, replay, rank)."""
    model = tiny_yolo.train()
    x, targets = _images(), make_targets(2)
    eps = 0.03
    obj = AdversarialObjective("at", CPU, pgd_steps=1, train_eps=eps, step_size=1e-7, random_start=True, seed=5)
    info = StepInfo(step=0, epoch=1, batch=2, replay=0, rank=0)
    x_adv = obj.attack(model, x, targets, None, None, info)
    u = torch.rand(x.shape, generator=step_generator(5, "start", 1, 2, 0, 0))
    start = (x + eps * (2 * u - 1)).clamp(0, 1)
    torch.testing.assert_close(x_adv, start, atol=2e-7, rtol=0)
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > 0.9 * eps  # it did move: a start across the ball, not the clean image
    # another batch draws another start; the same batch the same one
    other = obj.attack(model, x, targets, None, None, StepInfo(epoch=1, batch=3))
    assert not torch.equal(other, x_adv)
    torch.testing.assert_close(obj.attack(model, x, targets, None, None, info), x_adv, rtol=0, atol=0)


def test_pgd_k_iterates_stay_in_the_ball_and_unit_range(tiny_yolo):
    model = tiny_yolo.train()
    x, targets = _images(), make_targets(2)
    for name in ("at", "tod"):
        obj = AdversarialObjective(name, CPU, pgd_steps=3, train_eps=0.03, step_size=0.02, random_start=True)
        x_adv = obj.attack(model, x, targets, None, None, StepInfo())
        assert (x_adv - x).abs().max() <= 0.03 + 1e-6, name
        assert x_adv.min() >= 0 and x_adv.max() <= 1, name


# ------------------------------------------------------------------------------------------------- warm-up


def test_warmup_budget_per_step():
    obj = AdversarialObjective("at", CPU, train_eps=0.03, step_size=0.01, eps_warmup_steps=4)
    got = [obj.budget_at(s) for s in range(6)]
    want = [(0.03 * f, 0.01 * f) for f in (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)]
    for (e, st), (we, ws) in zip(got, want):
        assert e == pytest.approx(we, abs=1e-15) and st == pytest.approx(ws, abs=1e-15)
    # from the config: epochs x batches per epoch, rounded
    cfg = {"method": {"name": "at", "train_eps": 0.03, "step_size": None, "eps_warmup_epochs": 1.5,
                      "pgd_steps": 3, "random_start": True}, "train": {"seed": 0}}
    built = build_objective(cfg, None, CPU, log=lambda m: None, steps_per_epoch=4)
    assert built.eps_warmup_steps == 6
    assert built.step_size == pytest.approx(2.5 * 0.03 / 3)  # auto step from a random start
    off = AdversarialObjective("at", CPU, train_eps=0.03, step_size=0.01)
    assert off.budget_at(0) == (0.03, 0.01)


def test_warmup_attack_stays_in_the_step_budget(tiny_yolo):
    model = tiny_yolo.train()
    x, targets = _images(), make_targets(2)
    obj = AdversarialObjective("at", CPU, pgd_steps=2, train_eps=0.03, step_size=0.02, random_start=True,
                               eps_warmup_steps=10)
    for step in (0, 4, 9):
        x_adv = obj.attack(model, x, targets, None, None, StepInfo(step=step))
        eps = 0.03 * (step + 1) / 10
        d = (x_adv - x).abs().max()
        assert eps * 0.8 < d <= eps + 1e-6, (step, float(d))


# ------------------------------------------------------------------------------------------------- objectives


def test_mixed_objective_draws_are_reproducible_from_the_seed():
    def draws(seed):
        obj = AdversarialObjective("at", CPU, objective="mix", seed=seed)
        return [obj.objective_of(StepInfo(epoch=e, batch=b, replay=r, rank=k))
                for e in range(3) for b in range(15) for r, k in ((0, 0),)]

    a = draws(3)
    assert a == draws(3)  # the same run seed, the same draws
    assert a != draws(4)  # another seed, another sequence
    assert set(a) == set(TRAIN_OBJECTIVES)  # every objective is drawn
    # independent reference: the draw is randint(4) of a generator seeded by sha256("seed|mix|epoch|batch")
    import hashlib

    h = hashlib.sha256(b"3|mix|1|7").digest()
    g = torch.Generator().manual_seed(int.from_bytes(h[:7], "little"))
    assert a[15 + 7] == TRAIN_OBJECTIVES[int(torch.randint(4, (1,), generator=g))]
    # a replay, a rank or the optimizer step do not change the batch's objective
    obj = AdversarialObjective("at", CPU, objective="mix", seed=3)
    assert {obj.objective_of(StepInfo(step=s, epoch=1, batch=7, replay=r, rank=k))
            for s, r, k in ((0, 0, 0), (9, 1, 0), (3, 0, 2))} == {a[15 + 7]}


def _ref_loss(model, x, targets, keys=None):
    losses, _ = model.forward_train(x, targets)
    return sum(v for k, v in losses.items() if keys is None or k in keys)


def _ref_tog_vanishing(model, x):
    total = 0
    for logits, mask in model.objectness_logits(x).values():
        bce = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
        total = total - (bce.mean(1) if mask is None else (bce * mask).sum(1) / mask.sum(1).clamp(min=1)).sum()
    return total


def _ref_attack(model, x0, targets, eps, step, steps, objective, start=None, first_grad=None):
    """Pure-PyTorch PGD with BatchNorm in eval mode (no running-statistics update), from `start`."""
    x = x0.clone() if start is None else start.clone()
    was = model.training
    model.eval()
    for t in range(steps):
        if t == 0 and first_grad is not None:
            g = first_grad
        else:
            xg = x.detach().requires_grad_(True)
            if objective == "tog-vanishing":
                v = _ref_tog_vanishing(model, xg)
            else:
                v = _ref_loss(model, xg, targets, None if objective == "det" else model.loss_domains[objective])
            (g,) = torch.autograd.grad(v, xg)
        x = torch.min(torch.max(x + step * g.sign(), x0 - eps), x0 + eps).clamp(0, 1).detach()
    model.train(was)
    return x


def _pooled_align(mid_adv, target):
    cos = F.cosine_similarity(mid_adv.mean((2, 3)), target.mean((2, 3)), dim=1, eps=1e-8)
    return (1 - cos).mean()


INNER = {  # name: AdversarialObjective options
    "pgd2-clean-start": dict(pgd_steps=2, train_eps=0.02, step_size=0.01),
    "pgd3-random-start": dict(pgd_steps=3, train_eps=0.03, step_size=0.0125, random_start=True),
    "cls": dict(pgd_steps=2, train_eps=0.03, step_size=0.015, objective="cls"),
    "tog-vanishing": dict(pgd_steps=2, train_eps=0.03, step_size=0.015, random_start=True,
                          objective="tog-vanishing"),
    "free": dict(train_eps=0.03, step_size=0.03, free_replays=4),
}


@pytest.mark.parametrize("inner", sorted(INNER))
def test_alignment_terms_with_each_inner_attack_match_a_pure_pytorch_reference(tiny_yolo, inner):
    """Equation (3) with SSFA and KDFA around each inner attack, in float64: the logged values and every parameter
    gradient equal a reference written from the equation (clean features from the clean pass, adversarial ones at
    the attack's final perturbation)."""
    torch.manual_seed(1)
    model = tiny_yolo.double().train()
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    teacher.eval()
    x0, targets = _images(dtype=torch.float64), make_targets(2)
    opts = INNER[inner]
    alpha, beta, gamma = 0.4, 3.0, 7.0
    ref = copy.deepcopy(model)
    obj = AdversarialObjective("fa", CPU, alpha=alpha, ssfa_weight=beta, kdfa_weight=gamma, teacher=teacher, seed=2,
                               **opts)
    info = StepInfo(step=0, epoch=0, batch=1)
    logs = obj.step(model, x0, targets, _NoScaler(), False, info=info)

    # the reference: clean pass (train mode: batch statistics, running statistics updated), attack, eq. (3)
    xc = x0.clone().requires_grad_(True)
    clean_losses, mid_clean = ref.forward_train(xc, targets)
    clean = sum(clean_losses.values())
    eps, step = opts["train_eps"], opts["step_size"]
    start = None
    if opts.get("random_start"):
        u = torch.rand(x0.shape, generator=step_generator(2, "start", 0, 1, 0, 0)).to(x0)
        start = (x0 + eps * (2 * u - 1)).clamp(0, 1)
    if inner == "free":  # first replay: the perturbation starts at zero
        x_adv = x0.clone().requires_grad_(True)
    else:
        first = None
        if inner == "pgd2-clean-start":  # gradient reuse: the first step's gradient is the clean pass's
            (first,) = torch.autograd.grad(clean, xc, retain_graph=True)
        x_adv = _ref_attack(ref, x0, targets, eps, step, opts["pgd_steps"], opts.get("objective", "det"), start,
                            first)
    adv_losses, mid_adv = ref.forward_train(x_adv, targets)
    adv = sum(adv_losses.values())
    t_mid = teacher.features(x0)
    ssfa = _pooled_align(mid_adv, mid_clean.detach())
    kdfa = _pooled_align(mid_adv, t_mid.detach())
    total = alpha * clean + (1 - alpha) * adv + beta * ssfa + gamma * kdfa
    params = [p for p in ref.parameters()]
    grads = torch.autograd.grad(total, params, allow_unused=True)
    # the fused alignment loss runs in float32 (cuda_kernels.pooled_cosine_loss): float32 tolerances on its share
    assert logs["loss"] == pytest.approx(float(total.detach()), rel=1e-6)
    assert logs["ssfa"] == pytest.approx(float(beta * ssfa.detach()), rel=1e-5, abs=1e-9)
    assert logs["kdfa"] == pytest.approx(float(gamma * kdfa.detach()), rel=1e-5, abs=1e-9)
    assert logs["adv"] == pytest.approx(float(adv.detach()), rel=1e-9)
    for (name, p), g in zip(model.named_parameters(), grads):
        if g is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    if inner == "free":  # the carried perturbation: one sign step of the adversarial total's input gradient
        (gx,) = torch.autograd.grad((1 - alpha) * sum(ref.forward_train(x_adv, targets)[0].values())
                                    + beta * _pooled_align(ref.forward_train(x_adv, targets)[1], mid_clean.detach())
                                    + gamma * _pooled_align(ref.forward_train(x_adv, targets)[1], t_mid), x_adv)
        want = torch.min(torch.max(x0 + step * gx.sign(), x0 - eps), x0 + eps).clamp(0, 1) - x0
        torch.testing.assert_close(obj.delta, want, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------- Free AT


def _strong_recipe_batch(shapes_devkit):
    from fa_train.data import build_dataset, collate

    ds = build_dataset("synth:60", "train", 64, max_images=8, log=None)
    return collate([ds[i] for i in range(len(ds))])[:2]


def _pgd10_ceiling(model, x, targets, eps=0.03):
    """The detection loss at the end of PGD-10 at `eps` from a seeded random start (step eps / 4), and the clean
    loss: the attack is stronger than either training attack (more steps, the evaluation budget)."""
    from fa_train.adversarial.attacks import pgd_attack

    x_adv = pgd_attack(model, x, targets, eps=eps, steps=10, step_size=eps / 4, random_start=True,
                       generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adv, _ = model.forward_train(x_adv, targets)
        clean, _ = model.forward_train(x, targets)
    return float(sum(adv.values())), float(sum(clean.values()))


def test_a_strong_recipe_reaches_a_lower_loss_ceiling_than_pgd1_at_001(shapes_devkit):
    """Issue 22: on a fixed seeded tiny model (8 shapes images, 64 px, 60 standard steps), 30 steps of AT with PGD-3
    at eps 0.03 from a random start leave a lower PGD-10 loss at eps 0.03 than 30 steps of the paper's PGD-1 at 0.01
    from the same weights on the same batches. Measured (avx2 and default kernels): 0.59 and 0.65 against 0.88 and
    2.02; the assertion asks for a 10 % margin."""
    x, targets = _strong_recipe_batch(shapes_devkit)
    torch.manual_seed(0)
    from fa_train.models import create_model

    base = create_model("yolov3", 4, width_mult=0.125, depth_mult=0.2).train()
    opt = torch.optim.AdamW(base.parameters(), lr=5e-3)
    std = StandardObjective(CPU)
    for _ in range(60):
        opt.zero_grad()
        std.step(base, x, targets, _NoScaler(), False)
        opt.step()
    ceilings = {}
    for name, kw in (("pgd1@0.01", dict(pgd_steps=1, train_eps=0.01, step_size=0.01)),
                     ("pgd3@0.03-rs", dict(pgd_steps=3, train_eps=0.03, step_size=None, random_start=True))):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        obj = AdversarialObjective("at", CPU, alpha=0.5, seed=0, **kw)
        for s in range(30):
            opt.zero_grad()
            logs = obj.step(model, x, targets, _NoScaler(), False, StepInfo(step=s, epoch=1, batch=s))
            opt.step()
        assert all(torch.isfinite(torch.tensor(v)) for v in logs.values()), (name, logs)
        ceilings[name] = _pgd10_ceiling(model, x, targets)
    (weak, weak_clean), (strong, strong_clean) = ceilings["pgd1@0.01"], ceilings["pgd3@0.03-rs"]
    assert strong < 0.9 * weak, ceilings
    assert strong_clean < 2 * weak_clean + 0.5, ceilings  # robustness not bought by forgetting the task


def test_free_at_carries_its_perturbation_across_replays_and_batches(tiny_yolo):
    """alpha = 0, no alignment: each replay is one forward/backward at x + delta, and delta takes one projected sign
    step of that pass's input gradient; the next batch starts from the last batch's delta (clipped to [0, 1])."""
    model = tiny_yolo.double().train()
    ref = copy.deepcopy(model)
    eps, step = 0.03, 0.01
    obj = AdversarialObjective("at", CPU, train_eps=eps, step_size=step, alpha=0.0, free_replays=3)
    batches = [(_images(seed=s, dtype=torch.float64), make_targets(2)) for s in (0, 1)]
    delta = torch.zeros_like(batches[0][0])
    norms = []
    for b, (x0, targets) in enumerate(batches):
        for r in range(3):
            model.zero_grad(set_to_none=True)
            obj.step(model, x0, targets, _NoScaler(), False, info=StepInfo(step=3 * b + r, batch=b, replay=r))
            xa = (x0 + delta).clamp(0, 1).requires_grad_(True)
            (g,) = torch.autograd.grad(_ref_loss(ref, xa, targets), xa)
            delta = (torch.min(torch.max(xa + step * g.sign(), x0 - eps), x0 + eps).clamp(0, 1) - x0).detach()
            torch.testing.assert_close(obj.delta, delta, rtol=0, atol=1e-12)
            norms.append(float(delta.abs().max()))
    assert norms[0] == pytest.approx(step) and norms[2] == pytest.approx(eps)  # grows across replays to eps
    assert max(norms) <= eps + 1e-12
    state = obj.state_dict()  # what a checkpoint keeps
    fresh = AdversarialObjective("at", CPU, train_eps=eps, step_size=step, alpha=0.0, free_replays=3)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.delta, obj.delta)


TINY = ["--data", "synth:60", "--img-size", "64", "--batch-size", "2", "--width-mult", "0.125", "--depth-mult", "0.2",
        "--workers", "0", "--max-images", "8", "--max-test-images", "2", "--quiet", "--eval-every", "0",
        "--lr", "0.002", "--warmup-iters", "2", "--method", "at"]


def test_free_at_divides_the_epochs_and_says_so(tmp_path):
    r = CliRunner().invoke(main, TINY + ["--epochs", "4", "--free-replays", "2", "--train-eps", "0.03",
                                         "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "each batch replayed 2 times, so 2 passes over the data, 16 optimizer steps" in r.output
    epochs = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if '"epoch"' in l and "event" not in l]
    assert [e["epoch"] for e in epochs] == [1, 2]
    ck = load_checkpoint(str(tmp_path / "last.pt"))
    assert ck["step"] == 16 and ck["epoch"] == 2  # 2 passes x 4 batches x 2 replays
    assert ck["objective_state"]["free_delta"].shape == (2, 3, 64, 64)
    assert ck["objective_state"]["free_delta"].abs().max() <= 0.03 + 1e-6


@pytest.mark.parametrize("flags", ["at", "ssfa", "tod"])
def test_free_at_refuses_what_it_cannot_do(tmp_path, flags):
    extra = {"at": ["--free-replays", "2", "--train-objective", "mix"], "ssfa": ["--method", "ssfa",
             "--free-replays", "0"], "tod": ["--method", "tod", "--train-objective", "cls"]}[flags]
    r = CliRunner().invoke(main, TINY + ["--epochs", "1", "--out", str(tmp_path / "x")] + extra)
    assert r.exit_code == 2, r.output
    assert r.output.strip().count("\n") == 0 and "fa-train: error:" in r.output
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------- exact resume


RESUME_OPTIONS = {
    "random-start": ["--pgd-steps", "2", "--train-eps", "0.03", "--train-step-size", "0.02", "--random-start"],
    "warmup": ["--train-eps", "0.03", "--eps-warmup-epochs", "1.5"],
    "mix": ["--train-objective", "mix", "--random-start"],
    "max": ["--train-objective", "max"],
    "free": ["--free-replays", "2", "--train-eps", "0.03", "--random-start"],
}


@pytest.mark.parametrize("option", sorted(RESUME_OPTIONS))
def test_mid_epoch_resume_is_exact(tmp_path, option):
    """Stopped (SIGTERM's path) in the middle of the second epoch, then resumed: the same weights as the run that
    was never stopped, bit for bit."""
    from fa_train.cli import train_from_flags
    from fa_train.engine import Trainer, TrainingInterrupted

    args = TINY + ["--epochs", "4" if option == "free" else "2"] + RESUME_OPTIONS[option]
    r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "ref")])
    assert r.exit_code == 0, r.output
    want = load_checkpoint(str(tmp_path / "ref" / "last.pt"))

    stop_at = 6 if option != "free" else 10  # optimizer steps: the middle of the second pass over the data
    real = Trainer._optimizer_step

    def stopping(self, *a, **k):
        out = real(self, *a, **k)
        if self.step >= stop_at and self._signal is None:
            self._signal = signal.SIGTERM
        return out

    import unittest.mock as mock

    with mock.patch.object(Trainer, "_optimizer_step", stopping):
        r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "run")])
    assert isinstance(r.exception, SystemExit) and r.exit_code == 128 + signal.SIGTERM, r.output
    ck = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert ck["epoch"] == 1 and 0 < ck["batch_in_epoch"] < 4, (ck["epoch"], ck["batch_in_epoch"])
    r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "run"), "--resume",
                                         str(tmp_path / "run" / "last.pt")])
    assert r.exit_code == 0, r.output
    got = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert got["step"] == want["step"]
    for k in want["model"]:
        assert torch.equal(got["model"][k], want["model"][k]), k
    if option == "free":
        assert torch.equal(got["objective_state"]["free_delta"], want["objective_state"]["free_delta"])
    del train_from_flags, TrainingInterrupted


# ------------------------------------------------------------------------------------------------- the study


def _study(*args, **kw):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    return subprocess.run([sys.executable, os.path.join(root, "scripts", "robust_study.py"), *args], cwd=root,
                          env=env, capture_output=True, text=True, **kw)


def test_study_dry_run_prints_the_whole_plan(tmp_path):
    r = _study("--base", str(tmp_path / "base.pt"), "--out", str(tmp_path / "s"), "--dry-run", timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    train = [l for l in lines if " train " in l]
    bench = [l for l in lines if " bench " in l]
    sanity = [l for l in lines if " sanity " in l]
    # 4 recipes x {at, fa}, 3 eps each, and the base model itself at each eps (the reference row)
    assert len(train) == 8 and len(bench) == 27 and len(sanity) == 8
    assert sum(f"--weights {tmp_path / 'base.pt'}" in l for l in bench) == 3
    assert all(l.startswith("todo") for l in lines)
    assert any("--method fa" in l and "--free-replays 4" in l and "free_fa" in l for l in train)
    assert any("--pgd-steps 1 --train-eps 0.01 --train-step-size 0.01 --no-random-start" in l for l in train)
    assert any("--train-objective mix" in l and "--random-start" in l for l in train)
    assert {l.split("--eps ")[1].split()[0] for l in bench} == {"0.01", "0.02", "0.03"}
    assert all("--attack suite" in l for l in bench)
    assert all(f"--transfer-from {tmp_path / 'base.pt'}" in l for l in sanity)
    r = _study("--base", "b.pt", "--recipes", "pgd9", "--dry-run", timeout=60)
    assert r.returncode == 2 and "pgd9" in r.stderr


def test_study_quick_end_to_end_and_resumable(tmp_path):
    """One recipe with alignment at the smoke scale: trained, attacked by the suite, reported; a second run finds
    every stage done (the plan of every recipe with and without alignment: the dry-run test above)."""
    (tmp_path / "tiny.yaml").write_text("model: {name: yolov3, width_mult: 0.125, depth_mult: 0.2}\n"
                                        "data: {spec: 'synth:60', img_size: 64, workers: 0}\n"
                                        "train: {optimizer: adamw, momentum: 0.9, batch_size: 4}\n")
    r = CliRunner().invoke(main, ["--config", str(tmp_path / "tiny.yaml"), "--max-images", "8", "--max-test-images",
                                  "2", "--epochs", "1", "--eval-every", "0", "--quiet", "--out", str(tmp_path / "base")])
    assert r.exit_code == 0, r.output
    args = ["--base", str(tmp_path / "base" / "last.pt"), "--out", str(tmp_path / "s"), "--quick", "--config",
            str(tmp_path / "tiny.yaml"), "--recipes", "free", "--methods", "fa"]
    r = _study(*args, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    study = json.loads((tmp_path / "s" / "study.json").read_text())
    assert [row["model"] for row in study["rows"]] == ["base", "free_fa"]
    for row in study["rows"]:
        assert 0 <= row["worst@0.03"] <= 1 and 0 <= row["clean"] <= 1
        assert row["advAP@0.03"] is not None
    assert study["rows"][0]["train_seconds"] is None and study["rows"][1]["train_seconds"] > 0
    assert (tmp_path / "s" / "frontier.png").stat().st_size > 0
    assert "| free_fa |" in (tmp_path / "s" / "study.md").read_text()
    r = _study(*args, timeout=300)
    assert r.returncode == 0 and r.stdout.count("done before") == 3, r.stdout  # base bench, train, bench
    # --also: a run folder trained and attacked elsewhere becomes a row, described from its config.yaml
    run = tmp_path / "s" / "free_fa"
    r = _study(*args, "--also", str(run), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads((tmp_path / "s" / "study.json").read_text())["rows"]
    assert [row["model"] for row in rows] == ["base", "free_fa", "free_fa"]
    assert rows[2]["recipe"].startswith("Free AT m=4 at 0.03") and rows[2]["method"] == "fa"
    assert rows[2]["worst@0.03"] == rows[1]["worst@0.03"] and "from " in rows[2]["recipe"]
    r = _study(*args, "--also", str(tmp_path / "nowhere"), timeout=300)
    assert r.returncode == 2 and "--also" in r.stderr and "nowhere" in r.stderr, r.stderr
