"""One Backend interface: `raw(images) -> list of numpy outputs`, plus the Detector's shared `postprocess`.

Backends: the source weights (torch), ONNX Runtime (CPU; CUDA and TensorRT execution providers with
onnxruntime-gpu) and TensorRT engines (`fa_deploy.runtime.engine.EngineRunner`: execute_async_v3 on a stream of its own,
buffers from cuda-python or pycuda, no torch). Comparisons therefore measure the network, not the post-processing.

Every backend knows the batch range of its file (`batch_range` = MIN, OPT, MAX; MAX None = any) and its `raw`
takes any number of images, running chunks that fit. Every backend names what actually ran it (`provider`):
a requested GPU execution provider of ONNX Runtime that did not load is an error unless CPU fallback was asked for.
This module imports neither torch nor onnx at import time.
"""
from __future__ import annotations

import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from fa_deploy.runtime.metadata import check_onnx, onnx_batch_range, onnx_metadata, read_sidecar
from fa_deploy.runtime.engine import BackendError, EngineRunner, run_batched

__all__ = ["Backend", "BackendError", "TorchBackend", "OrtBackend", "TrtBackend", "open_network", "run_batched",
           "measure_latency", "resolve_providers", "PROVIDERS", "ENGINE_SUFFIXES"]

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
# short names accepted by --provider, and how rows name them
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
_SHORT = {v: k for k, v in PROVIDERS.items()}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class Backend:
    name = "backend"
    format = "?"
    precision = "?"
    provider = "?"  # what actually runs it: torch-cpu, ort-cpu, ort-cuda, ort-tensorrt, tensorrt
    batch_range = (1, 1, None)
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
        self.provider = f"torch-{self.device.type}"

    def raw(self, images):
        import torch

        with torch.inference_mode():
            out = self.module(torch.as_tensor(images, device=self.device))
        outs = out if isinstance(out, (list, tuple)) else (out,)
        return [o.float().cpu().numpy() for o in outs]


def import_onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendError("ONNX Runtime is not installed: pip install -e '.[cpu]' (CPU) or -e '.[gpu]' (NVIDIA GPU: "
                           "onnxruntime-gpu; never both)") from e
    return ort


def resolve_providers(requested: Optional[Sequence[str]], available: Sequence[str]) -> List[str]:
    """Full ONNX Runtime provider names for `requested` (short names cpu/cuda/tensorrt or full names; None = auto:
    CUDA when onnxruntime-gpu offers it, else the CPU). The CPU provider always comes last, as ONNX Runtime's own
    fallback for the nodes a GPU provider does not take."""
    if not requested:
        names = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []
    else:
        names = []
        for p in requested:
            full = PROVIDERS.get(p.lower(), p) if isinstance(p, str) else p
            if full not in PROVIDERS.values():
                raise BackendError(f"--provider {p}: unknown ONNX Runtime provider (cpu, cuda or tensorrt)")
            names.append(full)
        missing = [p for p in names if p not in available]
        if missing:
            raise BackendError(f"ONNX Runtime providers {[_SHORT[p] for p in missing]} are not in this build "
                               f"(it has {list(available)}): install onnxruntime-gpu (pip install -e '.[gpu]') "
                               f"instead of onnxruntime")
    if "TensorrtExecutionProvider" in names and "CUDAExecutionProvider" not in names \
            and "CUDAExecutionProvider" in available:
        names.insert(names.index("TensorrtExecutionProvider") + 1, "CUDAExecutionProvider")
    if "CPUExecutionProvider" not in names:
        names.append("CPUExecutionProvider")
    return names


