"""A small CUDA emulator for the tests: cuda_kernels/csrc/ops_cuda.cu run on the CPU, a fiber per CUDA thread.

    lib = build("plain")                  # g++, cached (build.py)
    with Emulator(lib) as emu:            # a worker process of its own (worker.py)
        r = emu.op("sign_step", x, g, c, 0.01, 0.03, 0.0, 1.0)
        r.value, r.args, r.launches, r.aten

It proves that the kernels, as the file states them, compute what reference.py computes for the inputs tried, with
every launch valid, checked and on the current stream, and every barrier and warp collective reached by all the
threads it names; under the "sanitized" build also that no kernel reads or writes outside its tensors. It cannot
show speed, data races or fast-math numerics (README, "Fused kernels"). Test infrastructure only.
"""
from __future__ import annotations

import dataclasses
import io
import os
import select
import struct
import subprocess
import sys
import tempfile
from typing import Any, List

import torch

from .build import VARIANTS, BuildError, Library, build, rewrite_launches, sanitizer_runtime  # noqa: F401

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")


class EmulatorCrash(RuntimeError):
    """The emulator process died: a sanitizer report, a segmentation fault; the message holds its stderr."""


@dataclasses.dataclass
class Result:
    value: Any  # what the op returned
    args: tuple  # the arguments after the call (in-place ops update them)
    launches: List[dict]  # per launch: kernel, file, line, grid, block, error, threads, switches
    aten: List[str]  # aten ops the host code called, in order

    def kernels(self, name: str) -> List[dict]:
        """The launches of the kernel called `name` (template arguments ignored)."""
        return [launch for launch in self.launches if launch["kernel"].split("<")[0] == name]


class Emulator:
    def __init__(self, lib: Library, timeout: float = 900.0):
        self.lib, self.timeout, self.proc = lib, timeout, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _start(self):
        env = dict(os.environ, **self.lib.env)
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, WORKER, self.lib.path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, env=env)

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def _crash(self, what: str) -> EmulatorCrash:
        proc, self.proc = self.proc, None
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        self._stderr.seek(0)
        err = self._stderr.read().decode(errors="replace")
        return EmulatorCrash(f"the emulator process {what} (exit code {code}); its stderr:\n{err[-20000:]}")

    def _read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
            if not ready:
                self.proc.kill()
                raise self._crash(f"gave no answer within {self.timeout:.0f} s")
            chunk = os.read(self.proc.stdout.fileno(), n - len(out))
            if not chunk:
                raise self._crash("died")
            out += chunk
        return out

    def _request(self, req: dict) -> dict:
        if self.proc is None:
            self._start()
        buf = io.BytesIO()
        torch.save(req, buf)
        try:
            self.proc.stdin.write(struct.pack("<Q", len(buf.getvalue())) + buf.getvalue())
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._crash("died") from None
        reply = self._read(struct.unpack("<Q", self._read(8))[0])
        reply = torch.load(io.BytesIO(reply), weights_only=False)
        if not reply["ok"]:
            raise RuntimeError(reply["error"])
        for launch in reply["launches"]:
            launch["kernel"] = self.lib.kernel_at(launch["file"], launch["line"])
        return reply

    def op(self, name: str, *args) -> Result:
        """fa_kernels::<name>(*args) with the CUDA kernel, on CPU tensors; RuntimeError with the op's message."""
        r = self._request({"kind": "op", "name": name, "args": args})
        return Result(r["result"], tuple(r["args"]), r["launches"], r["aten"])

    def selftest(self, name: str) -> Result:
        r = self._request({"kind": "selftest", "name": name})
        return Result(None, (), r["launches"], r["aten"])
