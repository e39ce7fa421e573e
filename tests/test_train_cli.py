"""fa-train end to end on a tiny model and the shapes dataset: run folder, metrics, resume, bad input."""
import json
import os

import pytest
import torch
from click.testing import CliRunner

from fa_train.checkpoint import CheckpointError, load_checkpoint
from fa_train.models import load_model
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


# -- issue 14: resume semantics, nothing written before a run is accepted, argument checks, checkpoint messages

SMALL = ["--data", "synth:60", "--img-size", "64", "--batch-size", "2", "--width-mult", "0.125", "--depth-mult", "0.2",
         "--max-images", "4", "--max-test-images", "2", "--quiet", "--warmup-iters", "0", "--eval-every", "0"]


def _snapshot(folder):
    """Every file under `folder`: (bytes, mtime)."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-epoch run started from a preset (workers and lr in it) plus flags (max images among them)."""
    base = tmp_path_factory.mktemp("base")
    preset = base / "small.yaml"
    preset.write_text("data: {workers: 0}\ntrain: {lr: 0.001, optimizer: adamw}\nout: runs/elsewhere\n")
    r = CliRunner().invoke(main, ["--config", str(preset)] + SMALL + ["--epochs", "1", "--out", str(base / "run")])
    assert r.exit_code == 0, r.output
    return base / "run", preset


@pytest.fixture
def run_copy(finished_run, tmp_path):
    import shutil

    run, preset = finished_run
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", preset


