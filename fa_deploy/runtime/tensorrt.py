"""TensorRT at run time: importing it, which GPU this is, and the version check before an engine is loaded (the
build is fa_deploy/exporting/tensorrt_build.py).

Imported lazily and torch-free (the deployment runtime `fa_deploy.runtime.engine` uses it): TensorRT is the optional `gpu`
extra. The network is always strongly typed (TensorRT 11 removed BuilderFlag.FP16/INT8 and the implicit INT8
calibrator; on 10.x the STRONGLY_TYPED creation flag is passed explicitly), so the precision is the ONNX file's:
fp16 = float16 ONNX, int8 = explicit Q/DQ ONNX. TF32 is cleared (it is on by default, also under strong typing),
so float32 layers compute in float32 and the fp32 parity gate tests float32, as Polygraphy does.
An engine only runs on the TensorRT version and GPU model it was built with; both are recorded in the sidecar
and compared before deserialising, so a mismatch is a clear error rather than a crash.
"""
from __future__ import annotations

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


