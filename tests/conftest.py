import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
torch.set_num_threads(2)


def shared_path(*parts):
    p = os.path.join(SHARED, *parts)
    if not os.path.exists(p):
        pytest.skip(f"{p} is absent: ../shared (reference files beside the repository) is not available")
    return p


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # every test session shares one generated shapes dataset, outside the user's cache
    monkeypatch.setenv("FA_CACHE", str(tmp_path_factory.getbasetemp() / "fa-cache"))


@pytest.fixture(scope="session")
def shapes_devkit(tmp_path_factory):
    from fa_train.data.synthetic import ensure_shapes

    return ensure_shapes(60, seed=0, root=str(tmp_path_factory.getbasetemp() / "fa-cache"), log=None)


@pytest.fixture
def tiny_yolo():
    from fa_train.models import create_model

    torch.manual_seed(0)
    return create_model("yolov3", 4, width_mult=0.125, depth_mult=0.2)


FRCNN_TINY_YAML = ("model: {name: fasterrcnn_resnet50_fpn, backbone: resnet18, fpn_channels: 32, min_size: 64, "
                   "max_size: 64}\n")


def train_tiny_frcnn(folder, *extra):
    """fa-train of a tiny Faster R-CNN (ResNet-18, 64 px, 4 images, 1 epoch) into folder/run; the CliRunner result."""
    from click.testing import CliRunner

    from fa_train.cli import main

    cfg = folder / "frcnn.yaml"
    cfg.write_text(FRCNN_TINY_YAML)
    return CliRunner().invoke(main, ["--config", str(cfg), "--data", "synth:60", "--img-size", "64", "--batch-size",
                                     "2", "--workers", "0", "--max-images", "4", "--max-test-images", "2", "--epochs",
                                     "1", "--eval-every", "0", "--quiet", "--lr", "0.001", "--out", str(folder / "run"),
                                     *extra])


def make_targets(n, size=64):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        xy = torch.rand(2, 2, generator=g) * size * 0.5
        wh = torch.rand(2, 2, generator=g) * size * 0.4 + 6
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.tensor([0, 2]),
                    "ignore": torch.tensor([False, False])})
    return out
