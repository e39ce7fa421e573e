"""The process the emulated CUDA kernels run in (tests/cuda_emu): `python worker.py LIBRARY`.

It loads the emulator library (and not the real fa_kernels library, whose schemas it also carries), then answers
requests from the test process: length-prefixed torch.save payloads on stdin and stdout (torch.save keeps layouts,
views and tensors that share storage, so in-place and aliasing cases arrive as built). An op runs on CPU tensors
through the dispatcher with an explicit CUDA dispatch key set, i.e. the kernel ops_cuda.cu registers for CUDA; the
reply carries its result, its (possibly updated) arguments, the emulator's launch log and the aten ops the kernel
called. A sanitizer report or a crash ends the process; the test process reads it from stderr.
"""
import io
import json
import os
import struct
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

CUDA = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


class AtenLog(TorchDispatchMode):
    """Records the aten ops a kernel's host code calls (allocations, copies, reductions)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def main():
    channel_in = os.fdopen(os.dup(0), "rb")
    channel_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to stderr, never into the channel
    torch.ops.load_library(sys.argv[1])

    def send(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()
        channel_out.write(struct.pack("<Q", len(data)) + data)
        channel_out.flush()

    while True:
        header = channel_in.read(8)
        if len(header) < 8:
            return
        req = torch.load(io.BytesIO(channel_in.read(struct.unpack("<Q", header)[0])), weights_only=False)
        try:
            torch.ops.cuda_emu.begin_op()
            log = AtenLog()
            if req["kind"] == "op":
                op = getattr(torch.ops.fa_kernels, req["name"]).default
                with log:
                    result = op.redispatch(CUDA, *req["args"])
            else:
                result = torch.ops.cuda_emu.selftest(req["name"])
            launches = json.loads(torch.ops.cuda_emu.end_op())
            send({"ok": True, "result": result, "args": req.get("args", ()), "launches": launches, "aten": log.ops})
        except Exception as e:  # the op's own error, or a rule the emulator enforces
            send({"ok": False, "error": str(e).split("\nException raised from")[0]})


if __name__ == "__main__":
    main()
