"""Checkpoints: written atomically (temp file, flush, fsync, rename), read with `weights_only=True`.

A checkpoint holds the model's arch config and class names, so `load_model(path)` rebuilds the right model;
loading into a model of another architecture or class count is an error that lists the differences.
"""
from __future__ import annotations

import os
import platform
import torch

from .models import create_model


class CheckpointError(ValueError):
    pass


def versions() -> dict:
    import torchvision

    from . import __version__

    return {"fa_toolkit": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "python": platform.python_version()}


def atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle refusing globals, truncation, not a zip ...
        raise CheckpointError(f"{path}: cannot be loaded safely ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "arch" not in ckpt:
        raise CheckpointError(f"{path}: not a fa-toolkit checkpoint (no 'model' and 'arch' entries)")
    return ckpt


def arch_differences(expected: dict, found: dict) -> list:
    keys = sorted(set(expected) | set(found))
    return [f"{k}: model has {expected.get(k)!r}, checkpoint has {found.get(k)!r}"
            for k in keys if expected.get(k) != found.get(k)]


def load_into(model, ckpt: dict, path: str = "checkpoint") -> None:
    diffs = arch_differences(model.arch_config(), ckpt["arch"])
    if diffs:
        raise CheckpointError(f"{path}: checkpoint is for another model:\n  " + "\n  ".join(diffs))
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: state dict does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")


def check_classes(ckpt: dict, class_names, path: str, data_name: str = "the data") -> None:
    if list(ckpt.get("class_names", [])) != list(class_names):
        raise CheckpointError(f"{path}: trained for classes {ckpt.get('class_names')}, but {data_name} has "
                              f"{list(class_names)}")


def save_safetensors(model, path: str, class_names, config: dict = None) -> None:
    """The weights alone as safetensors (no pickle at all), with the arch and classes in its metadata."""
    import json

    from safetensors.torch import save_file

    meta = {"format": "fa-toolkit", "arch": json.dumps(model.arch_config()), "class_names": json.dumps(list(class_names)),
            "config": json.dumps(config or {})}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(state, tmp, metadata=meta)
    os.replace(tmp, path)


def _load_safetensors(path: str, map_location="cpu") -> dict:
    import json

    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device=str(map_location)) as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    if meta.get("format") != "fa-toolkit":
        raise CheckpointError(f"{path}: safetensors file without fa-toolkit metadata (arch, class_names)")
    return {"model": state, "arch": json.loads(meta["arch"]), "class_names": json.loads(meta["class_names"]),
            "config": json.loads(meta.get("config", "{}"))}


def load_model(path: str, map_location="cpu"):
    """(model, checkpoint) rebuilt from a checkpoint alone (.pt, or .safetensors with its metadata)."""
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
