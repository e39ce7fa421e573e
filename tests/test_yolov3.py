"""YOLOv3: the architecture against Darknet's cfg files, Darknet weights I/O, the Detector contract."""

import numpy as np
import pytest
import torch
import torchvision

from conftest import make_targets, shared_path
from fa_train.models import create_model
from fa_train.models.darknet import DarknetWeightsError, load_darknet_weights, save_darknet_weights


def parse_cfg_convs(path):
    """Independent reading of a Darknet cfg: the (in, out, k, stride, has_bn) of every convolution in order,
    following route/shortcut/upsample channel bookkeeping exactly as Darknet does."""
    sections = []
    for line in open(path):
        line = line.split("#")[0].strip()
        if not line:
            continue
        if line.startswith("["):
            sections.append({"type": line[1:-1].strip()})
        else:
            k, v = line.split("=", 1)
            sections[-1][k.strip()] = v.strip()
    channels, convs, out_ch = 3, [], []
    for layer in sections[1:]:
        t = layer["type"]
        if t == "convolutional":
            f, k, s = int(layer["filters"]), int(layer["size"]), int(layer["stride"])
            convs.append((channels, f, k, s, layer.get("batch_normalize", "0") == "1"))
            channels = f
        elif t == "route":
            idx = [int(v) for v in layer["layers"].split(",")]
            channels = sum(out_ch[i if i >= 0 else len(out_ch) + i] for i in idx)
        elif t in ("shortcut", "upsample", "yolo"):
            pass
        out_ch.append(channels)
    return convs


def model_convs(model):
    return [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], bn is not None)
            for c, bn in model.darknet_convs()]


@pytest.mark.parametrize("cfg,classes", [("yolov3.cfg", 80), ("yolov3-voc.cfg", 20)])
def test_architecture_matches_darknet_cfg(cfg, classes):
    expected = parse_cfg_convs(shared_path("reference", cfg))
    model = create_model("yolov3", classes)
    got = model_convs(model)
    assert len(got) == len(expected) == 75
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"convolution {i}: model {g} != cfg {e}"
    # every convolution of the model is in the Darknet order exactly once
    assert len(got) == sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_full_size_forward_shapes():
    model = create_model("yolov3", 20).eval()
    with torch.no_grad():
        raw = model.export_module()(torch.rand(1, 3, 416, 416))
        mid = model.features(torch.rand(1, 3, 416, 416))
    assert raw.shape == (1, 3 * (13 * 13 + 26 * 26 + 52 * 52), 25)
    assert mid.shape == (1, 1024, 13, 13)


def test_darknet_weights_round_trip(tmp_path, tiny_yolo):
    path = tmp_path / "m.weights"
    for p in tiny_yolo.parameters():
        p.data.normal_()
    for b in tiny_yolo.buffers():
        if b.dtype.is_floating_point:
            b.data.uniform_(0.5, 1.5)
    save_darknet_weights(tiny_yolo, str(path))
    other = create_model("yolov3", 4, width_mult=0.125, depth_mult=0.2)
    n = load_darknet_weights(other, str(path))
    assert n == len(tiny_yolo.darknet_convs())
    for (k, a), (_, b) in zip(tiny_yolo.state_dict().items(), other.state_dict().items()):
        if a.dtype.is_floating_point:
            assert torch.equal(a, b), k
    # the file holds exactly header + every tensor, read independently
    raw = np.fromfile(path, dtype=np.float32)
    total = sum(t.numel() for c, bn in tiny_yolo.darknet_convs()
                for t in ([bn.bias, bn.weight, bn.running_mean, bn.running_var, c.weight] if bn is not None
                          else [c.bias, c.weight]))
    assert len(raw) == total + 5  # 3 int32 + 1 int64 header = 5 float32-sized words


def test_darknet_backbone_cut(tmp_path, tiny_yolo):
    path = tmp_path / "darknet53.conv.74"
    save_darknet_weights(tiny_yolo, str(path), backbone_only=True)
    other = create_model("yolov3", 4, width_mult=0.125, depth_mult=0.2)
    assert load_darknet_weights(other, str(path)) == tiny_yolo.num_backbone_convs
    for (k, a), (_, b) in zip(tiny_yolo.backbone.state_dict().items(), other.backbone.state_dict().items()):
        assert torch.equal(a, b), k