def test_resume_takes_the_checkpoints_configuration(run_copy, tmp_path, monkeypatch):
    run, preset = run_copy
    monkeypatch.chdir(tmp_path)
    # the README's line: no other flag, the checkpoint's configuration is the run's
    r = CliRunner().invoke(main, ["--resume", str(run / "last.pt"), "--out", str(run), "--epochs", "2", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.output
    ck = load_checkpoint(str(run / "last.pt"))
    assert ck["epoch"] == 2 and ck["step"] == 4
    assert ck["config"]["data"]["max_images"] == 4 and ck["config"]["model"]["width_mult"] == 0.125
    # without --out the run goes on in the checkpoint's folder (not runs/exp, not the preset's `out`); the preset
    # is applied over the checkpoint and keys it does not set (data.max_images) keep the checkpoint's value
    r = CliRunner().invoke(main, ["--config", str(preset), "--resume", str(run / "last.pt"), "--epochs", "3",
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    assert load_checkpoint(str(run / "last.pt"))["epoch"] == 3
    assert "max_images: 4" in (run / "config.yaml").read_text()
    assert not (tmp_path / "runs").exists()


def test_refused_resume_writes_nothing(run_copy, tmp_path, monkeypatch):
    run, _ = run_copy
    monkeypatch.chdir(tmp_path)
    before = _snapshot(run)
    r = CliRunner().invoke(main, ["--resume", str(run / "last.pt"), "--lr", "0.01", "--epochs", "2", "--quiet"])
    assert r.exit_code == 2, r.output
    assert "train.lr: 0.001 (checkpoint) != 0.01 (now)" in r.output and "Traceback" not in r.output
    assert _snapshot(run) == before  # config.yaml still says the run's learning rate
    assert not (tmp_path / "runs").exists()  # no runs/exp created
    r = CliRunner().invoke(main, ["--resume", str(run / "last.pt"), "--epochs", "2", "--quiet"])
    assert r.exit_code == 0, r.output
    assert load_checkpoint(str(run / "last.pt"))["epoch"] == 2


def test_resuming_a_finished_run_changes_nothing(run_copy, monkeypatch):
    import fa_train.engine as engine

    run, _ = run_copy
    before = _snapshot(run)

    def no_work(*a, **k):
        raise AssertionError("a finished run must not be built or evaluated again")

    monkeypatch.setattr(engine.Trainer, "__init__", no_work)
    r = CliRunner().invoke(main, ["--resume", str(run / "last.pt")])
    assert r.exit_code == 0, r.output
    assert "the run is finished (1 of 1 epochs)" in r.output and "raise --epochs" in r.output
    assert _snapshot(run) == before
    # an --epochs below what the run has done cannot be what was meant
    r = CliRunner().invoke(main, ["--resume", str(run / "last.pt"), "--epochs", "0"])
    assert r.exit_code == 2 and "--epochs 0" in r.output
    assert _snapshot(run) == before


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size 0 (train.batch_size): must be at least 1"),
    (["--batch-size", "-4"], "--batch-size -4 (train.batch_size): must be at least 1"),
    (["--train-eps", "-0.01"], "--train-eps -0.01 (method.train_eps): must be at least 0"),
    (["--train-eps", "2"], "--train-eps 2.0 (method.train_eps): must be at most 1"),
    (["--step-size", "-0.01"], "--step-size -0.01 (method.step_size): must be greater than 0"),
    (["--epochs", "0"], "--epochs 0 (train.epochs): must be at least 1"),
    (["--lr", "-0.1"], "--lr -0.1 (train.lr): must be at least 0"),
    (["--lr", "nan"], "--lr nan (train.lr): must be a finite number"),
    (["--img-size", "100"], "--img-size 100 (data.img_size): must be a multiple of 32 (e.g. 96 or 128)"),
    (["--img-size", "0"], "--img-size 0 (data.img_size): must be at least 32"),
    (["--data", "synth:abc"], "--data 'synth:abc': NUM_IMAGES of synth[:NUM_IMAGES] must be a positive integer"),
    (["--data", "synth:0"], "--data 'synth:0'"),
    (["--data", "foo:/x"], "--data 'foo:/x': expected voc:PATH"),
    (["--alpha", "1.5"], "--alpha 1.5 (method.alpha): must be at most 1"),
    (["--pgd-steps", "0"], "--pgd-steps 0 (method.pgd_steps): must be at least 1"),
    (["--workers", "-1"], "--workers -1 (data.workers): must be at least 0"),
    (["--max-images", "0"], "--max-images 0 (data.max_images): must be at least 1"),
    (["--max-test-images", "0"], "--max-test-images 0 (data.max_test_images): must be at least 1"),
    (["--eval-every", "-1"], "--eval-every -1 (train.eval_every): must be at least 0"),
    (["--ssfa-weight", "-1"], "--ssfa-weight -1.0 (method.ssfa_weight): must be at least 0"),
    (["--width-mult", "0"], "--width-mult 0.0 (model.width_mult): must be greater than 0"),
    (["--device", "gpu7"], "--device 'gpu7': expected auto, cpu, cuda or cuda:N"),
    (["--init", "nope.pt"], "--init nope.pt (train.init): initial weights file not found"),
    (["--teacher", "nope.pt"], "--teacher nope.pt (method.teacher): KDFA teacher checkpoint not found"),
])
def test_bad_arguments_are_named_before_any_work(tmp_path, monkeypatch, args, message):
    import fa_train.engine as engine

    def no_work(*a, **k):
        raise AssertionError("a bad argument must be refused before any work")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(engine, "build_dataset", no_work)
    r = CliRunner().invoke(main, ["--out", str(tmp_path / "run")] + args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert r.output.count("\n") == 1  # one line
    assert not (tmp_path / "run").exists()


def test_preset_values_are_checked_like_flags(tmp_path, monkeypatch):
    import fa_train.engine as engine

    monkeypatch.setattr(engine, "build_dataset", lambda *a, **k: (_ for _ in ()).throw(AssertionError("work")))
    p = tmp_path / "bad.yaml"
    p.write_text("train: {batch_size: 0}\n")
    r = CliRunner().invoke(main, ["--config", str(p), "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "--batch-size 0 (train.batch_size): must be at least 1" in r.output
    p.write_text("train: {momentum: 1.5}\n")
    r = CliRunner().invoke(main, ["--config", str(p), "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "train.momentum 1.5: must be at most 1" in r.output
    p.write_text("method: {name: magic}\n")
    r = CliRunner().invoke(main, ["--config", str(p), "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "--method 'magic' (method.name): expected one of standard" in r.output
    # PyYAML reads 1e-3 (no dot) as a string: taken as the number it is
    from fa_train.config import check_config, load_config

    p.write_text("train: {lr: 1e-3}\n")
    assert check_config(load_config(str(p)))["train"]["lr"] == 0.001


def test_unwritable_out_is_refused_before_any_work(tmp_path, monkeypatch):
    import fa_train.engine as engine

    monkeypatch.setattr(engine, "build_dataset", lambda *a, **k: (_ for _ in ()).throw(AssertionError("work")))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for out in [a_file, a_file / "run"] + (["/proc/nope"] if os.path.isdir("/proc/self") else []):
        r = CliRunner().invoke(main, ["--out", str(out)])
        assert r.exit_code == 2, r.output
        assert f"--out {out}:" in r.output and "Traceback" not in r.output
    # a folder the check had to create to find out is removed again
    r = CliRunner().invoke(main, ["--out", str(tmp_path / "new" / "run"), "--batch-size", "0"])
    assert r.exit_code == 2 and not (tmp_path / "new").exists()


def test_exit_codes_for_other_errors(tmp_path, monkeypatch):
    import errno

    import fa_train.engine as engine

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "config.yaml"))

    monkeypatch.setattr(engine, "dump_config", disk_full)
    r = CliRunner().invoke(main, SMALL + ["--workers", "0", "--epochs", "1", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "fa-train: error: [Errno 28] No space left on device" in r.output
    assert "Traceback" not in r.output

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.Trainer, "__init__", interrupted)
    r = CliRunner().invoke(main, SMALL + ["--out", str(tmp_path / "run2")])
    assert r.exit_code == 130 and "interrupted" in r.output

    def bug(*a, **k):
        raise IndexError("a bug")

    monkeypatch.setattr(engine.Trainer, "__init__", bug)
    r = CliRunner().invoke(main, SMALL + ["--out", str(tmp_path / "run3")])
    assert r.exit_code == 2 and "internal error: IndexError: a bug" in r.output


def _tiny_onnx(path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["images"], ["predictions"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("predictions", TensorProto.FLOAT, [1, 3, 4, 4])])
    onnx.save(helper.make_model(graph), str(path))


def test_files_that_are_not_checkpoints_say_what_they_are(tmp_path, finished_run):
    run, _ = finished_run
    exported = "this is an exported model"
    _tiny_onnx(tmp_path / "last.fp32.onnx")
    (tmp_path / "renamed.pt").write_bytes((tmp_path / "last.fp32.onnx").read_bytes())  # known by its content
    (tmp_path / "last.fp16.engine").write_bytes(b"ftrt" + bytes(60))
    (tmp_path / "last.fp32.pipeline.json").write_text('{"format": "onnx-pipeline", "parts": {}}')
    for name, kind in [("last.fp32.onnx", "ONNX model"), ("renamed.pt", "ONNX model"),
                       ("last.fp16.engine", "TensorRT engine"), ("last.fp32.pipeline.json", "pipeline manifest")]:
        with pytest.raises(CheckpointError, match="pass it to fa-bench as --backend") as e:
            load_model(str(tmp_path / name))
        assert exported in str(e.value) and kind in str(e.value), name
    # truncated: a copy cut short, an empty file
    data = (run / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("cut.pt", "empty.pt"):
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_checkpoint(str(tmp_path / name))

    # a pickle that would run code: refused, and never the advice to load it unsafely
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"model": Evil(), "arch": {}}, str(tmp_path / "evil.pt"))
    with pytest.raises(CheckpointError, match="cannot be loaded safely") as e:
        load_checkpoint(str(tmp_path / "evil.pt"))
    assert "weights_only" not in str(e.value) and "posix.system" in str(e.value)
    assert not (tmp_path / "pwned").exists()
    # through the command: one line, exit code 2
    for name in ("last.fp32.onnx", "cut.pt", "evil.pt"):
        for flag in ("--init", "--resume"):
            r = CliRunner().invoke(main, SMALL + [flag, str(tmp_path / name), "--out", str(tmp_path / "r")])
            assert r.exit_code == 2, r.output
            assert "weights_only" not in r.output and "Traceback" not in r.output
            said = [ln for ln in r.output.splitlines() if not ln.startswith("generating the shapes dataset")]
            assert len(said) == 1, r.output  # the error's one line (the first test to run also makes the data)


def test_display_name():
    from fa_train.checkpoint import display_name

    assert display_name("runs/fa/last.pt") == "fa"
    assert display_name("runs/fa/best.pt") == "fa/best"
    assert display_name("runs/fa/last.safetensors") == "fa"
    assert display_name("runs/fa/best.safetensors") == "fa/best"
    assert display_name("/abs/runs/at/epoch10.pt") == "at/epoch10"
    assert display_name("/last.pt") == "last"


def test_check_resume_refuses_fewer_epochs_than_done():
    from fa_train.config import load_config
    from fa_train.engine import TrainingError, check_resume

    cfg = load_config(None, {"train": {"epochs": 2}})
    ckpt = {"config": load_config(None, {"train": {"epochs": 3}}), "optimizer": {}, "epoch": 3}
    with pytest.raises(TrainingError, match=r"--epochs 2 \(train.epochs\): .* has already trained 3 epochs"):
        check_resume(ckpt, cfg, "run/last.pt")
    assert "finished (3 of 3 epochs)" in check_resume(ckpt, load_config(None, {"train": {"epochs": 3}}), "r")
    assert check_resume(ckpt, load_config(None, {"train": {"epochs": 4}}), "r") is None
    with pytest.raises(TrainingError, match="pass it as --init"):  # a weights-only checkpoint cannot be resumed
        check_resume({"model": {}, "arch": {}}, cfg, "w.pt")
