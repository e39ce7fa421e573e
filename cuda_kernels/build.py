"""Build the fused ops with torch.utils.cpp_extension (JIT, into a cache folder) and load them.

The CUDA sources are compiled where a GPU can run them (torch sees one), or where asked with FA_KERNELS_CUDA=1
or `python -m cuda_kernels build --cuda` (`make test` asks, so a CUDA compile error fails every test run);
FA_KERNELS_CUDA=0 never compiles them. The toolkit root is $CUDA_HOME when set, else found from `nvcc --dryrun -v`
(its TOP= line): the `nvcc` on PATH may be a wrapper script, from which torch's own guess goes wrong.

The build folder is relocatable and shared: its name is a digest of everything that changes the build (the
sources' bytes, torch, Python, the compiler, the CPU's feature flags for -march=native, the CUDA toolkit and
architectures), the sources are copied into it and compiled from there (so `build.ninja` names no checkout, and
two checkouts with the same sources share one build instead of forcing each other's rebuilds), and a file lock
makes concurrent first uses of one key wait for a single compile. A first-use compile prints one line when it
starts and one with its time.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
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


def cuda_wanted() -> tuple:
    """(compile the CUDA sources?, why): FA_KERNELS_CUDA=1/0 decides; else only where torch sees a GPU."""
    env = os.environ.get("FA_KERNELS_CUDA", "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True, "asked (FA_KERNELS_CUDA=1)"
    if env in ("0", "false", "no", "off"):
        return False, "FA_KERNELS_CUDA=0"
    if torch.version.cuda is not None and torch.cuda.is_available():
        return True, "a CUDA GPU is present"
    return False, "no CUDA GPU here to run them (FA_KERNELS_CUDA=1 compiles them anyway)"


def _cpu_features() -> str:
    """The CPU's feature flags: -march=native compiles for them, so a build is only valid on a CPU that has them."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _tool_version(cmd) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else ""
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return ""


def build_key(with_cuda: bool, cuda_home: Optional[str] = None) -> str:
    """A digest of everything that changes what is built."""
    h = hashlib.sha256()

    def put(x):
        h.update(x if isinstance(x, bytes) else str(x).encode())
        h.update(b"\0")

    for p in sorted(glob.glob(os.path.join(CSRC, "*"))):
        put(os.path.basename(p))
        put(open(p, "rb").read())
    put(torch.__version__)
    put(torch.version.cuda)
    put(sys.version)
    put(" ".join(CPU_FLAGS))
    if "-march=native" in CPU_FLAGS:
        put(_cpu_features())
    put(_tool_version([os.environ.get("CXX", "c++"), "--version"]))
    put(with_cuda)
    if with_cuda:
        put(cuda_home)
        put(os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST))
        put(_tool_version([os.path.join(cuda_home or "", "bin", "nvcc"), "--version"]))
    return h.hexdigest()[:16]


def build_base() -> str:
    return os.environ.get("FA_KERNELS_BUILD") or os.path.join(
        os.environ.get("FA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fa-toolkit"), "kernels")


def build_dir(with_cuda: bool, cuda_home: Optional[str] = None) -> str:
    d = os.path.join(build_base(), f"{'cuda' if with_cuda else 'cpu'}-{build_key(with_cuda, cuda_home)}")
    os.makedirs(d, exist_ok=True)
    return d


def _stage_sources(d: str, with_cuda: bool) -> list:
    """Copy the sources (and headers) into the build folder; rewrite a copy only when its bytes changed, so
    ninja's timestamps stay valid. Returns the copied sources to compile."""
    src = os.path.join(d, "src")
    os.makedirs(src, exist_ok=True)
    for p in glob.glob(os.path.join(CSRC, "*")):
        dst = os.path.join(src, os.path.basename(p))
        data = open(p, "rb").read()
        if not os.path.exists(dst) or open(dst, "rb").read() != data:
            tmp = f"{dst}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, dst)
    return [os.path.join(src, os.path.basename(s)) for s in sources(with_cuda)]


class _FileLock:
    """An exclusive lock on a file (fcntl): concurrent builds of one key wait for the first."""

    def __init__(self, path):
        self.path, self.f = path, None

    def __enter__(self):
        self.f = open(self.path, "a+")
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as torch's own builds
            return self
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"fa-toolkit: waiting for another process that is building the fused kernels in "
                  f"{os.path.dirname(self.path)}", file=sys.stderr, flush=True)
            fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.f.close()  # closing releases the lock


def build(verbose: bool = False, require_cuda: Optional[bool] = None) -> dict:
    """Compile (if needed) and load the ops. Returns a manifest of what was built."""
    possible, info = cuda_build_possible()
    wanted, why = cuda_wanted()
    with_cuda = (possible and wanted) if require_cuda is None else require_cuda
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
    d = build_dir(with_cuda, info if with_cuda else None)
    name = NAME + ("_cuda" if with_cuda else "_cpu")
    what = "CPU + CUDA" if with_cuda else "CPU"
    t0 = time.time()
    with _FileLock(os.path.join(d, "build.lock")):
        first = not os.path.exists(os.path.join(d, f"{name}.so"))
        if first:
            print(f"fa-toolkit: compiling the fused kernels ({what}) into {d}; first use only, this takes a few "
                  f"minutes", file=sys.stderr, flush=True)
        srcs = _stage_sources(d, with_cuda)
        try:
            cpp_extension.load(
                name=name, sources=srcs, build_directory=d,
                extra_cflags=CPU_FLAGS, extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo"],
                extra_include_paths=[os.path.dirname(srcs[0])], with_cuda=with_cuda, is_python_module=False,
                verbose=verbose)
        except Exception as e:  # compiler errors come as RuntimeError / subprocess errors
            raise KernelBuildError(f"building the fused ops failed ({'with' if with_cuda else 'without'} CUDA) in "
                                   f"{d}: {e}") from e
        if first:
            print(f"fa-toolkit: fused kernels compiled in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    manifest = {
        "build_dir": d, "cuda_compiled": with_cuda, "cuda_home": info if with_cuda else None,
        "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "cuda_reason": None if with_cuda else (why if possible else info), "sources": [os.path.basename(s) for s in sources(with_cuda)],
        "objects": sorted(os.path.basename(p) for p in glob.glob(os.path.join(d, "*.o"))),
        "library": sorted(glob.glob(os.path.join(d, "*.so"))), "seconds": round(time.time() - t0, 1),
        "torch": torch.__version__, "compiled_now": first,
    }
    tmp = os.path.join(d, f"manifest.json.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, os.path.join(d, "manifest.json"))
    return manifest