class OrtBackend(Backend):
    format = "onnx"

    def __init__(self, path: str, providers: Optional[Sequence[str]] = None, threads: Optional[int] = None,
                 allow_cpu_fallback: bool = False, trt_cache_dir: Optional[str] = None):
        ort = import_onnxruntime()
        model = check_onnx(path)
        self.path, self.sidecar = path, read_sidecar(path)
        side = self.sidecar or {}
        self.metadata = onnx_metadata(model)  # what the file records about itself (fa-export writes it)
        self.precision = side.get("precision") or self.metadata.get("precision", "?")
        self.name = os.path.basename(path)
        self.input_name = [i.name for i in model.graph.input
                           if i.name not in {x.name for x in model.graph.initializer}][0]
        self.batch_range = self._batch_range(model, side, self.metadata)
        requested = resolve_providers(providers, ort.get_available_providers())
        self.requested = requested
        options = [self._provider_options(p, trt_cache_dir) for p in requested]
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        source = path
        if self.precision == "int8" and requested[0] == "CPUExecutionProvider":
            # ONNX Runtime's default x86 integer kernels on CPUs without VNNI multiply u8 x s8 with vpmaddubsw,
            # which saturates pairs of products at int16: another function than the file's (measured on the test
            # fixture: mean |difference| 0.84 against outputs of mean magnitude 15.6). The high-precision mode
            # computes the file's function on every x86 CPU, as TensorRT and VNNI CPUs do (a no-op where VNNI is
            # there, and for the GPU providers).
            so.add_session_config_entry("session.x64quantprecision", "1")
            # its s8 -> u8 pass fails on constants shared between nodes ("Attempt to replace the existing tensor",
            # e.g. Faster R-CNN's RPN head serving five FPN levels): load a copy with them repeated per reader
            unshare_constants(model)
            source = model.SerializeToString()
        try:
            self.session = ort.InferenceSession(source, so, providers=requested, provider_options=options)
        except Exception as e:
            raise BackendError(f"{path}: ONNX Runtime cannot load it ({type(e).__name__}: "
                               f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
        del model, source
        self.allow_cpu_fallback = allow_cpu_fallback
        if not allow_cpu_fallback:
            self.session.disable_fallback()  # a failing GPU provider must not silently rerun on the CPU
        self._check_providers()
        self.output_names = [o.name for o in self.session.get_outputs()]

    @staticmethod
    def _batch_range(model, side, metadata):
        lo, opt, hi = onnx_batch_range(model)
        if hi is None:  # a symbolic batch axis: any batch runs; chunk by the exported range when one is recorded
            rec = side.get("input", {}).get("batch") if isinstance(side.get("input"), dict) else None
            rec = rec if isinstance(rec, (list, tuple)) else metadata.get("batch_range")
            if isinstance(rec, (list, tuple)) and len(rec) == 3:
                return (1, int(rec[1]), int(rec[2]))
        return (lo, opt, hi)

    def _provider_options(self, provider: str, trt_cache_dir: Optional[str]) -> dict:
        if provider != "TensorrtExecutionProvider":
            return {}
        side = self.sidecar or {}
        cache = trt_cache_dir or (os.path.splitext(self.path)[0] + ".ort-trt-cache")
        os.makedirs(cache, exist_ok=True)
        opts = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": "True", "trt_timing_cache_path": cache,
                "trt_fp16_enable": str(self.precision == "fp16"), "trt_int8_enable": str(self.precision == "int8")}
        shape = side.get("input", {}).get("shape") if isinstance(side.get("input"), dict) else None
        lo, opt, hi = self.batch_range
        if shape and hi is not None and lo != hi:  # a dynamic batch: TensorRT's profile is the exported range
            rest = "x".join(str(int(d)) for d in shape[1:])
            for key, b in (("min", lo), ("opt", opt), ("max", hi)):
                opts[f"trt_profile_{key}_shapes"] = f"{self.input_name}:{b}x{rest}"
        return opts

    def _check_providers(self) -> None:
        active = list(self.session.get_providers())
        lost = [p for p in self.requested if p in GPU_PROVIDERS and p not in active]
        if lost and not self.allow_cpu_fallback:
            raise BackendError(f"{self.path}: ONNX Runtime could not start {[_SHORT[p] for p in lost]} (active: "
                               f"{[_SHORT.get(p, p) for p in active]}; see ONNX Runtime's log for the library that "
                               f"failed to load); pass --allow-cpu-fallback to run on what loaded")
        first = next((p for p in active if p in self.requested), active[0] if active else "CPUExecutionProvider")
        self.provider = "ort-" + _SHORT.get(first, first)
        self.active_providers = active

    def _run(self, x):
        out = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        if self.allow_cpu_fallback:
            self._check_providers()  # ONNX Runtime may have fallen back during the run: name what ran
        return out

    def raw(self, images):
        images = np.asarray(images)
        try:
            return run_batched(self._run, images, self.batch_range)
        except BackendError:
            raise
        except Exception as e:  # onnxruntime's own errors (shapes, kernels): one line naming the file
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BackendError(f"{self.path}: ONNX Runtime failed on a batch of shape {tuple(images.shape)} "
                               f"({type(e).__name__}: {msg})") from e


