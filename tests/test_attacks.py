"""PGD: stays in the eps-ball and [0,1], raises the loss, eps 0 is the identity, BN statistics and parameter
gradients untouched."""
import pytest
import torch

from conftest import make_targets
from fa_train.adversarial.attacks import detection_loss, frozen_batchnorm, pgd_attack


@pytest.fixture
def setup(tiny_yolo):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64)
    images[0, :, :8, :8] = 0.0  # pixels on the [0,1] bounds
    images[1, :, :8, :8] = 1.0
    return tiny_yolo.train(), images, make_targets(2)


def test_pgd_stays_in_eps_ball_and_unit_box(setup):
    model, images, targets = setup
    for steps, rs in [(1, False), (3, True), (5, False)]:
        adv = pgd_attack(model, images, targets, eps=0.03, steps=steps, random_start=rs)
        assert (adv - images).abs().max() <= 0.03 + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
        assert not torch.equal(adv, images)


def test_pgd_increases_the_loss(setup):
    model, images, targets = setup
    with torch.no_grad(), frozen_batchnorm(model):
        clean = float(detection_loss(model, images, targets))
        adv = float(detection_loss(model, pgd_attack(model, images, targets, eps=0.03, steps=3), targets))
    assert adv > clean


def test_pgd_eps_zero_is_identity(setup):
    model, images, targets = setup
    assert torch.equal(pgd_attack(model, images, targets, eps=0.0, steps=3, step_size=0.01), images)


def test_pgd_leaves_bn_stats_params_and_modes_alone(setup):
    model, images, targets = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pgd_attack(model, images, targets, eps=0.03, steps=2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert model.training and all(m.training for m in model.modules())
