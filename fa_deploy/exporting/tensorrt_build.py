"""ONNX -> TensorRT engine with the TensorRT 10/11 Python API (torch-free; TensorRT is the optional `gpu` extra).

The network is always strongly typed (TensorRT 11 removed BuilderFlag.FP16/INT8 and the implicit INT8 calibrator;
on 10.x the STRONGLY_TYPED creation flag is passed explicitly), so the precision is the ONNX file's: fp16 = float16
ONNX, int8 = explicit Q/DQ ONNX. TF32 is cleared (it is on by default, also under strong typing), so float32 layers
compute in float32 and the fp32 parity gate tests float32, as Polygraphy does. The sidecar records the TensorRT
version and GPU that built the engine; fa_deploy/runtime/tensorrt.py checks them before an engine is loaded.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Tuple

from fa_deploy.runtime.tensorrt import _major, gpu_name, import_tensorrt


class TensorRTBuildError(RuntimeError):
    """The parser or the builder refused the file: the message carries TensorRT's own errors."""


def build_engine(onnx_path: str, engine_path: str, input_name: str, img_size: int, batch_range=(1, 1, 1),
                 workspace_mb: int = 4096, timing_cache: Optional[str] = None, log: Callable[[str], None] = print,
                 profile_shapes: Optional[Tuple[tuple, tuple, tuple]] = None,
                 record_onnx: Optional[str] = None) -> dict:
    """Build and write the serialized engine; returns metadata for the sidecar (input, outputs in the ONNX file's
    order, the profile, versions). The optimization profile is [batch, 3, img_size, img_size] over `batch_range`,
    or `profile_shapes` = (min, opt, max) shapes of the input. Any refusal is a TensorRTBuildError naming the file."""
    trt = import_tensorrt()
    try:
        return _build(trt, onnx_path, engine_path, input_name, img_size, batch_range, workspace_mb, timing_cache,
                      log, profile_shapes, record_onnx or onnx_path)
    except (TensorRTBuildError, OSError):
        raise
    except Exception as e:  # TensorRT's bindings raise TypeError / RuntimeError / ValueError of their own
        raise TensorRTBuildError(f"{onnx_path}: TensorRT could not build an engine ({type(e).__name__}: "
                                 f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'})") from e


def _build(trt, onnx_path, engine_path, input_name, img_size, batch_range, workspace_mb, timing_cache, log,
           profile_shapes, record_onnx) -> dict:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if builder is None:
        raise TensorRTBuildError(f"{onnx_path}: TensorRT could not create a builder (no usable GPU?)")
    flags = 0
    if _major(trt) < 11:  # always on (and the flag deprecated) from TensorRT 11
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with open(onnx_path, "rb") as f:
        ok = parser.parse(f.read())
    if not ok:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TensorRTBuildError(f"{onnx_path}: TensorRT's ONNX parser failed: " + " | ".join(errors or ["no detail"]))
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if inputs != [input_name]:
        raise TensorRTBuildError(f"{onnx_path}: expected the one input {input_name!r}, the network has {inputs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # float32 layers in float32: the fp32 gate must not test TF32
    bmin, bopt, bmax = batch_range
    if profile_shapes is None:
        profile_shapes = ((bmin, 3, img_size, img_size), (bopt, 3, img_size, img_size), (bmax, 3, img_size, img_size))
    static = tuple(network.get_input(0).shape)
    if all(int(d) >= 0 for d in static):  # a fixed-shape input: TensorRT makes the profile itself
        if tuple(profile_shapes[0]) != static or tuple(profile_shapes[2]) != static:
            raise TensorRTBuildError(f"{onnx_path}: the ONNX input has the fixed shape {static}; asked for "
                                     f"{profile_shapes[0]}..{profile_shapes[2]} (export with --dynamic-batch)")
    else:
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, *profile_shapes)
        if config.add_optimization_profile(profile) < 0:
            raise TensorRTBuildError(f"{onnx_path}: TensorRT refused the optimization profile {profile_shapes}")
    cache_state = "none"
    if timing_cache:
        cache_bytes = b""
        if os.path.isfile(timing_cache):
            with open(timing_cache, "rb") as f:
                cache_bytes = f.read()
        cache = config.create_timing_cache(cache_bytes)
        accepted = config.set_timing_cache(cache, ignore_mismatch=False)
        if cache_bytes and not accepted:
            log(f"warning: timing cache {timing_cache} was made by another TensorRT version or GPU; starting a new "
                f"one (it will be overwritten)")
            cache = config.create_timing_cache(b"")
            if not config.set_timing_cache(cache, ignore_mismatch=False):
                raise TensorRTBuildError(f"{onnx_path}: TensorRT refused even an empty timing cache")
            cache_state = "rejected, new"
        elif not accepted:
            raise TensorRTBuildError(f"{onnx_path}: TensorRT refused an empty timing cache")
        else:
            cache_state = "loaded" if cache_bytes else "new"
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTBuildError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    tmp = engine_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(memoryview(plan))
    os.replace(tmp, engine_path)
    if timing_cache:
        serialized = config.get_timing_cache().serialize()  # the cache as the build left it, new timings included
        tmp = timing_cache + ".tmp"
        with open(tmp, "wb") as f:
            f.write(memoryview(serialized))
        os.replace(tmp, timing_cache)
    return {"format": "tensorrt", "tensorrt": trt.__version__, "gpu": gpu_name(), "batch_range": list(batch_range),
            "input_name": input_name, "outputs": outputs, "profile": [list(s) for s in profile_shapes],
            "workspace_mb": workspace_mb, "onnx": os.path.abspath(record_onnx), "strongly_typed": True,
            "tf32": False, "timing_cache": cache_state}


def profile_for(batch_range: Sequence[int], img_size: int) -> Tuple[tuple, tuple, tuple]:
    return tuple((int(b), 3, img_size, img_size) for b in batch_range)
