"""Exact resume: a run killed with SIGKILL (at two different steps) or stopped with SIGTERM, then resumed,
ends with the same weights as the uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from fa_train.checkpoint import load_checkpoint
from fa_train.cli import main

ARGS = ["--data", "synth:60", "--img-size", "64", "--batch-size", "2", "--width-mult", "0.125", "--depth-mult", "0.2",
        "--workers", "0", "--max-images", "24", "--max-test-images", "2", "--quiet", "--eval-every", "0",
        "--epochs", "2", "--lr", "0.002", "--warmup-iters", "3", "--save-every-steps", "1"]
TOTAL_STEPS = 24  # 2 epochs x 12 batches


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    r = CliRunner().invoke(main, ARGS + ["--out", str(out)])
    assert r.exit_code == 0, r.output
    return load_checkpoint(str(out / "last.pt"))["model"]


def _start(out, threads=None):
    # the interrupted run computes with the thread count of this process (the reference's) unless told otherwise:
    # conftest gives each pytest-xdist worker one thread, and sums split across another count round differently
    env = dict(os.environ, OMP_NUM_THREADS=str(threads or torch.get_num_threads()))
    return subprocess.Popen([sys.executable, "-m", "fa_train.cli", *ARGS, "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc, out, step, timeout=120):
    t0 = time.time()
    metrics = out / "metrics.jsonl"
    while time.time() - t0 < timeout:
        if metrics.is_file():
            steps = [json.loads(l).get("step", 0) for l in metrics.read_text().splitlines()
                     if '"checkpoint"' in l]
            if steps and max(steps) >= step:
                return
        if proc.poll() is not None:
            pytest.fail(f"training ended before step {step}: {proc.stdout.read()}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"step {step} not reached in {timeout} s")


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("kill_at", [3, 15])
def test_sigkill_then_resume_gives_the_same_weights(reference, tmp_path, kill_at):
    out = tmp_path / "run"
    proc = _start(out)
    _wait_for_step(proc, out, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    ck = load_checkpoint(str(out / "last.pt"))  # never half-written
    assert kill_at <= ck["step"] < TOTAL_STEPS, "the process finished before it was killed"
    r = CliRunner().invoke(main, ARGS + ["--out", str(out), "--resume", str(out / "last.pt")])
    assert r.exit_code == 0, r.output
    final = load_checkpoint(str(out / "last.pt"))
    assert final["step"] == TOTAL_STEPS
    _assert_same(final["model"], reference)


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(reference, tmp_path):
    out = tmp_path / "run"
    proc = _start(out)
    _wait_for_step(proc, out, 4)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    output = proc.stdout.read()
    assert code == 128 + signal.SIGTERM, output
    assert "stopped by signal" in output and "Traceback" not in output
    ck = load_checkpoint(str(out / "last.pt"))
    assert 4 <= ck["step"] < TOTAL_STEPS
    r = CliRunner().invoke(main, ARGS + ["--out", str(out), "--resume", str(out / "last.pt")])
    assert r.exit_code == 0, r.output
    _assert_same(load_checkpoint(str(out / "last.pt"))["model"], reference)


def test_resume_in_a_process_with_another_thread_count_continues_the_run_exactly(tmp_path):
    """The run is computed with `other` CPU threads (its reference too); the resume happens in this process, which
    has another count: it adopts the checkpoint's count for the run (and gives this process its own back)."""
    now = torch.get_num_threads()
    other = 1 if now > 1 else 2
    torch.set_num_threads(other)
    try:
        r = CliRunner().invoke(main, ARGS + ["--out", str(tmp_path / "ref")])
    finally:
        torch.set_num_threads(now)
    assert r.exit_code == 0, r.output
    reference = load_checkpoint(str(tmp_path / "ref" / "last.pt"))["model"]
    out = tmp_path / "run"
    proc = _start(out, threads=other)
    _wait_for_step(proc, out, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    ck = load_checkpoint(str(out / "last.pt"))
    assert ck["cpu_threads"] == other and 5 <= ck["step"] < TOTAL_STEPS
    r = CliRunner().invoke(main, ARGS + ["--out", str(out), "--resume", str(out / "last.pt")])
    assert r.exit_code == 0, r.output
    assert f"resume: {other} CPU threads" in r.output
    assert torch.get_num_threads() == now
    _assert_same(load_checkpoint(str(out / "last.pt"))["model"], reference)
