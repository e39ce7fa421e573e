"""scripts/gpu_check.sh where no GPU is: --help names every part and the command that fills --wheels DIR; a run
gives every part SKIPPED with its reason and a valid Markdown + JSON summary, exit code 0."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")


def test_help_lists_parts_and_the_wheels_command():
    r = subprocess.run(["bash", SCRIPT, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for part in ("kernels", "gpu-tests", "kernel-bench", "train-yolo", "train-frcnn", "bench-pgd", "trt-export",
                 "trt-bench", "ort-gpu", "pip download -d DIR"):
        assert part in r.stdout, part


def test_without_a_gpu_every_part_is_skipped_with_a_reason(tmp_path):
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("a GPU is present: run the script itself")
    for extra in ([], ["--dry-run"]):
        out = tmp_path / ("dry" if extra else "run")
        r = subprocess.run(["bash", SCRIPT, "--out", str(out), "--python", sys.executable, *extra],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        doc = json.loads((out / "summary.json").read_text())
        assert len(doc["parts"]) == 9 and doc["skipped"] == 9 and doc["failed"] == 0
        assert all(p["reason"] for p in doc["parts"])
        assert ("dry run" if extra else "no CUDA device") in doc["parts"][0]["reason"]
        assert "| kernels | SKIPPED |" in (out / "summary.md").read_text()
