"""fa_deploy: export robust detectors to ONNX / TensorRT and check that the deployed model keeps its robustness.

`export`, `bench` and `load` are the Python API under `fa-export`, `fa-bench` and `fa-predict` (fa_deploy/api.py);
they are imported on first use, so importing a torch-free module of this package does not import torch."""

__all__ = ["export", "bench", "load"]


def __getattr__(name):
    if name in __all__:
        from fa_deploy import api

        return getattr(api, name)
    raise AttributeError(f"module 'fa_deploy' has no attribute {name!r}")
