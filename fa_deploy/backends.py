"""One Backend interface: `raw(images) -> list of numpy outputs`, plus the Detector's shared `postprocess`.

Backends: the source weights (torch), ONNX Runtime (CPU; CUDA and TensorRT execution providers when
onnxruntime-gpu is installed) and TensorRT engines (`execute_async_v3`; device buffers from torch CUDA tensors
when torch has CUDA, else from pycuda, so a deployment service can run an engine without PyTorch).
Comparisons therefore measure the network, not the post-processing.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .export import check_onnx, read_sidecar


class BackendError(RuntimeError):
    pass


ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


class Backend:
    name = "backend"
    format = "?"
    precision = "?"
    path: Optional[str] = None

    def raw(self, images: np.ndarray) -> List[np.ndarray]:
        raise NotImplementedError

    @property
    def size_mb(self) -> float:
        return os.path.getsize(self.path) / 2**20 if self.path and os.path.isfile(self.path) else float("nan")


class TorchBackend(Backend):
    format = "torch"

    def __init__(self, model, path: Optional[str] = None, device="cpu"):
        import torch

        self.model, self.path, self.device = model.eval(), path, torch.device(device)
        self.module = model.export_module().eval()
        self.name = "source"
        self.precision = str(next(model.parameters()).dtype).replace("torch.float", "fp")

    def raw(self, images):
        import torch

        with torch.inference_mode():
            out = self.module(torch.as_tensor(images, device=self.device))
        outs = out if isinstance(out, (list, tuple)) else (out,)
        return [o.float().cpu().numpy() for o in outs]


class OrtBackend(Backend):
    format = "onnx"

    def __init__(self, path: str, providers: Optional[List[str]] = None, threads: Optional[int] = None):
        import onnxruntime as ort

        check_onnx(path)
        self.path, self.sidecar = path, read_sidecar(path)
        self.precision = (self.sidecar or {}).get("precision", "?")
        self.name = os.path.basename(path)
        avail = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in avail]
            providers.append("CPUExecutionProvider")
        missing = [p for p in providers if p not in avail]
        if missing:
            raise BackendError(f"{path}: ONNX Runtime providers {missing} are not available (have {avail})")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(path, so, providers=providers)
        except Exception as e:
            raise BackendError(f"{path}: ONNX Runtime cannot load it ({e})") from e
        self.providers = self.session.get_providers()
        self.input_name = self.session.get_inputs()[0].name  # INPUT_NAME for whole detectors
        self.output_names = [o.name for o in self.session.get_outputs()]

    def raw(self, images):
        return self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})


class TrtBackend(Backend):
    """A serialized TensorRT engine, run with execute_async_v3 on one CUDA stream."""

    format = "tensorrt"

    def __init__(self, path: str):
        from .tensorrt import check_engine_compatible, import_tensorrt

        trt = import_tensorrt()
        self.path, self.sidecar = path, read_sidecar(path)
        check_engine_compatible(self.sidecar, path)
        self.precision = self.sidecar.get("precision", "?")
        self.name = os.path.basename(path)
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with open(path, "rb") as f:
            self.engine = self.runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise BackendError(f"{path}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        try:
            import torch

            self._torch = torch if torch.cuda.is_available() else None
        except ImportError:
            self._torch = None

    def _np_dtype(self, name):
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    def raw(self, images):
        images = np.ascontiguousarray(images, dtype=self._np_dtype(self.inputs[0]))
        self.context.set_input_shape(self.inputs[0], images.shape)
        if self._torch is not None:
            return self._raw_torch(images)
        return self._raw_pycuda(images)

    def _raw_torch(self, images):
        torch = self._torch
        x = torch.from_numpy(images).cuda()
        self.context.set_tensor_address(self.inputs[0], x.data_ptr())
        outs = []
        for n in self.outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            o = torch.empty(shape, dtype=getattr(torch, str(self._np_dtype(n))), device="cuda")
            self.context.set_tensor_address(n, o.data_ptr())
            outs.append(o)
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise BackendError(f"{self.path}: execute_async_v3 failed")
        stream.synchronize()
        return [o.cpu().numpy() for o in outs]

    def _raw_pycuda(self, images):
        import pycuda.autoprimaryctx  # noqa: F401  (shares the primary context)
        import pycuda.driver as cuda

        stream = cuda.Stream()
        d_in = cuda.mem_alloc(images.nbytes)
        cuda.memcpy_htod_async(d_in, images, stream)
        self.context.set_tensor_address(self.inputs[0], int(d_in))
        hosts, devs = [], []
        for n in self.outputs:
            h = cuda.pagelocked_empty(tuple(self.context.get_tensor_shape(n)), self._np_dtype(n))
            d = cuda.mem_alloc(h.nbytes)
            self.context.set_tensor_address(n, int(d))
            hosts.append(h)
            devs.append(d)
        if not self.context.execute_async_v3(stream.handle):
            raise BackendError(f"{self.path}: execute_async_v3 failed")
        for h, d in zip(hosts, devs):
            cuda.memcpy_dtoh_async(h, d, stream)
        stream.synchronize()
        return [np.array(h) for h in hosts]


def open_network(path: str, providers: Optional[List[str]] = None) -> Backend:
    """One network file: an ONNX file (ONNX Runtime) or a serialized TensorRT engine. Whole deployments, pipeline
    manifests included, are opened by `fa_deploy.loading.load_backend`."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".onnx":
        return OrtBackend(path, providers)
    if ext in ENGINE_SUFFIXES:
        return TrtBackend(path)
    raise BackendError(f"--backend {path}: unknown format (expected .onnx, .engine or .pipeline.json)")


