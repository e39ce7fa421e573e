import json
import os
import shutil

import pytest
import torch
from filelock import FileLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
# under pytest-xdist (`make test` runs two workers) each worker computes with one thread: two workers x two threads
# on two cores would only fight
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
torch.set_num_threads(1 if XDIST_WORKER else 2)


def built_once(tmp_path_factory, name, build):
    """What `build(folder)` returns (JSON: paths as strings), built once per test run in a folder of its own: the
    first pytest-xdist worker to ask builds it under a file lock, the others wait for it and reuse it (a trained
    fixture costs its training once, not once per worker). A build that fails is retried by the next to ask."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if XDIST_WORKER else base) / "built-once"
    root.mkdir(exist_ok=True)
    done = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            d = root / name
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            result = build(d)
            tmp = root / f"{name}.json.tmp"
            tmp.write_text(json.dumps(result))
            os.replace(tmp, done)
    return json.loads(done.read_text())


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


@pytest.fixture(scope="session")
def frcnn_exported(tmp_path_factory):
    """A tiny Faster R-CNN (train_tiny_frcnn) exported to ONNX fp32, fp16 and int8 pipelines (int8 calibrated on PGD
    images too): (weights, export folder, fa-export's output). Shared by the deployment and twin tests: read it,
    never write into its folder."""
    from click.testing import CliRunner

    from fa_deploy.export_cli import export_main

    def build(d):
        r = train_tiny_frcnn(d)
        assert r.exit_code == 0, r.output
        w = d / "run" / "last.pt"
        r = CliRunner().invoke(export_main, [str(w), "--onnx", "fp32", "--onnx", "fp16", "--onnx", "int8",
                                             "--calib-images", "8", "--calib-pgd", "--verify-images", "4"])
        assert r.exit_code == 0, r.output
        return [str(w), str(d / "run" / "export"), r.output]

    from pathlib import Path

    w, out, output = built_once(tmp_path_factory, "frcnn-exported", build)
    return Path(w), Path(out), output


def checkpoint_images(weights, n, split):
    """n images of a split of the checkpoint's data [n,3,64,64] (no augmentation) and their ground truth."""
    from fa_deploy.runtime.datasets import dataset_for
    from fa_train.models import load_model

    _, ckpt = load_model(str(weights))
    ds = dataset_for(ckpt, "test", None, 64, split=split, max_images=n, log=None)
    items = [ds[i] for i in range(n)]
    return torch.stack([it[0] for it in items]), [it[1] for it in items]


def make_targets(n, size=64):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        xy = torch.rand(2, 2, generator=g) * size * 0.5
        wh = torch.rand(2, 2, generator=g) * size * 0.4 + 6
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.tensor([0, 2]),
                    "ignore": torch.tensor([False, False])})
    return out


OVERFIT_ARGS = ["--data", "synth:60", "--img-size", "64", "--batch-size", "2", "--width-mult", "0.125", "--depth-mult",
                "0.2", "--workers", "0", "--max-images", "2", "--max-test-images", "2", "--test-split", "shapes:train",
                "--eval-every", "0", "--lr", "0.01", "--warmup-iters", "5", "--quiet"]
OVERFIT_SCORE = 0.2  # every object of its two images is detected at least this confidently (tests rely on it)


def confident_on_every_object(weights, score=OVERFIT_SCORE):
    """(True, '') when the model detects every ground-truth object of its two training images (IoU >= 0.5, right
    class) with a score >= `score`; else (False, what is missing)."""
    import torchvision

    from fa_deploy.runtime.datasets import dataset_for
    from fa_train.models import load_model

    model, ckpt = load_model(str(weights))
    model.eval()
    ds = dataset_for(ckpt, "test", None, 64, split="shapes:train", max_images=2, log=None)
    items = [ds[i] for i in range(len(ds))]
    with torch.no_grad():
        dets = model.predict(torch.stack([it[0] for it in items]))
    missing = []
    for k, ((_, t, *_), d) in enumerate(zip(items, dets)):
        for box, label in zip(t["boxes"], t["labels"]):
            ok = (d["labels"] == label) & (d["scores"] >= score)
            if not ok.any() or float(torchvision.ops.box_iou(box[None], d["boxes"][ok]).max()) < 0.5:
                missing.append(f"image {k} class {int(label)}")
    return not missing, ", ".join(missing)


@pytest.fixture(scope="session")
def overfit(tmp_path_factory):
    """A tiny YOLOv3 that has memorised two training images: a source with a high AP for the gate to guard. Its
    properties hold by construction, whatever the CPU's floating-point paths: it trains until it detects every
    object of its two images with a score >= OVERFIT_SCORE and an AP50 above 0.8 (150 epochs, then up to three more
    rounds of 100 at a lower rate from where it stopped), and the fixture fails, saying so, if it never gets there.
    Tests that need detections use OVERFIT_SCORE and `overfit_images`, never a score this CPU happens to give."""
    from click.testing import CliRunner

    from fa_train.cli import main as train_main

    def build(d):
        (d / "c.yaml").write_text("train: {optimizer: adamw, momentum: 0.9, schedule: cosine}\n")
        more, why = [], ""
        for round_, epochs in enumerate((150, 100, 100, 100)):
            out = d / f"run{round_}"
            r = CliRunner().invoke(train_main, ["--config", str(d / "c.yaml"), *OVERFIT_ARGS, "--epochs", str(epochs),
                                                *more, "--out", str(out)])
            assert r.exit_code == 0, r.output
            ev = json.loads((out / "eval.json").read_text())
            ok, why = confident_on_every_object(out / "last.pt")
            if ok and ev["clean"]["AP50"] > 0.8:
                return str(out / "last.pt")
            more = ["--init", str(out / "last.pt"), "--lr", "0.005"]
        raise AssertionError(f"the overfit fixture did not memorise its two images (AP50 {ev['clean']['AP50']}; "
                             f"missing: {why})")

    from pathlib import Path

    return Path(built_once(tmp_path_factory, "overfit", build))


