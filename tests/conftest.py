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


@pytest.fixture(scope="session")
def overfit(tmp_path_factory):
    """A tiny YOLOv3 that has memorised two training images: a source with a high AP for the gate to guard."""
    import json

    from click.testing import CliRunner

    from fa_train.cli import main as train_main

    d = tmp_path_factory.mktemp("overfit")
    (d / "c.yaml").write_text("train: {optimizer: adamw, momentum: 0.9, schedule: cosine}\n")
    r = CliRunner().invoke(train_main, ["--config", str(d / "c.yaml"), "--data", "synth:60", "--img-size", "64",
                                        "--batch-size", "2", "--width-mult", "0.125", "--depth-mult", "0.2",
                                        "--workers", "0", "--max-images", "2", "--max-test-images", "2",
                                        "--test-split", "shapes:train", "--epochs", "150", "--eval-every", "0",
                                        "--lr", "0.01", "--warmup-iters", "5", "--quiet", "--out", str(d / "run")])
    assert r.exit_code == 0, r.output
    ev = json.loads((d / "run" / "eval.json").read_text())
    assert ev["clean"]["AP50"] > 0.5, ev["clean"]["AP50"]
    return d / "run" / "last.pt"


@pytest.fixture(scope="session")
def exported(overfit, tmp_path_factory):
    """The overfit model exported to ONNX fp32, fp16 and int8 with a dynamic batch 1:2:4."""
    from click.testing import CliRunner

    from fa_deploy.export_cli import export_main

    out = tmp_path_factory.mktemp("export")
    r = CliRunner().invoke(export_main, [str(overfit), "--onnx", "fp32", "--onnx", "fp16", "--onnx", "int8",
                                         "--out", str(out), "--dynamic-batch", "1:2:4", "--calib-images", "8"])
    assert r.exit_code == 0, r.output
    assert "parity against" in r.output
    assert not [f for f in os.listdir(out) if f.startswith(".fa-export-")]  # the staging folder is gone
    return {p: out / f"last.{p}.onnx" for p in ("fp32", "fp16", "int8")}


def broken_copy(src, dst):
    """A copy of an ONNX file (and its sidecar) with its convolution weights perturbed: a deployment gone wrong."""
    import shutil

    import numpy as np
    import onnx

    m = onnx.load(str(src))
    rng = np.random.default_rng(0)
    for init in m.graph.initializer:
        w = onnx.numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.ndim == 4:
            init.CopyFrom(onnx.numpy_helper.from_array((w + rng.normal(0, 0.5 * w.std() + 1e-3, w.shape))
                                                       .astype(np.float32), init.name))
    onnx.save(m, str(dst))
    shutil.copy(str(src) + ".json", str(dst) + ".json")
