"""Builds the CUDA emulator library the tests load (test infrastructure, never part of the package).

The library is cuda_kernels/csrc/ops_cuda.cu itself, compiled by g++ as C++ with its launches rewritten
(`kernel<<<cfg>>>(` -> `launch(kernel, cfg)(`, nothing else changes, line numbers included), include/cuda_emu.h
force-included and include/c10/cuda/* standing in for the three c10/cuda headers it includes; beside it the op schemas
and shared argument checks (csrc/fa_ops.cpp), the emulator (emulator.cpp) and its self-test kernels (selftest.cu).
No nvcc and no GPU are needed; `python -m cuda_kernels build` still compiles the same file with nvcc.

Line tables only (-g1: sanitizer reports name file and line; full -g doubles the compile time of ATen's headers).
Variants: "plain" (with UndefinedBehaviorSanitizer's cheap alignment check, which catches a vector access through a
misaligned pointer) and "sanitized" (AddressSanitizer + UndefinedBehaviorSanitizer; its process needs libasan
preloaded, see Library.env). Objects and libraries are cached under $FA_KERNELS_BUILD/cuda-emu (build/kernels when
unset), keyed by their sources, flags, compiler and torch version; a compile error raises BuildError with the compiler's
output.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(REPO, "cuda_kernels", "csrc")
INCLUDE = os.path.join(HERE, "include")
OPS_CUDA = os.path.join(CSRC, "ops_cuda.cu")

VARIANTS = {
    "plain": ["-O1", "-fsanitize=alignment", "-fno-sanitize-recover=all"],
    "sanitized": ["-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
}
SANITIZER_OPTIONS = {
    # Python and torch keep memory until exit (not leaks of the kernels); torch's libraries are not instrumented
    "ASAN_OPTIONS": "detect_leaks=0:detect_odr_violation=0:halt_on_error=1:abort_on_error=0",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}


class BuildError(RuntimeError):
    pass


@dataclasses.dataclass
class Library:
    path: str
    variant: str
    kernels: Dict[str, str]  # "file:line" of each launch -> the kernel expression launched there
    env: Dict[str, str]  # environment a process loading the library needs
    source: str = ""  # the ops_cuda.cu text it was built from (before the launch rewrite)

    def kernel_at(self, file: str, line: int) -> str:
        return self.kernels.get(f"{file}:{line}", f"?{file}:{line}")


def _macro_lines(src: str, pos: int) -> List[int]:
    """Lines of the macro invocations (an ALL_CAPS name before an unclosed parenthesis, e.g. AT_DISPATCH_...) that
    enclose pos: g++ reports a launch written inside a macro's arguments at the macro's line."""
    lines, depth, i = [], 0, pos
    while i > 0:
        i -= 1
        c = src[i]
        if c == ")":
            depth += 1
        elif c == "(":
            if depth:
                depth -= 1
            else:
                m = re.search(r"\b([A-Z][A-Z0-9_]+)\s*$", src[max(0, i - 80):i])
                if m:
                    lines.append(src.count("\n", 0, i - len(m.group(0)) + m.start(1)) + 1)
    return lines


def rewrite_launches(src: str, name: str = "source") -> Tuple[str, List[dict]]:
    """`kernel<<<cfg>>>(` -> `launch(kernel, cfg)(`; returns the new text and each launch's line and kernel, and the
    lines of the macros around it ("macro_lines")."""
    out, launches, pos = [], [], 0
    while True:
        i = src.find("<<<", pos)
        if i < 0:
            break
        # the callee: an identifier (qualified), possibly with template arguments, right before <<<
        j = i
        while j > 0 and src[j - 1] in " \t":
            j -= 1
        if j > 0 and src[j - 1] == ">":
            depth = 0
            while j > 0:
                j -= 1
                depth += {">": 1, "<": -1}.get(src[j], 0)
                if depth == 0:
                    break
        while j > 0 and (src[j - 1].isalnum() or src[j - 1] in "_:"):
            j -= 1
        callee = src[j:i].strip()
        k = src.find(">>>", i + 3)
        m = re.compile(r"\s*\(").match(src, k + 3) if k >= 0 else None
        if not callee or not re.match(r"[A-Za-z_]", callee) or m is None:
            raise BuildError(f"{name}: cannot parse the launch at offset {i}: {src[j:i + 80]!r}")
        cfg = src[i + 3:k]
        line = src.count("\n", 0, j) + 1
        if "\n" in src[j:k]:
            raise BuildError(f"{name}:{line}: a launch's kernel and <<<...>>> must be on one line")
        out.append(src[pos:j])
        out.append(f"launch({callee}, {cfg.strip()})(")
        launches.append({"line": line, "kernel": callee, "macro_lines": _macro_lines(src, j)})
        pos = m.end()
    out.append(src[pos:])
    text = "".join(out)
    if ">>>" in text or text.count("\n") != src.count("\n"):
        raise BuildError(f"{name}: the launch rewrite left '>>>' behind or moved lines")
    return text, launches


def _torch_paths():
    import torch

    root = os.path.dirname(torch.__file__)
    inc = os.path.join(root, "include")
    return ([inc, os.path.join(inc, "torch", "csrc", "api", "include")], os.path.join(root, "lib"),
            int(torch._C._GLIBCXX_USE_CXX11_ABI), torch.__version__)


def _compiler() -> str:
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise BuildError("no C++ compiler (g++) on PATH")
    return cxx


def _runtime_library(cxx: str, name: str) -> Optional[str]:
    out = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True)
    path = out.stdout.strip()
    return os.path.realpath(path) if os.path.isabs(path) and os.path.exists(path) else None


def sanitizer_runtime(cxx: Optional[str] = None) -> Optional[str]:
    """LD_PRELOAD for a Python process that loads an AddressSanitizer build: libasan first, and libstdc++ beside it
    (Python loads libstdc++ only later, with torch, and ASan's exception interceptor must find it at start-up);
    None when the compiler has no AddressSanitizer runtime."""
    cxx = cxx or _compiler()
    asan, stdcxx = _runtime_library(cxx, "libasan.so"), _runtime_library(cxx, "libstdc++.so")
    return " ".join(p for p in (asan, stdcxx) if p) if asan else None


def build_root() -> str:
    base = os.environ.get("FA_KERNELS_BUILD") or os.path.join(REPO, "build", "kernels")
    return os.path.join(base, "cuda-emu")


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _headers_digest() -> str:
    files = sorted(glob.glob(os.path.join(INCLUDE, "**", "*.h"), recursive=True) + glob.glob(os.path.join(CSRC, "*.h")))
    return _digest(*[open(f, "rb").read() for f in files], *files)


def build(variant: str = "plain", cu_text: Optional[str] = None, tag: str = "ops", verbose: bool = False) -> Library:
    """Compile (or find in the cache) the emulator library; cu_text replaces ops_cuda.cu (a deliberately broken copy)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    cxx = _compiler()
    includes, libdir, abi, torch_version = _torch_paths()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    env = {}
    if variant == "sanitized":
        rt = sanitizer_runtime(cxx)
        if rt is None:
            raise BuildError(f"{cxx} has no AddressSanitizer runtime (libasan.so)")
        env = {"LD_PRELOAD": rt, **SANITIZER_OPTIONS}
    else:
        env = {"UBSAN_OPTIONS": SANITIZER_OPTIONS["UBSAN_OPTIONS"]}

    root = build_root()
    os.makedirs(os.path.join(root, "obj"), exist_ok=True)
    os.makedirs(os.path.join(root, "src"), exist_ok=True)
    flags = ["-std=c++20", "-fPIC", "-g1", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-I", INCLUDE, "-I", CSRC,
             *[a for p in includes for a in ("-isystem", p)], *VARIANTS[variant]]
    common = _digest(version, torch_version, flags, _headers_digest())

    # (name, source file or None for rewritten text, text, force-include the CUDA prelude)
    cu = open(OPS_CUDA).read() if cu_text is None else cu_text
    ops_name = "ops_cuda" if cu_text is None else f"ops_cuda_{tag}"
    ops_text, ops_launches = rewrite_launches(cu, "ops_cuda.cu")
    st_text, st_launches = rewrite_launches(open(os.path.join(HERE, "selftest.cu")).read(), "selftest.cu")
    emulator, fa_ops = os.path.join(HERE, "emulator.cpp"), os.path.join(CSRC, "fa_ops.cpp")
    units = [("emulator", emulator, open(emulator).read(), False), ("fa_ops", fa_ops, open(fa_ops).read(), False),
             ("selftest", None, st_text, True), (ops_name, None, ops_text, True)]
    kernels = {}
    for name, launches in ((ops_name, ops_launches), ("selftest", st_launches)):
        for launch in launches:
            kernels[f"{name}_emu.cpp:{launch['line']}"] = launch["kernel"]
        for launch in launches:  # a launch inside a macro is reported at the macro's line: all the kernels there
            for line in launch["macro_lines"]:
                key = f"{name}_emu.cpp:{line}"
                if launch["kernel"] not in kernels.get(key, "").split(" | "):
                    kernels[key] = " | ".join(filter(None, [kernels.get(key), launch["kernel"]]))

    with open(os.path.join(root, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test process may build the same objects
        jobs, objects = [], []
        for name, src, text, prelude in units:
            key = _digest(common, text, prelude)
            obj = os.path.join(root, "obj", f"{name}-{variant}-{key}.o")
            objects.append(obj)
            if os.path.exists(obj):
                continue
            if src is None:  # the rewritten source, under the name the emulator's messages and launch log use
                src = os.path.join(root, "src", key, f"{name}_emu.cpp")
                os.makedirs(os.path.dirname(src), exist_ok=True)
                with open(src, "w") as f:
                    f.write(text)
            cmd = [cxx, *flags, *(["-include", "cuda_emu.h"] if prelude else []), "-c", src, "-o", obj + ".tmp"]
            jobs.append((cmd, obj))
        lib = os.path.join(root, f"fa_cuda_emu-{variant}-{tag}-{_digest(*objects)}.so")
        if jobs:
            with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                results = list(pool.map(lambda j: (j, subprocess.run(j[0], capture_output=True, text=True)), jobs))
            for (cmd, obj), r in results:
                if r.returncode != 0:
                    raise BuildError(f"compiling {cmd[-3]} failed:\n{' '.join(cmd)}\n{r.stderr[-20000:]}")
                if verbose and r.stderr:
                    print(r.stderr)
                os.replace(obj + ".tmp", obj)
        if not os.path.exists(lib):
            cmd = [cxx, "-shared", *VARIANTS[variant], *objects, "-o", lib + ".tmp", "-L", libdir,
                   f"-Wl,-rpath,{libdir}", "-lc10", "-ltorch_cpu"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise BuildError(f"linking {lib} failed:\n{' '.join(cmd)}\n{r.stderr[-20000:]}")
            os.replace(lib + ".tmp", lib)
    with open(lib + ".json", "w") as f:
        json.dump({"variant": variant, "kernels": kernels, "env": env}, f, indent=1)
    return Library(lib, variant, kernels, env, cu)


if __name__ == "__main__":  # python tests/cuda_emu/build.py [variant]: build and print where the library is
    import sys
    import time

    t0 = time.time()
    lib = build(*(sys.argv[1:2] or ["plain"]), verbose=True)
    print(f"{lib.path} ({time.time() - t0:.1f} s)")
