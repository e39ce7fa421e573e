"""Training objectives: gradient reuse, the alignment terms of equation (3), every method on a tiny model."""
import copy

import pytest
import torch
from click.testing import CliRunner

from conftest import make_targets
from fa_train.adversarial.objectives import AdversarialObjective, build_objective
from fa_train.cli import main


class _NoScaler:
    def scale(self, t):
        return t


def test_gradient_reuse_gives_the_clean_loss_parameter_gradients(tiny_yolo):
    torch.manual_seed(0)
    images, targets = torch.rand(2, 3, 64, 64, dtype=torch.float64), make_targets(2)
    model = tiny_yolo.double().train()
    twin = copy.deepcopy(model)
    obj = AdversarialObjective("at", torch.device("cpu"), alpha=0.3)
    _, _, grad, _ = obj.clean_pass(model, images, targets, _NoScaler(), False)
    # independent: the clean loss alone, backward, times alpha; and its input gradient
    x = images.clone().requires_grad_(True)
    losses, _ = twin.forward_train(x, targets)
    total = sum(losses.values())
    total.backward()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p.grad, 0.3 * q.grad, rtol=1e-9, atol=1e-12)
    assert torch.equal(torch.sign(grad), torch.sign(x.grad))


def test_alignment_terms_match_equation_3_in_float64(tiny_yolo):
    """The logged SSFA/KDFA terms equal beta/gamma * (1 - cos) of the pooled M-th layer, computed directly."""
    torch.manual_seed(1)
    model = tiny_yolo.double().train()
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    images, targets = torch.rand(2, 3, 64, 64, dtype=torch.float64), make_targets(2)
    obj = AdversarialObjective("fa", torch.device("cpu"), train_eps=0.02, step_size=0.02, alpha=0.5,
                               ssfa_weight=3.0, kdfa_weight=7.0, teacher=teacher)
    state = copy.deepcopy(model.state_dict())
    logs = obj.step(model, images, targets, _NoScaler(), False)
    # recompute independently from the same starting weights
    ref = copy.deepcopy(model)
    ref.load_state_dict(state)
    ref.train()
    x = images.clone().requires_grad_(True)
    _, mid_clean = ref.forward_train(x, targets)
    mid_clean_fresh = mid_clean.detach()
    g, = torch.autograd.grad(sum(ref.forward_train(x, targets)[0].values()), x)
    x_adv = torch.min(torch.max(images + 0.02 * g.sign(), images - 0.02), images + 0.02).clamp(0, 1)
    ref.eval()  # BN in train mode updated running stats only; outputs use batch stats in train mode
    ref.train()
    _, mid_adv = ref.forward_train(x_adv, targets)
    t_mid = teacher.features(images)
    cos = torch.nn.functional.cosine_similarity
    ssfa = 3.0 * (1 - cos(mid_adv.mean((2, 3)), mid_clean_fresh.mean((2, 3)), dim=1)).mean()
    kdfa = 7.0 * (1 - cos(mid_adv.mean((2, 3)), t_mid.mean((2, 3)), dim=1)).mean()
    assert logs["kdfa"] == pytest.approx(float(kdfa), rel=1e-3)
    assert logs["ssfa"] == pytest.approx(float(ssfa), rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("method", ["at", "tod", "kdfa", "ssfa", "fa"])
def test_every_method_trains_a_few_steps(tmp_path, method):
    out = tmp_path / method
    r = CliRunner().invoke(main, ["--data", "synth:60", "--img-size", "64", "--batch-size", "4", "--width-mult",
                                  "0.125", "--depth-mult", "0.2", "--workers", "0", "--max-images", "8",
                                  "--max-test-images", "4", "--quiet", "--epochs", "1", "--eval-every", "0",
                                  "--method", method, "--pgd-steps", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    import json

    rec = json.loads(open(out / "metrics.jsonl").read().splitlines()[-1])
    assert {"train/adv", "train/clean"} <= set(rec)
    if method in ("ssfa", "fa"):
        assert "train/ssfa" in rec and "train/cos_ssfa" in rec
    if method in ("kdfa", "fa"):
        assert "train/kdfa" in rec and "train/cos_kdfa" in rec


def test_teacher_weights_do_not_change(tiny_yolo):
    cfg = {"method": {"name": "fa", "pgd_steps": 1, "train_eps": 0.01, "step_size": 0.01, "alpha": 0.5,
                      "ssfa_weight": None, "kdfa_weight": None, "teacher": None}}
    model = tiny_yolo.train()
    obj = build_objective(cfg, model, torch.device("cpu"), log=lambda m: None)
    assert obj.ssfa_weight == obj.kdfa_weight == 10.0  # YOLOv3 default
    before = copy.deepcopy(obj.teacher.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        obj.step(model, torch.rand(2, 3, 64, 64), make_targets(2), _NoScaler(), False)
        opt.step()
    for k, v in obj.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(model.state_dict()["backbone.stem.conv.weight"], before["backbone.stem.conv.weight"])
    assert not obj.teacher.training
