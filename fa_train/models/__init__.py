"""Model registry: one public way in, `create_model(name, num_classes, **kw)`, and a checkpoint's model,
`load_model(path)`."""
from __future__ import annotations

import os
from typing import Callable, Dict

from ..checkpoint import CheckpointError, _load_safetensors, load_checkpoint, load_into
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


def load_model(path: str, map_location="cpu"):
    """(model, checkpoint) rebuilt from a checkpoint alone (.pt, or .safetensors with its metadata): the model its
    `arch` names, with the checkpoint's weights (`fa_train.checkpoint` reads and checks the file)."""
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: checkpoint not found")
        ckpt = _load_safetensors(path, map_location)
    else:
        ckpt = load_checkpoint(path, map_location)
    arch = dict(ckpt["arch"])
    name = arch.pop("name")
    num_classes = arch.pop("num_classes")
    model = create_model(name, num_classes, **arch)
    load_into(model, ckpt, path)
    return model, ckpt


# register "fasterrcnn_resnet50_fpn", "yolov3", "retinanet_resnet50_fpn", "fcos_resnet50_fpn",
# "ssdlite320_mobilenet_v3_large"
from . import faster_rcnn, one_stage, ssdlite, yolov3  # noqa: E402,F401
from . import ultralytics_yolo  # noqa: E402,F401  (register "ultralytics"; the package itself is imported on use)

__all__ = ["Detector", "create_model", "load_model", "available_models", "register_model"]
