"""The one place that maps a file to what opens it: a deployed model (`load_backend`: an ONNX file, a TensorRT
engine, a pipeline manifest of several networks) or a checkpoint (`fa_train.checkpoint.load_model`)."""
from __future__ import annotations

import os
from typing import List, Optional

from .backends import Backend, BackendError, open_network

PIPELINE_SUFFIX = ".pipeline.json"


def load_backend(path: str, providers: Optional[List[str]] = None, allow_cpu_fallback: bool = False) -> Backend:
    """`providers`: ONNX Runtime providers for ONNX files (cpu, cuda, tensorrt; None = auto); a requested GPU provider
    that does not load is a BackendError unless `allow_cpu_fallback`."""
    if not os.path.isfile(path):
        raise BackendError(f"--backend {path}: file not found")
    if path.endswith(PIPELINE_SUFFIX):  # a detector deployed as several networks (fa_deploy/split.py)
        from .split import PipelineBackend

        return PipelineBackend(path, providers, allow_cpu_fallback)
    return open_network(path, providers, allow_cpu_fallback)
