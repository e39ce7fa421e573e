"""Faster R-CNN FPN behind the Detector contract, against torchvision's own model."""
import pytest
import torch
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from conftest import make_targets, train_tiny_frcnn
from fa_train.adversarial.attacks import pgd_attack
from fa_train.models import create_model
from fa_train.models.faster_rcnn import IMAGENET_MEAN, IMAGENET_STD, WeightsFileError

TINY = dict(backbone="resnet18", fpn_channels=32, min_size=64, max_size=64)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return create_model("fasterrcnn_resnet50_fpn", 4, **TINY)


def test_wrapper_keeps_torchvision_parameters_and_module_tree():
    ours = create_model("fasterrcnn_resnet50_fpn", 20).detector
    ref = FasterRCNN(resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3), num_classes=21,
                     image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert [(n, type(m).__name__) for n, m in ours.named_modules()] == \
        [(n, type(m).__name__) for n, m in ref.named_modules()]
    assert [(n, p.requires_grad) for n, p in ours.named_parameters()] == \
        [(n, p.requires_grad) for n, p in ref.named_parameters()]
    # torchvision's weights load unchanged
    ours.load_state_dict(ref.state_dict())


def test_losses_in_train_and_eval_mode(tiny):
    x, t = torch.rand(2, 3, 64, 64), make_targets(2)
    for mode in (True, False):
        tiny.train(mode)
        losses, mid = tiny.forward_train(x, t)
        assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
        assert all(torch.isfinite(v) for v in losses.values())
        assert mid.shape == (2, tiny.mid_channels, 2, 2) and tiny.mid_channels == 512
        assert tiny.training == mode and tiny.detector.rpn.training == mode  # modes restored
    assert set(sum(tiny.loss_domains.values(), ())) == set(losses)


def test_layer4_tap_matches_a_hook_on_torchvisions_forward(tiny):
    tiny.eval()
    x = torch.rand(2, 3, 64, 64)
    seen = []
    h = tiny.detector.backbone.body.layer4.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        tiny.detector(list(x))
        feats = tiny.features(x)
        _, mid = tiny.forward_train(x, make_targets(2))
    h.remove()
    torch.testing.assert_close(feats, seen[0])
    torch.testing.assert_close(mid, seen[0])


def test_predictions_equal_torchvision_eval_output(tiny):
    tiny.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = tiny.detector(list(x))
    ours = tiny.predict(x)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o["boxes"], r["boxes"])
        torch.testing.assert_close(o["scores"], r["scores"])
        assert torch.equal(o["labels"], r["labels"] - 1)


def test_pgd_stays_in_eps_ball_and_frozen_bn(tiny):
    tiny.eval()
    x = torch.rand(2, 3, 64, 64)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    adv = pgd_attack(tiny, x, make_targets(2), eps=0.03, steps=2)
    assert (adv - x).abs().max() <= 0.03 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert not torch.equal(adv, x)
    assert all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())


def test_fa_training_steps_through_the_cli(tmp_path):
    r = train_tiny_frcnn(tmp_path, "--method", "fa")
    assert r.exit_code == 0, r.output
    assert "KDFA teacher" in r.output
    import json

    rec = json.loads(open(tmp_path / "run" / "metrics.jsonl").read().splitlines()[-1])
    assert {"train/ssfa", "train/kdfa", "train/adv_loss_classifier"} <= set(rec)
    from fa_train.models import load_model

    model, _ = load_model(str(tmp_path / "run" / "last.pt"))
    assert model.arch_config()["backbone"] == "resnet18"


def test_local_weights_only(tmp_path, tiny):
    with pytest.raises(WeightsFileError, match="nope.pth: ImageNet resnet18 weights not found"):
        create_model("fasterrcnn_resnet50_fpn", 4, weights_backbone=str(tmp_path / "nope.pth"), **TINY)
    # a detector checkpoint with another class count: only the box predictor is re-initialised
    src = create_model("fasterrcnn_resnet50_fpn", 9, **TINY)
    torch.save(src.detector.state_dict(), tmp_path / "det.pth")
    dst = create_model("fasterrcnn_resnet50_fpn", 4, weights=str(tmp_path / "det.pth"), **TINY)
    s, d = src.detector.state_dict(), dst.detector.state_dict()
    for k in d:
        if k.startswith("roi_heads.box_predictor."):
            assert d[k].shape != s[k].shape
        else:
            assert torch.equal(d[k], s[k]), k
    rn = torchvision.models.resnet18(weights=None)
    torch.save(rn.state_dict(), tmp_path / "r18.pth")
    m = create_model("fasterrcnn_resnet50_fpn", 4, weights_backbone=str(tmp_path / "r18.pth"), **TINY)
    assert torch.equal(m.detector.backbone.body.conv1.weight, rn.conv1.weight)
