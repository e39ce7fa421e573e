"""Model registry: one public way in, `create_model(name, num_classes, **kw)`."""
from __future__ import annotations

from typing import Callable, Dict

from .base import Detector

_REGISTRY: Dict[str, Callable[..., Detector]] = {}


def register_model(name: str):
    def deco(fn):
        _REGISTRY[name] = fn
        return fn

    return deco


def available_models():
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, **kw) -> Detector:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    return _REGISTRY[name](num_classes=num_classes, **kw)


# register "fasterrcnn_resnet50_fpn", "yolov3", "retinanet_resnet50_fpn", "fcos_resnet50_fpn",
# "ssdlite320_mobilenet_v3_large"
from . import faster_rcnn, one_stage, ssdlite, yolov3  # noqa: E402,F401
from . import ultralytics_yolo  # noqa: E402,F401  (register "ultralytics"; the package itself is imported on use)

__all__ = ["Detector", "create_model", "available_models", "register_model"]
