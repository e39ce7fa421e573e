"""Run time: what opens and runs a deployed file, and nothing that attacks it.

    engine.py     the torch-free TensorRT engine runner a deployment service imports
                  (`from fa_deploy.runtime import EngineRunner`)
    metadata.py   what an exported file says about itself (sidecar, ONNX metadata, batch range); torch-free
    tensorrt.py   TensorRT at run time: import, GPU name, the version check before an engine loads; torch-free
    backends.py   one Backend interface over the source weights (torch), ONNX Runtime and TensorRT engines
    pipeline.py   a detector deployed as several networks (Faster R-CNN) with its torchvision glue
    loading.py    the one place that maps a file to what opens it
    datasets.py   the images a checkpoint names (its training data unless a flag overrides it)
    predict.py    any model file as one model with `predict(images)`; fa-predict's work

Imports run downhill: nothing here imports fa_deploy.robustness, fa_deploy.exporting or the command lines, and
importing this package (or engine, metadata, tensorrt, backends) does not import torch.
"""
from fa_deploy.runtime.engine import BackendError, EngineRunner, run_batched

__all__ = ["BackendError", "EngineRunner", "run_batched"]
