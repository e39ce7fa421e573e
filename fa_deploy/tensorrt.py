"""ONNX -> TensorRT engine (TensorRT 10/11 Python API), engine metadata, and loading with version checks.

Imported lazily and torch-free (the deployment runtime `fa_deploy.runtime` uses it): TensorRT is the optional `gpu`
extra. The network is always strongly typed (TensorRT 11 removed BuilderFlag.FP16/INT8 and the implicit INT8
calibrator; on 10.x the STRONGLY_TYPED creation flag is passed explicitly), so the precision is the ONNX file's:
fp16 = float16 ONNX, int8 = explicit Q/DQ ONNX. TF32 is cleared (it is on by default, also under strong typing),
so float32 layers compute in float32 and the fp32 parity gate tests float32, as Polygraphy does.
An engine only runs on the TensorRT version and GPU model it was built with; both are recorded in the sidecar
and compared before deserialising, so a mismatch is a clear error rather than a crash.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Tuple


class TensorRTUnavailable(RuntimeError):
    pass


class EngineMismatch(RuntimeError):
    pass


class TensorRTBuildError(RuntimeError):
    """The parser or the builder refused the file: the message carries TensorRT's own errors."""


def import_tensorrt():
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError as e:
        raise TensorRTUnavailable(
            "TensorRT is not installed (pip install -e '.[gpu]' on a machine with an NVIDIA GPU)") from e
    return trt


def _gpu_name_cuda_python() -> Optional[str]:
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        from cuda import cudart as rt
    err, prop = rt.cudaGetDeviceProperties(0)
    if int(err) != 0:
        return None
    name = prop.name
    return (name.split(b"\0")[0].decode() if isinstance(name, (bytes, bytearray)) else str(name)).strip()


def _gpu_name_pycuda() -> Optional[str]:
    import pycuda.autoprimaryctx  # noqa: F401
    import pycuda.driver as cuda

    return cuda.Device(0).name()


def _gpu_name_torch() -> Optional[str]:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def gpu_name() -> Optional[str]:
    """The first GPU's name, asked of pycuda, cuda-python, then torch (in the order the runtime picks its CUDA
    binding; torch last, so a deployment service without it never tries to import it first)."""
    for ask in (_gpu_name_pycuda, _gpu_name_cuda_python, _gpu_name_torch):
        try:
            name = ask()
        except Exception:  # not installed, no driver, no device
            continue
        if name:
            return name
    return None


def tensorrt_available() -> Tuple[bool, str]:
    try:
        trt = import_tensorrt()
    except TensorRTUnavailable as e:
        return False, str(e)
    if gpu_name() is None:
        return False, f"TensorRT {trt.__version__} is installed but no CUDA GPU is visible"
    return True, trt.__version__


def _major(trt) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        return 0


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


def profile_for(batch_range: Sequence[int], img_size: int) -> Tuple[tuple, tuple, tuple]:
    return tuple((int(b), 3, img_size, img_size) for b in batch_range)