def run_batched(raw: Callable[[np.ndarray], List[np.ndarray]], images: np.ndarray,
                batch_range: Sequence[int]) -> List[np.ndarray]:
    """`raw` over `images` in chunks the network accepts: at most MAX of its batch range (MIN:OPT:MAX); a chunk
    smaller than MIN (a static batch's remainder) is padded with copies of its last image and the padding's
    outputs are dropped. Outputs are concatenated along the batch axis."""
    lo, _, hi = (int(b) for b in batch_range)
    if len(images) == 0:
        raise BackendError("no images to run")
    parts = []
    for i in range(0, len(images), hi):
        chunk = images[i:i + hi]
        n = len(chunk)
        if n < lo:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], lo - n, axis=0)])
        outs = raw(chunk)
        parts.append([np.asarray(o)[:n] for o in outs])
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def measure_latency(backend: Backend, postprocess, images: np.ndarray, warmup: int = 3, iters: int = 10,
                    preprocess=None) -> Dict:
    """Median and p90 ms per image of the network, and of pre/post-processing separately (warm-up first).
    `preprocess()` prepares one image (decode + letterbox) and is timed on its own."""
    for _ in range(warmup):
        backend.raw(images)
    net, post, pre = [], [], []
    for _ in range(iters):
        if preprocess is not None:
            tp = time.perf_counter()
            preprocess()
            pre.append((time.perf_counter() - tp) * 1000)
        t0 = time.perf_counter()
        raw = backend.raw(images)
        t1 = time.perf_counter()
        postprocess(raw)
        t2 = time.perf_counter()
        net.append((t1 - t0) * 1000 / len(images))
        post.append((t2 - t1) * 1000 / len(images))
    net.sort()
    post.sort()
    return {"ms_median": net[len(net) // 2], "ms_p90": net[min(len(net) - 1, int(0.9 * len(net)))],
            "post_ms_median": post[len(post) // 2], "images_per_s": 1000.0 / max(net[len(net) // 2], 1e-9),
            "pre_ms_median": sorted(pre)[len(pre) // 2] if pre else None}
