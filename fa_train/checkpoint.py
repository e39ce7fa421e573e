"""Checkpoints: written atomically (temp file, flush, fsync, rename), read with `weights_only=True`.

A checkpoint holds the model's arch config and class names, so `fa_train.models.load_model(path)` rebuilds the
right model; loading into a model of another architecture or class count is an error that lists the differences.
"""
from __future__ import annotations

import os
import platform
import warnings

import torch


class CheckpointError(ValueError):
    pass


def versions() -> dict:
    import torchvision

    from . import __version__

    return {"fa_toolkit": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "python": platform.python_version()}


def resolved_data_paths(cfg: dict) -> dict:
    """A copy of a run config whose `data.spec` path (voc:PATH, coco:PATH, yolo:PATH) is absolute, for storing in
    a checkpoint: fa-export and fa-bench read it later, from any folder. The run's own config is left as given."""
    import copy

    data = (cfg or {}).get("data") or {}
    spec = data.get("spec")
    kind, sep, path = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or kind not in ("voc", "coco", "yolo") or not path:
        return cfg
    out = copy.copy(cfg)
    out["data"] = {**data, "spec": f"{kind}:{os.path.abspath(os.path.expanduser(path))}"}
    return out


def atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


EXPORTED_SUFFIXES = (".onnx", ".engine", ".plan", ".trt", ".pipeline.json")


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """A fa-train checkpoint, read with `weights_only=True`. A file that is not one says what it is instead: an
    exported model (pass it to fa-bench as --backend), a truncated or corrupt file, or a pickle refused because
    loading it could run code (never loaded otherwise)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    exported = exported_model_kind(path)
    if exported:
        raise CheckpointError(f"{path}: this is an exported model ({exported}), not a checkpoint: pass it to "
                              f"fa-bench as --backend (with the checkpoint it came from as --weights)")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the refusal below says what matters
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle refusing globals, truncation, not a zip ...
        raise CheckpointError(_load_failure(path, e)) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "arch" not in ckpt:
        raise CheckpointError(f"{path}: not a fa-toolkit checkpoint (no 'model' and 'arch' entries)")
    return ckpt


def _head(path: str, n: int = 64) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def exported_model_kind(path: str):
    """'ONNX model', 'TensorRT engine', 'pipeline manifest' when `path` is a file fa-export writes, else None.
    ONNX is also recognised by its content (under any name): a protobuf ModelProto starts with field 1, the IR
    version, and parses as one."""
    name = os.path.basename(path).lower()
    if name.endswith((".engine", ".plan", ".trt")):
        return "TensorRT engine"
    if name.endswith(".onnx"):
        return "ONNX model"
    if name.endswith(".pipeline.json"):
        return "Faster R-CNN pipeline manifest"
    head = _head(path)
    if name.endswith(".json") and head.lstrip().startswith(b"{"):
        import json

        try:
            with open(path) as f:
                info = json.load(f)
        except (ValueError, UnicodeDecodeError):
            return None
        if isinstance(info, dict) and str(info.get("format", "")).endswith("-pipeline"):
            return "Faster R-CNN pipeline manifest"
        return None
    # torch checkpoints start with a zip header ('PK') or a pickle opcode (0x80); ONNX with 0x08 <ir_version>
    if len(head) >= 2 and head[0] == 0x08 and 1 <= head[1] <= 32 and _is_onnx(path):
        return "ONNX model"
    return None


def _is_onnx(path: str) -> bool:
    try:
        import onnx

        m = onnx.load(path, load_external_data=False)
    except Exception:  # not protobuf, or no onnx package
        return False
    return m.ir_version > 0 and (len(m.graph.node) > 0 or len(m.graph.output) > 0)


def _load_failure(path: str, e: Exception) -> str:
    """What went wrong reading `path`, in one line, never suggesting `weights_only=False` (which would run
    whatever code a pickle carries)."""
    import zipfile

    text = str(e)
    if os.path.getsize(path) == 0:
        return f"{path}: truncated or corrupt checkpoint (empty file)"
    head = _head(path, 4)
    if head.startswith(b"PK\x03\x04") and (not zipfile.is_zipfile(path) or "PytorchStreamReader" in text):
        return f"{path}: truncated or corrupt checkpoint (its zip archive is incomplete or damaged)"
    if head.startswith(b"\x93NUMPY") or path.endswith((".npy", ".npz")):
        return f"{path}: a NumPy array file, not a checkpoint"
    if path.endswith(".safetensors"):
        return f"{path}: a safetensors file holds weights only; resume from the run's last.pt"
    reason = _unpickler_reason(text)
    if isinstance(e, EOFError) or "truncated" in reason or "EOF" in reason:
        return f"{path}: truncated or corrupt checkpoint ({reason or type(e).__name__})"
    if "GLOBAL" in reason or "global" in reason:
        return f"{path}: cannot be loaded safely: its pickle imports what a checkpoint never needs ({reason})"
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        return f"{path}: not a PyTorch checkpoint: truncated or corrupt, or another kind of file ({reason})"
    return f"{path}: cannot be loaded safely: refused by the safe (weights-only) loader ({reason})"


_UNSAFE_ADVICE = ("weights_only", "allowlist", "safe_globals", "file an issue", "trusted source")


def _unpickler_reason(text: str) -> str:
    """The specific part of torch.load's message, without its advice to retry with weights_only=False or to
    allow-list a global (either would let the file run code)."""
    for marker in ("WeightsUnpickler error:", "Do it only if you got the file from a trusted source."):
        if marker in text:
            text = text.split(marker, 1)[1]
    text = " ".join(text.split("Check the documentation of torch.load", 1)[0].split())
    sentences = [x for x in text.replace("? ", ". ").split(". ") if x]
    return ". ".join(x for x in sentences if not any(a in x for a in _UNSAFE_ADVICE)).rstrip(".")


def display_name(path: str) -> str:
    """How tables and reports name a checkpoint: its run folder, plus the file stem unless it is `last`
    (runs/fa/last.pt -> 'fa', runs/fa/best.pt -> 'fa/best', runs/fa/epoch10.safetensors -> 'fa/epoch10')."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    stem = os.path.basename(path)
    for ext in (".pt", ".pth", ".safetensors", ".ckpt"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    if not folder:
        return stem
    return folder if stem == "last" else f"{folder}/{stem}"


def arch_differences(expected: dict, found: dict, structural=None) -> list:
    """What differs between two arch configs, over the keys that make the network (`structural`: the model's
    `structural_arch`; None: every key). Options (score thresholds and kin) may differ: a checkpoint restores its
    own through `load_model`, and `--init` keeps the run's."""
    keys = set(expected) | set(found)
    if structural is not None:
        keys &= set(structural)
    keys = sorted(keys)
    return [f"{k}: model has {expected.get(k)!r}, checkpoint has {found.get(k)!r}"
            for k in keys if expected.get(k) != found.get(k)]


def load_into(model, ckpt: dict, path: str = "checkpoint") -> None:
    expected, found = model.arch_config().get("name"), ckpt["arch"].get("name")
    if expected != found:
        raise CheckpointError(f"{path}: a {found} checkpoint cannot be loaded into a {expected} model (a checkpoint "
                              f"loads only into the detector it was trained as; --model {found} uses it)")
    diffs = arch_differences(model.arch_config(), ckpt["arch"], model.structural_arch)
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
            "config": json.dumps(resolved_data_paths(config) or {})}
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
