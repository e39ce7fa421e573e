"""Data faults during training: a corrupt image stops the run naming it (default) or is skipped and counted
(--bad-images skip); a data-loader worker that dies or hangs ends the run with an error, never a hang."""
import json
import os
import signal
import time

import pytest
import torch
from click.testing import CliRunner

from fa_train.cli import main
from fa_train.data.common import DetectionDataset

TINY = ["--data", "synth:60", "--img-size", "64", "--batch-size", "4", "--width-mult", "0.125", "--depth-mult", "0.2",
        "--max-images", "16", "--max-test-images", "4", "--quiet", "--epochs", "1", "--eval-every", "0",
        "--warmup-iters", "0"]


@pytest.fixture
def broken(tmp_path, monkeypatch):
    """A private shapes cache with two truncated training images; returns their paths."""
    from fa_train.data import build_dataset

    monkeypatch.setenv("FA_CACHE", str(tmp_path / "cache"))
    ds = build_dataset("synth:60", "train", 64, max_images=16, log=None)
    bad = [ds.records[1].file, ds.records[5].file]
    for f in bad:
        with open(f, "rb") as fh:
            head = fh.read(150)
        with open(f, "wb") as fh:
            fh.write(head)
    return bad


@pytest.mark.parametrize("workers", ["0", "1"])
def test_corrupt_image_stops_the_run_naming_it(broken, tmp_path, workers):
    r = CliRunner().invoke(main, TINY + ["--workers", workers, "--out", str(tmp_path / "run")])
    assert r.exit_code == 2, r.output
    assert "corrupt or unreadable image" in r.output
    assert any(os.path.basename(b) in r.output for b in broken)
    # the DataError's own line, as without workers: not PyTorch's "Caught DataError in DataLoader worker process 0"
    # with the worker's traceback
    assert "Caught" not in r.output and "Traceback" not in r.output
    assert r.output.split("fa-train: error: ")[1].count("\n") == 1, r.output


def test_worker_data_errors_come_out_as_the_data_error_everywhere(broken):
    """The loaders of training, evaluation and fa-bench (make_loader / eval_loader) all give the DataError itself."""
    from fa_train.data import DataError, build_dataset
    from fa_train.engine import eval_loader, make_loader, worker_error_message

    ds = build_dataset("synth:60", "train", 64, max_images=16, log=None)
    for loader in (eval_loader(ds, 4, 1), make_loader(ds, 4, False, 1), make_loader(ds, 4, True, 2, timeout=60)):
        with pytest.raises(DataError) as e:
            for _ in loader:
                pass
        msg = str(e.value)
        assert "corrupt or unreadable image" in msg and "Caught" not in msg and "Traceback" not in msg
        assert os.path.basename(broken[0]) in msg or os.path.basename(broken[1]) in msg
        assert "Caught DataError in DataLoader worker process" in e.value.worker_traceback  # kept for debugging
    assert worker_error_message(ValueError("plain")) is None


def test_corrupt_test_image_stops_the_evaluation_naming_it(tmp_path, monkeypatch):
    """Evaluation always stops on a bad image (--bad-images skip is for training images only), in one line."""
    from fa_train.data import build_dataset

    monkeypatch.setenv("FA_CACHE", str(tmp_path / "cache"))
    ds = build_dataset("synth:60", "test", 64, max_images=4, log=None)
    with open(ds.records[2].file, "wb") as fh:
        fh.write(b"not a jpeg")
    r = CliRunner().invoke(main, TINY + ["--workers", "1", "--max-images", "4", "--bad-images", "skip",
                                         "--out", str(tmp_path / "run")])
    assert r.exit_code == 2, r.output
    assert f"{ds.records[2].file}: corrupt or unreadable image" in r.output
    assert "Caught" not in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("workers", ["0", "1"])
def test_corrupt_images_skipped_and_counted(broken, tmp_path, workers):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, TINY + ["--workers", workers, "--bad-images", "skip", "--out", str(out)])
    assert r.exit_code == 0, r.output
    ev = json.loads((out / "eval.json").read_text())
    assert sorted(ev["skipped_images"]) == sorted(broken)  # each once: one epoch
    events = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"bad_image"' in l]
    assert sorted(e["file"] for e in events) == sorted(broken)
    assert all("corrupt" in e["reason"] for e in events)
    assert "2 training images were skipped" in r.output


def test_dead_worker_is_an_error_not_a_hang(tmp_path, monkeypatch):
    orig = DetectionDataset._load

    def dying(self, i, seed):
        if torch.utils.data.get_worker_info() is not None and i % 4 == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, i, seed)

    monkeypatch.setattr(DetectionDataset, "_load", dying)
    t0 = time.time()
    r = CliRunner().invoke(main, TINY + ["--workers", "1", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2, r.output
    assert "data loading failed at epoch 1" in r.output and "DataLoader worker" in r.output
    assert "exited unexpectedly" in r.output or "killed by signal" in r.output
    assert time.time() - t0 < 120


def test_hung_worker_times_out(tmp_path, monkeypatch):
    orig = DetectionDataset._load

    def hanging(self, i, seed):
        if torch.utils.data.get_worker_info() is not None:
            time.sleep(60)
        return orig(self, i, seed)

    monkeypatch.setattr(DetectionDataset, "_load", hanging)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data: {loader_timeout: 3}\n")
    t0 = time.time()
    r = CliRunner().invoke(main, ["--config", str(cfg)] + TINY + ["--workers", "1", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2, r.output
    assert "timed out after 3 seconds" in r.output and "no checkpoint had been written yet" in r.output
    assert time.time() - t0 < 50
