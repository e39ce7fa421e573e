"""ONNX -> TensorRT engine (TensorRT 10/11 Python API), engine metadata, and loading with version checks.

Imported lazily: TensorRT is the optional `gpu` extra. The network is always strongly typed (TensorRT 11
removed BuilderFlag.FP16/INT8 and the implicit INT8 calibrator; on 10.x the STRONGLY_TYPED creation flag is
passed explicitly), so the precision is the ONNX file's: fp16 = float16 ONNX, int8 = explicit Q/DQ ONNX.
An engine only runs on the TensorRT version and GPU model it was built with; both are recorded in the sidecar
and compared before deserialising, so a mismatch is a clear error rather than a crash.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple


class TensorRTUnavailable(RuntimeError):
    pass


class EngineMismatch(RuntimeError):
    pass


def import_tensorrt():
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError as e:
        raise TensorRTUnavailable(
            "TensorRT is not installed (pip install -e '.[gpu]' on a machine with an NVIDIA GPU)") from e
    return trt


def gpu_name() -> Optional[str]:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # torch absent in a deployment service: ask pycuda
        pass
    try:
        import pycuda.autoprimaryctx  # noqa: F401
        import pycuda.driver as cuda

        return cuda.Device(0).name()
    except Exception:
        return None


def tensorrt_available() -> Tuple[bool, str]:
    try:
        trt = import_tensorrt()
    except TensorRTUnavailable as e:
        return False, str(e)
    if gpu_name() is None:
        return False, f"TensorRT {trt.__version__} is installed but no CUDA GPU is visible"
    return True, trt.__version__


def build_engine(onnx_path: str, engine_path: str, input_name: str, img_size: int, batch_range=(1, 1, 1),
                 workspace_mb: int = 4096, timing_cache: Optional[str] = None, log=print,
                 profile_shapes: Optional[Tuple[tuple, tuple, tuple]] = None) -> dict:
    """Build and write the serialized engine; returns metadata for the sidecar. The optimization profile is
    [batch, 3, img_size, img_size] over `batch_range`, or `profile_shapes` = (min, opt, max) shapes of the input."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0
    if major < 11:  # always on (and the flag deprecated) from TensorRT 11
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with open(onnx_path, "rb") as f:
        ok = parser.parse(f.read())
    if not ok:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"{onnx_path}: TensorRT's ONNX parser failed:\n  " + "\n  ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    bmin, bopt, bmax = batch_range
    profile = builder.create_optimization_profile()
    if profile_shapes is None:
        profile_shapes = ((bmin, 3, img_size, img_size), (bopt, 3, img_size, img_size), (bmax, 3, img_size, img_size))
    profile.set_shape(input_name, *profile_shapes)
    config.add_optimization_profile(profile)
    cache_bytes = b""
    if timing_cache and os.path.isfile(timing_cache):
        with open(timing_cache, "rb") as f:
            cache_bytes = f.read()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{onnx_path}: TensorRT could not build an engine (see the log above)")
    tmp = engine_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(plan)
    os.replace(tmp, engine_path)
    if timing_cache:
        with open(timing_cache, "wb") as f:
            f.write(memoryview(cache.serialize()))
    return {"format": "tensorrt", "tensorrt": trt.__version__, "gpu": gpu_name(), "batch_range": list(batch_range),
            "profile": [list(s) for s in profile_shapes],
            "workspace_mb": workspace_mb, "onnx": os.path.abspath(onnx_path), "strongly_typed": True}


def check_engine_compatible(sidecar: Optional[dict], path: str) -> None:
    """Compare the engine's recorded TensorRT version and GPU with this machine's, before deserialising."""
    trt = import_tensorrt()
    if sidecar is None:
        raise EngineMismatch(f"{path}: no sidecar {path}.json; cannot check which TensorRT/GPU built this engine")
    here_gpu = gpu_name()
    problems = []
    if sidecar.get("tensorrt") != trt.__version__:
        problems.append(f"built with TensorRT {sidecar.get('tensorrt')}, this machine has {trt.__version__}")
    if sidecar.get("gpu") != here_gpu:
        problems.append(f"built on GPU {sidecar.get('gpu')!r}, this machine has {here_gpu!r}")
    if problems:
        raise EngineMismatch(f"{path}: engine built elsewhere: " + "; ".join(problems) +
                             ". Rebuild it here with fa-export --engine from the ONNX file.")
