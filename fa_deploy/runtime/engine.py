"""The engine runner a deployment service imports: a serialized TensorRT engine run with tensorrt, numpy and a CUDA
binding (cuda-python or pycuda) only. `from fa_deploy.runtime import EngineRunner` never imports torch or onnx.

    from fa_deploy.runtime import EngineRunner
    runner = EngineRunner("last.fp16.engine")          # checks the engine's TensorRT version and GPU first
    outputs = runner.raw(images)                        # float32 [N, 3, H, W] in [0, 1], any N

- Tensors are addressed by name (TensorRT does not promise that its I/O index order follows the ONNX file's):
  outputs come back in the order the sidecar records (`outputs`), never in the engine's index order.
- The batch range is the engine's optimization profile; `raw` runs any number of images in chunks that fit it
  (a static batch's remainder padded and trimmed), checks `set_input_shape`'s answer and every output shape,
  and refuses clearly what cannot fit.
- One CUDA stream of its own (not the legacy default stream), page-locked host buffers and device buffers kept
  across calls and reallocated only when a shape grows.

`run_batched` and `BackendError` live here too so that every backend (ONNX Runtime, TensorRT, pipelines) shares
them without importing torch.
"""
from __future__ import annotations

import ctypes
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from fa_deploy.runtime.metadata import read_sidecar


class BackendError(RuntimeError):
    pass


def run_batched(raw: Callable[[np.ndarray], List[np.ndarray]], images: np.ndarray,
                batch_range: Sequence[Optional[int]]) -> List[np.ndarray]:
    """`raw` over `images` in chunks the network accepts: at most MAX of its batch range (MIN:OPT:MAX; MAX None =
    any); a chunk smaller than MIN (a static batch's remainder) is padded with copies of its last image and the
    padding's outputs are dropped. Every output must have one row per image of its chunk; outputs are concatenated
    along the batch axis."""
    lo, _, hi = batch_range
    lo = int(lo or 1)
    if len(images) == 0:
        raise BackendError("no images to run")
    hi = len(images) if hi is None else int(hi)
    parts = []
    for i in range(0, len(images), hi):
        chunk = images[i:i + hi]
        n = len(chunk)
        if n < lo:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], lo - n, axis=0)])
        outs = raw(chunk)
        for j, o in enumerate(outs):
            if np.ndim(o) == 0 or len(o) != len(chunk):
                raise BackendError(f"output {j} has {np.shape(o)[0] if np.ndim(o) else 'no'} rows for a batch of "
                                   f"{len(chunk)}: the network does not keep one row per input")
        parts.append([np.asarray(o)[:n] for o in outs])
    if len(parts) == 1:
        return parts[0]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


# -- CUDA buffers: the same few calls over cuda-python or pycuda -------------------------------------------------