class TrtBackend(Backend):
    """A serialized TensorRT engine through the torch-free `EngineRunner` (one stream, reused buffers)."""

    format = "tensorrt"
    provider = "tensorrt"

    def __init__(self, path: str, cuda: str = "auto", output_names: Optional[Sequence[str]] = None):
        self.runner = EngineRunner(path, cuda=cuda, output_names=output_names)
        self.path, self.sidecar = path, self.runner.sidecar
        self.precision = (self.sidecar or {}).get("precision", "?")
        self.name = os.path.basename(path)
        self.batch_range = self.runner.batch_range
        self.output_names = self.runner.outputs

    def raw(self, images):
        return self.runner.raw(images)


def open_network(path: str, providers: Optional[Sequence[str]] = None, allow_cpu_fallback: bool = False,
                 output_names: Optional[Sequence[str]] = None) -> Backend:
    """One network file: an ONNX file (ONNX Runtime) or a serialized TensorRT engine. Whole deployments, pipeline
    manifests included, are opened by `fa_deploy.runtime.loading.load_backend`."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".onnx":
        return OrtBackend(path, providers, allow_cpu_fallback=allow_cpu_fallback)
    if ext in ENGINE_SUFFIXES:
        return TrtBackend(path, output_names=output_names)
    raise BackendError(f"--backend {path}: unknown format (expected .onnx, .engine or .pipeline.json)")


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


def unshare_constants(model) -> None:
    """Nothing constant shared between nodes: a DequantizeLinear of a constant read by several nodes is repeated
    for each reader, then every initializer read by several nodes is copied for each reader (values unchanged).
    ONNX Runtime's s8 -> u8 pass of its high-precision int8 mode fails on shared ones ('Attempt to replace the
    existing tensor'), e.g. on Faster R-CNN's RPN head, whose weights serve the five FPN levels."""
    import copy

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    readers: Dict[str, list] = {}
    for node in g.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    copies = []
    for node in list(g.node):
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and len(readers.get(node.output[0], [])) > 1:
            for k, reader in enumerate(readers[node.output[0]][1:], 1):
                dq = copy.deepcopy(node)
                dq.name, dq.output[0] = f"{node.name}__reader{k}", f"{node.output[0]}__reader{k}"
                reader.input[:] = [dq.output[0] if i == node.output[0] else i for i in reader.input]
                copies.append(dq)
    nodes = copies + list(g.node)  # constant-only nodes may come first
    del g.node[:]
    g.node.extend(nodes)
    seen: Dict[str, int] = {}
    for node in g.node:
        for j, name in enumerate(node.input):
            if name in inits:
                seen[name] = seen.get(name, 0) + 1
                if seen[name] > 1:
                    dup = copy.deepcopy(inits[name])
                    dup.name = f"{name}__copy{seen[name]}"
                    g.initializer.append(dup)
                    node.input[j] = dup.name
