"""scripts/gpu_check.sh where no GPU is: --help names every part and the command that fills --wheels DIR; a run
gives every part SKIPPED with its reason and a valid Markdown + JSON summary, exit code 0; --rehearse runs the
detectors part's own commands on the CPU (a check of the script, marked as not GPU results)."""
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
                 "trt-bench", "ort-gpu", "detectors", "--rehearse", "--only", "pip download -d DIR"):
        assert part in r.stdout, part


def test_an_unknown_part_is_an_error(tmp_path):
    r = subprocess.run(["bash", SCRIPT, "--only", "detector", "--out", str(tmp_path), "--python", sys.executable],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--only: no part named detector" in r.stderr and "detectors" in r.stderr


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
        assert len(doc["parts"]) == 10 and doc["skipped"] == 10 and doc["failed"] == 0
        assert all(p["reason"] for p in doc["parts"])
        assert ("dry run" if extra else "no CUDA device") in doc["parts"][0]["reason"]
        assert "| kernels | SKIPPED |" in (out / "summary.md").read_text()


def test_rehearsal_runs_the_detectors_part_on_the_cpu(tmp_path):
    """The detectors part (train, the suite, export, --threat all through the twins) with its own commands on the
    CPU for SSDlite: the flags the GPU run will be given work, and the summary says it is no GPU result."""
    out = tmp_path / "rehearsal"
    r = subprocess.run(["bash", SCRIPT, "--rehearse", "--only", "detectors", "--detectors", "ssdlite", "--out",
                        str(out), "--python", sys.executable], capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    log = (out / "logs" / "detectors.log").read_text() if (out / "logs" / "detectors.log").exists() else ""
    assert r.returncode == 0, r.stdout + r.stderr + log[-3000:]
    doc = json.loads((out / "summary.json").read_text())
    parts = {p["part"]: p for p in doc["parts"]}
    assert parts["detectors"]["status"] == "PASS" and doc["rehearsal_on_cpu"] is True
    assert all(p["status"] == "SKIPPED" and "not selected" in p["reason"] for k, p in parts.items() if k != "detectors")
    assert "REHEARSAL on the CPU: these are not GPU results" in (out / "summary.md").read_text()
    rows = json.loads((out / "detectors" / "ssdlite" / "deploy.json").read_text())["rows"]
    assert {(row["backend"], row["threat"]) for row in rows} >= {("last.int8.onnx", "whitebox"),
                                                               ("last.fp16.onnx", "differential")}
    assert "int8 twin verified against ONNX Runtime" in log
