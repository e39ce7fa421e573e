"""Build the fused ops with torch.utils.cpp_extension (JIT, into a cache folder) and load them.

The CUDA sources are compiled whenever nvcc and a CUDA build of torch are present, GPU or not, so a compile
error is caught on every machine. The toolkit root is $CUDA_HOME when set, else found from `nvcc --dryrun -v`
(its TOP= line): the `nvcc` on PATH may be a wrapper script, from which torch's own guess goes wrong.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from typing import Optional

import torch

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
DEFAULT_ARCH_LIST = "8.0;9.0"
NAME = "fa_kernels"
# JIT builds run on the machine that uses them, so the CPU kernels may use all of its vector units
# (AVX2/AVX-512, F16C for half conversions). FA_KERNELS_PORTABLE=1 builds for a generic x86-64 instead.
CPU_FLAGS = ["-O3", "-fno-math-errno"] + ([] if os.environ.get("FA_KERNELS_PORTABLE") else ["-march=native"])


class KernelBuildError(RuntimeError):
    pass


def find_cuda_home() -> Optional[str]:
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-v", "x.cu"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
    return os.path.realpath(m.group(1)) if m else None


def cuda_build_possible() -> tuple:
    """(possible, reason)."""
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    home = find_cuda_home()
    if home is None or not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return False, "nvcc not found (set CUDA_HOME)"
    return True, home


def sources(with_cuda: bool):
    # fa_ops.cpp: the schemas and argument checks both devices share; ops.cpp: CPU kernels; ops_cuda.cu: CUDA kernels
    srcs = [os.path.join(CSRC, "fa_ops.cpp"), os.path.join(CSRC, "ops.cpp")]
    if with_cuda:
        srcs.append(os.path.join(CSRC, "ops_cuda.cu"))
    return srcs


def _digest(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(glob.glob(os.path.join(CSRC, "*"))):
        h.update(open(p, "rb").read())
    h.update(torch.__version__.encode())
    h.update(" ".join(CPU_FLAGS).encode())
    return h.hexdigest()[:16]


def build_dir(with_cuda: bool) -> str:
    base = os.environ.get("FA_KERNELS_BUILD") or os.path.join(
        os.environ.get("FA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fa-toolkit"), "kernels")
    d = os.path.join(base, f"{'cuda' if with_cuda else 'cpu'}-{_digest(sources(with_cuda))}")
    os.makedirs(d, exist_ok=True)
    return d


def build(verbose: bool = False, require_cuda: Optional[bool] = None) -> dict:
    """Compile (if needed) and load the ops. Returns a manifest of what was built."""
    possible, info = cuda_build_possible()
    with_cuda = possible if require_cuda is None else require_cuda
    if with_cuda and not possible:
        raise KernelBuildError(f"CUDA kernels requested but cannot be built: {info}")
    if with_cuda:
        os.environ["CUDA_HOME"] = info  # before cpp_extension is imported: it caches its own guess then
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    import logging

    # torch warns at import that no CUDA runtime (GPU) is found: expected on build machines without a GPU
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    if with_cuda:
        cpp_extension.CUDA_HOME = info
    d = build_dir(with_cuda)
    t0 = time.time()
    try:
        cpp_extension.load(
            name=NAME + ("_cuda" if with_cuda else "_cpu"), sources=sources(with_cuda), build_directory=d,
            extra_cflags=CPU_FLAGS, extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo"],
            extra_include_paths=[CSRC], with_cuda=with_cuda, is_python_module=False, verbose=verbose)
    except Exception as e:  # compiler errors come as RuntimeError / subprocess errors
        raise KernelBuildError(f"building the fused ops failed ({'with' if with_cuda else 'without'} CUDA) in {d}: "
                               f"{e}") from e
    manifest = {
        "build_dir": d, "cuda_compiled": with_cuda, "cuda_home": info if with_cuda else None,
        "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "cuda_reason": None if possible else info, "sources": [os.path.basename(s) for s in sources(with_cuda)],
        "objects": sorted(os.path.basename(p) for p in glob.glob(os.path.join(d, "*.o"))),
        "library": sorted(glob.glob(os.path.join(d, "*.so"))), "seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
    }
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest
