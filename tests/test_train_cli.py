"""fa-train end to end on a tiny model and the shapes dataset: run folder, metrics, resume, bad input."""
import json
import os

import pytest
import torch
from click.testing import CliRunner

from fa_train.checkpoint import CheckpointError, load_checkpoint, load_model
from fa_train.cli import main

TINY = ["--data", "synth:60", "--img-size", "64", "--batch-size", "4", "--width-mult", "0.125",
        "--depth-mult", "0.2", "--workers", "0", "--max-images", "16", "--max-test-images", "8", "--quiet",
        "--warmup-iters", "2", "--lr", "0.001"]


def test_train_run_folder_and_resume(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, TINY + ["--epochs", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    for f in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl", "eval.json"):
        assert (out / f).is_file(), f
    assert "clean AP50" in r.output and "mean (AP50)" in r.output
    rec = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert rec[-1]["epoch"] == 1 and {"train/box", "train/obj", "train/cls", "val/AP50"} <= set(rec[-1])
    ck = load_checkpoint(str(out / "last.pt"))
    assert ck["epoch"] == 1 and ck["step"] == 4 and ck["class_names"] == ["circle", "square", "triangle", "star"]
    # resume continues the run to epoch 2 from where it stopped
    r = CliRunner().invoke(main, TINY + ["--epochs", "2", "--out", str(out), "--resume", str(out / "last.pt")])
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.output
    ck2 = load_checkpoint(str(out / "last.pt"))
    assert ck2["epoch"] == 2 and ck2["step"] == 8
    model, _ = load_model(str(out / "last.pt"))
    assert not torch.equal(model.state_dict()["backbone.stem.conv.weight"], ck["model"]["backbone.stem.conv.weight"])
    # a new run in the same folder starts a new metrics record; the earlier one is kept aside
    before = (out / "metrics.jsonl").read_text()
    r = CliRunner().invoke(main, TINY + ["--epochs", "1", "--out", str(out / "again")])
    assert r.exit_code == 0
    r = CliRunner().invoke(main, TINY + ["--epochs", "1", "--out", str(out / "again")])
    assert r.exit_code == 0 and "moved to metrics.previous.jsonl" in r.output
    assert len((out / "again" / "metrics.jsonl").read_text().splitlines()) == 1
    assert len((out / "again" / "metrics.previous.jsonl").read_text().splitlines()) == 1
    assert (out / "metrics.jsonl").read_text() == before
    # resuming with settings that change the run is refused, each difference listed
    r = CliRunner().invoke(main, TINY + ["--epochs", "3", "--lr", "0.01", "--method", "at", "--out", str(out),
                                         "--resume", str(out / "last.pt")])
    assert r.exit_code == 2, r.output
    assert "another configuration" in r.output
    assert "train.lr: 0.001 (checkpoint) != 0.01 (now)" in r.output
    assert "method.name: 'standard' (checkpoint) != 'at' (now)" in r.output


def test_init_from_checkpoint_of_another_model_is_refused(tmp_path):
    out = tmp_path / "run"
    assert CliRunner().invoke(main, TINY + ["--epochs", "1", "--out", str(out), "--eval-every", "0"]).exit_code == 0
    r = CliRunner().invoke(main, TINY + ["--epochs", "1", "--out", str(tmp_path / "b"), "--width-mult", "0.25",
                                         "--init", str(out / "last.pt")])
    assert r.exit_code == 2
    assert "checkpoint is for another model" in r.output and "width_mult" in r.output


def test_bad_flags_are_named(tmp_path):
    r = CliRunner().invoke(main, ["--data", "voc:/nonexistent/VOCdevkit", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "/nonexistent/VOCdevkit/VOC2007/ImageSets/Main/trainval.txt" in r.output
    r = CliRunner().invoke(main, ["--config", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 2 and "nope.yaml" in r.output


def test_config_unknown_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: {epochs: 1, learning_rate: 3}\n")
    r = CliRunner().invoke(main, ["--config", str(p)])
    assert r.exit_code == 2 and "train.learning_rate" in r.output


def test_pickle_that_runs_code_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"model": Evil(), "arch": {}}, f)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(str(p))
    assert not (tmp_path / "pwned").exists()


def test_nonfinite_loss_is_skipped_counted_then_stops(tmp_path):
    import math

    from fa_train.config import load_config
    from fa_train.engine import Trainer, TrainingError

    cfg = load_config(None, {"data": {"spec": "synth:60", "img_size": 64, "workers": 0, "max_images": 16,
                                      "max_test_images": 4},
                             "model": {"width_mult": 0.125, "depth_mult": 0.2},
                             "train": {"epochs": 1, "batch_size": 4, "eval_every": 0, "max_nonfinite": 3},
                             "out": str(tmp_path)})
    logs = []
    trainer = Trainer(cfg, log=logs.append, progress=False)
    real_step = trainer.objective.step
    calls = {"n": 0}

    def flaky(model, images, targets, scaler, amp):
        calls["n"] += 1
        if calls["n"] == 2:  # one bad step: skipped, training goes on
            return {"loss": math.nan, "box": math.nan}
        return real_step(model, images, targets, scaler, amp)

    trainer.objective.step = flaky
    trainer.fit()
    assert trainer.nonfinite_total == 1 and trainer.step == 3  # 4 batches, one skipped
    events = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert any(e.get("event") == "nonfinite_loss" and e["step"] == 1 for e in events)
    before = (tmp_path / "last.pt").read_bytes()
    # always non-finite: stops after max_nonfinite in a row, naming the step and the terms; last.pt intact
    cfg["train"]["epochs"] = 2
    trainer2 = Trainer(cfg, log=logs.append, progress=False)
    trainer2.objective.step = lambda *a: {"loss": math.inf, "obj": math.inf}
    with pytest.raises(TrainingError, match=r"3 non-finite losses in a row, the last at step 3: .*'obj': inf"):
        trainer2.fit(resume=str(tmp_path / "last.pt"))
    assert (tmp_path / "last.pt").read_bytes() == before


@pytest.mark.parametrize("preset", sorted(os.listdir(os.path.join(os.path.dirname(__file__), "..", "configs"))))
def test_presets_are_valid(preset):
    from fa_train.config import load_config
    from fa_train.models import create_model

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", preset))
    m = cfg["model"]
    model = create_model(m["name"], 20, **{k: v for k, v in m.items() if k != "name" and v is not None})
    assert model.arch_config()["name"] == m["name"]
    if preset.startswith("paper_"):
        assert cfg["method"]["ssfa_weight"] == cfg["method"]["kdfa_weight"] == model.default_alignment_weight


def test_safetensors_weights(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, TINY + ["--epochs", "1", "--out", str(out), "--save-safetensors"])
    assert r.exit_code == 0, r.output
    a, _ = load_model(str(out / "last.pt"))
    b, ck = load_model(str(out / "last.safetensors"))
    assert ck["class_names"] == ["circle", "square", "triangle", "star"]
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="without fa-toolkit metadata"):
        load_model(str(tmp_path / "plain.safetensors"))
