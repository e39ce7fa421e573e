"""A detector deployed as several networks, at run time: the manifest `<stem>.<precision>.pipeline.json` that
fa-export writes (fa_deploy/exporting/two_network.py) and `PipelineBackend`, which runs its parts (ONNX Runtime
sessions or TensorRT engines) with the model's own torchvision glue between and after them (transform, anchors,
proposal decoding + NMS, multi-scale RoIAlign, detection decoding + NMS, rescaling: on the CPU in PyTorch)."""
from __future__ import annotations

import json
import os
from typing import List, Optional

from fa_deploy.runtime.backends import Backend, BackendError, open_network


def read_manifest(path: str) -> dict:
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise BackendError(f"{path}: not a readable pipeline manifest ({e})") from e
    if info.get("format") not in ("onnx-pipeline", "tensorrt-pipeline") or not isinstance(info.get("parts"), dict):
        raise BackendError(f"{path}: not a fa-export pipeline manifest (format {info.get('format')!r})")
    return info


class PipelineBackend(Backend):
    """The parts of a manifest (ONNX Runtime sessions or TensorRT engines) with the model's torchvision glue."""

    def __init__(self, path: str, providers: Optional[List[str]] = None, allow_cpu_fallback: bool = False):
        from fa_train.models import create_model

        info = read_manifest(path)
        self.path, self.sidecar, self.manifest = path, info, info
        self.name = os.path.basename(path)
        self.precision = info.get("precision", "?")
        self.format = "tensorrt" if info["format"] == "tensorrt-pipeline" else "onnx"
        base = os.path.dirname(os.path.abspath(path))
        self.part_paths = {k: os.path.join(base, v) for k, v in info["parts"].items()}
        io = info.get("part_io", {})
        self.parts = {k: open_network(p, providers, allow_cpu_fallback, output_names=io.get(k, {}).get("outputs"))
                      for k, p in self.part_paths.items()}
        self.batch_range = self.parts["backbone"].batch_range
        kinds = sorted({b.provider for b in self.parts.values()})
        self.provider = "+".join(kinds) + " (glue: torch-cpu)"
        arch = dict(info["model"])
        name, num_classes = arch.pop("name"), arch.pop("num_classes")
        self.glue = create_model(name, num_classes, **arch).eval()  # parameter-free pieces only are used

    @property
    def size_mb(self) -> float:
        return sum(os.path.getsize(p) for p in self.part_paths.values()) / 2**20

    def raw(self, images):
        return [self.glue.run_split(images, self.parts["backbone"].raw, self.parts["roi_heads"].raw)]