def test_full_darknet53_backbone_is_52_convs():
    assert create_model("yolov3", 80).num_backbone_convs == 52


def test_darknet_weights_must_be_consumed_exactly(tmp_path, tiny_yolo):
    path = tmp_path / "m.weights"
    save_darknet_weights(tiny_yolo, str(path))
    with open(path, "ab") as f:
        f.write(np.zeros(3, np.float32).tobytes())
    with pytest.raises(DarknetWeightsError, match="needs"):
        load_darknet_weights(create_model("yolov3", 4, width_mult=0.125, depth_mult=0.2), str(path))
    # a file for another class count is refused too
    save_darknet_weights(tiny_yolo, str(path))
    with pytest.raises(DarknetWeightsError, match="another architecture"):
        load_darknet_weights(create_model("yolov3", 5, width_mult=0.125, depth_mult=0.2), str(path))


def test_forward_train_contract(tiny_yolo):
    images = torch.rand(2, 3, 64, 64)
    losses, mid = tiny_yolo.forward_train(images, make_targets(2))
    assert set(losses) == {"box", "obj", "cls"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    assert mid.shape == (2, tiny_yolo.mid_channels, 2, 2)
    # mid is the same tensor `features` computes (the M-th layer)
    tiny_yolo.eval()
    torch.testing.assert_close(tiny_yolo.features(images), tiny_yolo.forward_train(images, make_targets(2))[1])
    assert set(sum(tiny_yolo.loss_domains.values(), ())) == set(losses)


def test_loss_with_no_objects_and_ignore(tiny_yolo):
    images = torch.rand(2, 3, 64, 64)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
              "ignore": torch.zeros(0, dtype=torch.bool)}] * 2
    losses, _ = tiny_yolo.forward_train(images, empty)
    assert losses["box"] == 0 and losses["cls"] == 0 and losses["obj"] > 0
    t = make_targets(2)
    ign = [dict(x, ignore=torch.tensor([True, True])) for x in t]
    l_ign, _ = tiny_yolo.forward_train(images, ign)
    # ignored objects do not train box or class, and their cells are excluded from the background term
    assert l_ign["box"] == 0 and l_ign["cls"] == 0
    assert not torch.isclose(l_ign["obj"], losses["obj"])


def test_predict_uses_torchvision_nms(tiny_yolo):
    tiny_yolo.eval()
    images = torch.rand(2, 3, 64, 64)
    dets = tiny_yolo.predict(images, conf_thres=0.0, iou_thres=0.5)
    raw = tiny_yolo.export_module()(images)
    # independent check on image 0: greedy per-class NMS on the same candidates
    p = raw[0]
    scores = p[:, 4:5] * p[:, 5:]
    idx, cls = (scores > 0.0).nonzero(as_tuple=True)
    sc = scores[idx, cls]
    sc, order = sc.topk(min(3000, sc.numel()))
    boxes = torchvision.ops.box_convert(p[idx[order], :4], "cxcywh", "xyxy")
    cls = cls[order]
    kept = []
    for c in cls.unique():
        m = cls == c
        kept.append(torchvision.ops.nms(boxes[m], sc[m], 0.5).numel())
    assert len(dets[0]["boxes"]) == min(300, sum(kept))
    assert (dets[0]["scores"][:-1] >= dets[0]["scores"][1:]).all()


def test_training_steps_lower_the_loss(tiny_yolo):
    torch.manual_seed(0)
    images = torch.rand(4, 3, 64, 64)
    targets = make_targets(4)
    opt = torch.optim.SGD(tiny_yolo.parameters(), lr=0.002, momentum=0.9)
    first = None
    for _ in range(15):
        losses, _ = tiny_yolo.forward_train(images, targets)
        total = sum(losses.values())
        first = float(total) if first is None else first
        opt.zero_grad()
        total.backward()
        opt.step()
    assert float(sum(tiny_yolo.forward_train(images, targets)[0].values())) < 0.7 * first


def test_unknown_model_and_bad_input():
    with pytest.raises(ValueError, match="available: .*yolov3"):
        create_model("yolov9", 3)
    m = create_model("yolov3", 3, width_mult=0.125, depth_mult=0.2)
    with pytest.raises(ValueError, match="multiple of 32"):
        m.features(torch.rand(1, 3, 50, 64))