class _CudaPython:
    """cuda-python (`cuda.bindings.runtime`, or the older `cuda.cudart`): what NVIDIA's TensorRT samples use."""

    name = "cuda-python"

    def __init__(self):
        try:
            from cuda.bindings import runtime as rt
        except ImportError:
            from cuda import cudart as rt  # cuda-python < 12.6
        self.rt = rt
        self.stream = self._ok(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate")

    def _ok(self, res, what):
        err, *rest = res if isinstance(res, tuple) else (res,)
        if int(err) != 0:
            raise BackendError(f"CUDA error in {what}: {err}")
        return rest[0] if len(rest) == 1 else (rest or None)

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def device_alloc(self, nbytes: int) -> int:
        return int(self._ok(self.rt.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))

    def device_free(self, ptr: int) -> None:
        self._ok(self.rt.cudaFree(ptr), "cudaFree")

    def host_alloc(self, nbytes: int) -> np.ndarray:
        ptr = int(self._ok(self.rt.cudaMallocHost(max(nbytes, 1)), "cudaMallocHost"))
        buf = (ctypes.c_ubyte * max(nbytes, 1)).from_address(ptr)
        arr = np.ctypeslib.as_array(buf)[:nbytes]
        self._hosts = getattr(self, "_hosts", {})
        self._hosts[id(arr)] = ptr
        return arr

    def host_free(self, arr: np.ndarray) -> None:
        ptr = getattr(self, "_hosts", {}).pop(id(arr), None)
        if ptr is not None:
            self._ok(self.rt.cudaFreeHost(ptr), "cudaFreeHost")

    def htod(self, dst: int, src: np.ndarray, nbytes: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._ok(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, nbytes, kind, self.stream), "cudaMemcpyAsync")

    def dtoh(self, dst: np.ndarray, src: int, nbytes: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._ok(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, nbytes, kind, self.stream), "cudaMemcpyAsync")

    def synchronize(self) -> None:
        self._ok(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")


class _PyCuda:
    """pycuda, on the primary context (`pycuda.autoprimaryctx`), so it shares the device with other libraries."""

    name = "pycuda"

    def __init__(self):
        import pycuda.autoprimaryctx  # noqa: F401
        import pycuda.driver as cuda

        self.cuda = cuda
        self.stream = cuda.Stream()
        self._allocs: Dict[int, object] = {}

    @property
    def stream_handle(self) -> int:
        return int(self.stream.handle)

    def device_alloc(self, nbytes: int) -> int:
        mem = self.cuda.mem_alloc(max(nbytes, 1))
        self._allocs[int(mem)] = mem
        return int(mem)

    def device_free(self, ptr: int) -> None:
        mem = self._allocs.pop(ptr, None)
        if mem is not None:
            mem.free()

    def host_alloc(self, nbytes: int) -> np.ndarray:
        return self.cuda.pagelocked_empty(max(nbytes, 1), np.uint8)[:nbytes]

    def host_free(self, arr: np.ndarray) -> None:
        pass  # page-locked numpy arrays are freed with the array

    def htod(self, dst: int, src: np.ndarray, nbytes: int) -> None:
        self.cuda.memcpy_htod_async(dst, src[:nbytes], self.stream)

    def dtoh(self, dst: np.ndarray, src: int, nbytes: int) -> None:
        self.cuda.memcpy_dtoh_async(dst[:nbytes], src, self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()


def cuda_api(prefer: str = "auto"):
    """The CUDA binding for buffers and streams: `pycuda`, `cuda-python`, or `auto` (pycuda when it imports, else
    cuda-python, which ships wheels and comes with PyTorch's CUDA builds)."""
    order = {"auto": (_PyCuda, _CudaPython), "pycuda": (_PyCuda,), "cuda-python": (_CudaPython,)}.get(prefer)
    if order is None:
        raise BackendError(f"unknown CUDA binding {prefer!r} (pycuda, cuda-python or auto)")
    errors = []
    for cls in order:
        try:
            return cls()
        except ImportError as e:
            errors.append(f"{cls.name}: {e}")
    raise BackendError("no CUDA binding for the engine's buffers: pip install cuda-python (or pycuda); "
                       + "; ".join(errors))


class _Buffer:
    """A device buffer and its page-locked host twin, grown (never shrunk) to the largest size asked for."""

    def __init__(self, api):
        self.api, self.nbytes, self.device, self.host = api, 0, None, None

    def ensure(self, nbytes: int) -> None:
        nbytes = max(int(nbytes), 1)
        if nbytes <= self.nbytes:
            return
        self.release()
        self.device, self.host, self.nbytes = self.api.device_alloc(nbytes), self.api.host_alloc(nbytes), nbytes

    def release(self) -> None:
        if self.device is not None:
            self.api.device_free(self.device)
            self.api.host_free(self.host)
        self.device, self.host, self.nbytes = None, None, 0


def _dims(d) -> Tuple[int, ...]:
    return tuple(int(v) for v in d)


class EngineRunner:
    """A serialized TensorRT engine with one input: `raw(images) -> outputs` in the sidecar's order."""

    def __init__(self, path: str, sidecar: Optional[dict] = None, cuda: str = "auto", check_compatible: bool = True,
                 output_names: Optional[Sequence[str]] = None):
        from fa_deploy.runtime.tensorrt import check_engine_compatible, import_tensorrt

        trt = import_tensorrt()
        self.trt, self.path = trt, path
        self.sidecar = sidecar if sidecar is not None else read_sidecar(path)
        if check_compatible:
            check_engine_compatible(self.sidecar, path)
        self.api = cuda_api(cuda)  # before deserialising: the binding makes the CUDA context current
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with open(path, "rb") as f:
            self.engine = self.runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise BackendError(f"{path}: TensorRT could not deserialize the engine (see the log above)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"{path}: TensorRT could not create an execution context (out of GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode.INPUT]
        outputs = {n for n in names if self.engine.get_tensor_mode(n) == mode.OUTPUT}
        if len(inputs) != 1:
            raise BackendError(f"{path}: expected one input tensor, the engine has {inputs}")
        self.input = inputs[0]
        recorded = list(output_names or (self.sidecar or {}).get("outputs") or [])
        if set(recorded) != outputs or len(recorded) != len(outputs):
            raise BackendError(f"{path}: the engine's outputs {sorted(outputs)} are not the ones its sidecar records "
                               f"({recorded}); re-export it with fa-export --engine")
        self.outputs = recorded  # by name, in the order the ONNX file and its consumers use
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in [self.input, *recorded]}
        self.batch_range = self._profile_batch_range()
        self.buffers = {n: _Buffer(self.api) for n in [self.input, *recorded]}

    def _profile_batch_range(self) -> Tuple[int, int, int]:
        static = _dims(self.engine.get_tensor_shape(self.input))
        if static and static[0] >= 0:
            return (static[0], static[0], static[0])
        if self.engine.num_optimization_profiles < 1:
            raise BackendError(f"{self.path}: dynamic input {self.input!r} but no optimization profile")
        lo, opt, hi = (_dims(s) for s in self.engine.get_tensor_profile_shape(self.input, 0))
        self.profile = (lo, opt, hi)
        return (lo[0], opt[0], hi[0])

    @property
    def stream_handle(self) -> int:
        return self.api.stream_handle

    def raw(self, images: np.ndarray) -> List[np.ndarray]:
        images = np.asarray(images)
        if images.ndim < 1 or len(images) == 0:
            raise BackendError(f"{self.path}: no images to run")
        return run_batched(self._run, images, self.batch_range)

    def _run(self, x: np.ndarray) -> List[np.ndarray]:
        x = np.ascontiguousarray(x, dtype=self.dtypes[self.input])
        ctx = self.context
        if not ctx.set_input_shape(self.input, tuple(x.shape)):
            raise BackendError(f"{self.path}: input shape {tuple(x.shape)} is outside the engine's profile "
                               f"(batch {self.batch_range[0]}..{self.batch_range[2]}"
                               + (f", shapes {self.profile[0]}..{self.profile[2]}" if hasattr(self, "profile") else
                                  f", shape {_dims(self.engine.get_tensor_shape(self.input))}") + ")")
        shapes = {}
        for n in self.outputs:
            s = _dims(ctx.get_tensor_shape(n))
            if any(d < 0 for d in s):
                raise BackendError(f"{self.path}: output {n!r} has unresolved shape {s} for input {tuple(x.shape)}")
            shapes[n] = s
        bufs = self.buffers
        bufs[self.input].ensure(x.nbytes)
        sizes = {n: int(np.prod(shapes[n], dtype=np.int64)) * self.dtypes[n].itemsize for n in self.outputs}
        for n in self.outputs:
            bufs[n].ensure(sizes[n])
        for n in [self.input, *self.outputs]:
            if not ctx.set_tensor_address(n, bufs[n].device):
                raise BackendError(f"{self.path}: TensorRT refused the buffer of {n!r}")
        host_in = bufs[self.input].host
        host_in[:x.nbytes] = x.reshape(-1).view(np.uint8)
        self.api.htod(bufs[self.input].device, host_in, x.nbytes)
        if not ctx.execute_async_v3(self.api.stream_handle):
            raise BackendError(f"{self.path}: execute_async_v3 failed (see the TensorRT log above)")
        for n in self.outputs:
            self.api.dtoh(bufs[n].host, bufs[n].device, sizes[n])
        self.api.synchronize()
        return [bufs[n].host[:sizes[n]].view(self.dtypes[n]).reshape(shapes[n]).copy() for n in self.outputs]

    def close(self) -> None:
        for b in self.buffers.values():
            b.release()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the CUDA context may be gone already
            pass

