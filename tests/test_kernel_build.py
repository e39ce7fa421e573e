"""The fused kernels' build folder: keyed by what changes the build, shared by checkouts, locked, announced."""
import fcntl
import json
import os
import shutil
import subprocess
import sys

import pytest

import cuda_kernels as ck
from cuda_kernels import build as B

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_IN = ("import json, cuda_kernels.build as b; m = b.build(); "
            "print('MANIFEST', json.dumps({k: m[k] for k in ('build_dir', 'compiled_now', 'objects')}))")


def _other_checkout(tmp_path):
    """A copy of the kernels package somewhere else: another clone of the project."""
    dst = tmp_path / "elsewhere"
    dst.mkdir()
    shutil.copytree(os.path.join(ROOT, "cuda_kernels"), dst / "cuda_kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _build_from(checkout, **popen):
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    return subprocess.Popen([sys.executable, "-c", BUILD_IN], cwd=str(checkout), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _manifest(out):
    line = next(l for l in out.splitlines() if l.startswith("MANIFEST "))
    return json.loads(line[len("MANIFEST "):])


def test_another_checkout_reuses_the_build_without_compiling(tmp_path):
    m = ck.manifest()  # this process's build (make test: a folder of this checkout)
    assert ck.load()
    objs = {o: os.path.getmtime(os.path.join(m["build_dir"], o)) for o in m["objects"]}
    assert objs, m
    p = _build_from(_other_checkout(tmp_path))
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    other = _manifest(out)
    assert other["build_dir"] == m["build_dir"]
    assert other["compiled_now"] is False
    assert "compiling the fused kernels" not in err
    # nothing was recompiled: ninja found every object up to date although the checkout's path differs
    assert {o: os.path.getmtime(os.path.join(m["build_dir"], o)) for o in m["objects"]} == objs
    assert "elsewhere" not in open(os.path.join(m["build_dir"], "build.ninja")).read()


def test_a_concurrent_build_of_the_same_key_waits_for_the_lock(tmp_path):
    m = ck.manifest()
    with open(os.path.join(m["build_dir"], "build.lock"), "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        p = _build_from(_other_checkout(tmp_path))
        first = p.stderr.readline()  # blocks until the child says something: it must say that it waits
        assert "waiting for another process" in first, first
        assert p.poll() is None  # still waiting while the lock is held
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert _manifest(out)["build_dir"] == m["build_dir"]


def test_the_key_follows_sources_cpu_and_cuda_settings(tmp_path, monkeypatch):
    base = B.build_key(False)
    assert B.build_key(False) == base  # stable
    csrc = tmp_path / "csrc"
    shutil.copytree(B.CSRC, csrc)
    monkeypatch.setattr(B, "CSRC", str(csrc))
    assert B.build_key(False) == base  # the same bytes elsewhere: the same key
    with open(csrc / "ops.cpp", "a") as f:
        f.write("\n// one more line\n")
    assert B.build_key(False) != base
    monkeypatch.setattr(B, "CSRC", B.CSRC)
    monkeypatch.setattr(B, "_cpu_features", lambda: "sse2 only")
    if "-march=native" in B.CPU_FLAGS:
        assert B.build_key(False) != base  # a native build is only valid on a CPU with the same features
    monkeypatch.undo()
    assert B.build_key(True, "/opt/cuda-a") != B.build_key(True, "/opt/cuda-b")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5")
    k75 = B.build_key(True, "/opt/cuda-a")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert B.build_key(True, "/opt/cuda-a") != k75


@pytest.mark.parametrize("value,expected", [("1", True), ("0", False), ("", None)])
def test_cuda_compile_is_skipped_without_a_gpu_unless_asked(monkeypatch, value, expected):
    import torch

    monkeypatch.setenv("FA_KERNELS_CUDA", value)
    wanted, why = B.cuda_wanted()
    if expected is None:
        expected = torch.version.cuda is not None and torch.cuda.is_available()
    assert wanted is expected, why
    assert why