@pytest.fixture(scope="session")
def overfit_images(overfit):
    """The image files of the overfit model's two training images (where it detects every object)."""
    from fa_deploy.runtime.datasets import dataset_for
    from fa_train.models import load_model

    _, ckpt = load_model(str(overfit))
    return [r.file for r in dataset_for(ckpt, "test", None, 64, split="shapes:train", max_images=2, log=None).records]


@pytest.fixture(scope="session")
def exported(overfit, tmp_path_factory):
    """The overfit model exported to ONNX fp32, fp16 and int8 with a dynamic batch 1:2:4."""
    from click.testing import CliRunner

    from fa_deploy.export_cli import export_main

    def build(out):
        r = CliRunner().invoke(export_main, [str(overfit), "--onnx", "fp32", "--onnx", "fp16", "--onnx", "int8",
                                             "--out", str(out), "--dynamic-batch", "1:2:4", "--calib-images", "8"])
        assert r.exit_code == 0, r.output
        assert "parity against" in r.output
        assert not [f for f in os.listdir(out) if f.startswith(".fa-export-")]  # the staging folder is gone
        return {p: str(out / f"last.{p}.onnx") for p in ("fp32", "fp16", "int8")}

    from pathlib import Path

    return {p: Path(f) for p, f in built_once(tmp_path_factory, "exported", build).items()}


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


def predict_and_sanity(weights, shapes_devkit, tmp_path):
    """A new detector through fa-predict and fa-bench --sanity (issue 25's capability table): fa-predict with the
    checkpoint and with its fp32 ONNX export (and --attack pgd from the checkpoint) gives the same detections;
    --sanity writes every check's row with a verdict."""
    import json
    import os

    from click.testing import CliRunner

    from fa_deploy.cli import main as bench_main
    from fa_deploy.export_cli import export_main
    from fa_deploy.predict_cli import predict_main

    d = os.path.join(shapes_devkit, "VOCshapes", "JPEGImages")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for f in sorted(os.listdir(d))[:2]:
        (folder / f).write_bytes(open(os.path.join(d, f), "rb").read())
    r = CliRunner().invoke(export_main, [str(weights), "--onnx", "fp32", "--verify-images", "2", "--out",
                                         str(tmp_path / "exp")])
    assert r.exit_code == 0, r.output
    onnx_file = tmp_path / "exp" / "last.fp32.onnx"
    outs = {}
    for tag, args in (("src", ["--weights", str(weights)]),
                      ("onnx", ["--backend", str(onnx_file), "--weights", str(weights), "--attack", "pgd",
                                "--steps", "1"])):
        r = CliRunner().invoke(predict_main, [str(folder), *args, "--out", str(tmp_path / tag), "--conf", "0.05",
                                              "--quiet"])
        assert r.exit_code == 0, r.output
        outs[tag] = json.loads((tmp_path / tag / "predictions.json").read_text())
    assert len(outs["src"]) == len(outs["onnx"])
    # each source detection has its own ONNX detection of the same image and class within 1e-3 in score (paired by
    # place and score, not by score order: a barely trained model scores many boxes 0.2001 +- 1e-5, whose order
    # the last float bits decide, and they differ between CPU capabilities and thread counts)
    left = list(outs["onnx"])
    for p in outs["src"]:
        q = min((q for q in left if q["image_id"] == p["image_id"] and q["category_id"] == p["category_id"]),
                key=lambda q: (abs(p["score"] - q["score"]), sum(abs(a - b) for a, b in zip(p["bbox"], q["bbox"]))),
                default=None)
        assert q is not None and abs(p["score"] - q["score"]) < 1e-3, (p, q)
        left.remove(q)
    r = CliRunner().invoke(bench_main, ["--weights", str(weights), "--sanity", str(tmp_path / "sanity"),
                                        "--max-images", "2", "--batch-size", "2", "--workers", "0", "--quiet",
                                        "--apgd-iterations", "2", "--restarts", "2", "--sanity-eps", "0.01,0.1",
                                        "--sanity-steps", "1,2", "--sanity-queries", "4"])
    assert r.exit_code in (0, 1), r.output  # 1: a check failed or INCONCLUSIVE on a one-epoch model, not an error
    out = json.loads((tmp_path / "sanity" / "sanity.json").read_text())
    checks = {row["check"] for row in out["rows"]}
    assert {"AP50 non-increasing with eps", "uniform noise not stronger than the attack",
            "gradient-free search not stronger than white-box"} <= checks, checks
    assert out["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE")
