"""A deployment service runs an engine with tensorrt, numpy and a CUDA binding only: in a process where `import torch`
fails, fa_deploy.runtime.engine (and the modules it needs) import, build and run an engine through the TensorRT and pycuda
TEST DOUBLES (tests/trt_double.py; not TensorRT), and torch is never imported."""
import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

SCRIPT = r'''
import importlib.abc, os, sys

class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"{name} is not installed in this deployment service (blocked by the test)")
        return None

sys.meta_path.insert(0, BlockTorch())
try:
    import torch  # noqa: F401
    raise SystemExit("torch imported although blocked")
except ImportError:
    pass
import numpy as np
import trt_double
sys.modules.update(trt_double.modules())

from fa_deploy.runtime import EngineRunner                 # the service's import
from fa_deploy.exporting.tensorrt_build import build_engine
from fa_deploy.runtime.metadata import write_sidecar, read_sidecar
import fa_deploy.runtime.backends, fa_deploy.runtime.tensorrt, fa_deploy.exporting.compat  # also torch-free

d = sys.argv[1]
src = trt_double.tiny_onnx(os.path.join(d, "t.onnx"))
eng = os.path.join(d, "t.engine")
meta = build_engine(src, eng, "x", 0, (1, 2, 4), 64, profile_shapes=((1, 3), (2, 3), (4, 3)), log=lambda m: None)
write_sidecar(eng, {**meta, "precision": "fp32"})
runner = EngineRunner(eng)
x = np.arange(18, dtype=np.float32).reshape(6, 3)
twice, plus1, total = runner.raw(x)
assert np.array_equal(twice, 2 * x) and np.array_equal(total, x.sum(1, keepdims=True)), "wrong outputs"
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))
assert not bad, bad
print("RUNTIME-OK", runner.api.name, runner.batch_range)
'''


def test_runtime_imports_and_runs_without_torch(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, TESTS])}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RUNTIME-OK pycuda (1, 2, 4)" in r.stdout
