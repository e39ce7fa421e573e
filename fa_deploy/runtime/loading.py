"""The one place that maps a file to what opens it: a deployed model (`load_backend`: an ONNX file, a TensorRT
engine, a pipeline manifest of several networks) or a checkpoint (`fa_train.models.load_model`)."""
from __future__ import annotations

import os
import re
from typing import List, Optional

from fa_deploy.runtime.backends import Backend, BackendError, open_network
from fa_deploy.runtime.metadata import ExportError, onnx_metadata
from fa_deploy.runtime.pipeline import PipelineBackend


PIPELINE_SUFFIX = ".pipeline.json"
PART_FILE = re.compile(r"^(.+)\.(backbone|roi_heads)\.(onnx|engine|plan|trt)$")


def load_backend(path: str, providers: Optional[List[str]] = None, allow_cpu_fallback: bool = False) -> Backend:
    """`providers`: ONNX Runtime providers for ONNX files (cpu, cuda, tensorrt; None = auto); a requested GPU provider
    that does not load is a BackendError unless `allow_cpu_fallback`."""
    if not os.path.isfile(path):
        raise BackendError(f"--backend {path}: file not found")
    if path.endswith(PIPELINE_SUFFIX):  # a detector deployed as several networks (fa_deploy/runtime/pipeline.py)

        return PipelineBackend(path, providers, allow_cpu_fallback)
    m = PART_FILE.match(os.path.basename(path))
    if m:
        manifest = os.path.join(os.path.dirname(path), f"{m.group(1)}{'.engine' if m.group(3) != 'onnx' else ''}"
                                f"{PIPELINE_SUFFIX}")
        raise BackendError(f"--backend {path}: this is the {m.group(2)} part of a split deployment (Faster R-CNN "
                           f"runs as two networks with torchvision's glue between them); pass its manifest "
                           f"{manifest} instead")
    _refuse_checkpoint(path)
    return open_network(path, providers, allow_cpu_fallback)


def _refuse_checkpoint(path: str) -> None:
    """A fa-train checkpoint under an exported model's name (a torch zip archive with its data.pkl, or a safetensors
    file) is named as what it is: it belongs to --weights."""
    import zipfile

    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return
    kind = None
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                if any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist()):
                    kind = "a PyTorch archive"
        except (zipfile.BadZipFile, OSError):
            pass
    elif len(head) >= 10 and head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < 100_000_000:
        kind = "a safetensors file"
    if kind:
        raise BackendError(f"--backend {path}: this looks like a fa-train checkpoint ({kind}), not an exported model: "
                           f"pass it as --weights (export it with fa-export to get a --backend file)")


def recorded_source(backend: Backend, path: str) -> dict:
    """What a deployed file records about its origin: `source_sha256`, `source_weights`, `model` (arch),
    `img_size`, `precision`; from the ONNX file's own metadata, completed by its sidecar or manifest."""
    rec = {}
    files = list(getattr(backend, "part_paths", {}).values()) or [path]
    for f in files:
        if f.lower().endswith(".onnx"):
            try:
                meta = onnx_metadata(f)
            except ExportError:  # not readable as ONNX: opening it as a backend says so
                meta = {}
            if meta:
                rec.update({k: v for k, v in meta.items() if k not in rec})
                break
    side = getattr(backend, "sidecar", None) or {}
    for key in ("source_sha256", "source_weights", "model", "precision"):
        if side.get(key) is not None:
            if key == "source_sha256" and rec.get(key) and rec[key] != side[key]:
                raise BackendError(f"{path}: its sidecar says it was exported from {side[key][:12]}..., the file's own "
                                   f"metadata says {rec[key][:12]}...: the sidecar belongs to another file")
            rec.setdefault(key, side[key])
    shape = (side.get("input") or {}).get("shape")
    if shape and "img_size" not in rec:
        rec["img_size"] = shape[-1]
    return rec


def check_backend_source(backend, path: str, model, weights: str, wsha: str, img_size: int, cross_model: bool,
                         log=print) -> None:
    """The backend was exported from `weights`, for this architecture and input size: its sidecar or manifest, else
    the metadata inside the ONNX file, says so. Another source is an error unless `cross_model`."""
    rec = recorded_source(backend, path)
    arch = rec.get("model")
    if isinstance(arch, dict) and arch.get("name") and arch.get("name") != model.arch_config().get("name"):
        raise BackendError(f"{path}: exported from a {arch.get('name')} model, the source --weights {weights} is a "
                           f"{model.arch_config().get('name')}: the architectures differ")
    src = rec.get("source_sha256")
    if not src:
        msg = f"{path}: no record of the weights it was exported from (no sidecar, manifest or ONNX metadata)"
        if not cross_model:
            raise BackendError(msg + "; pass --cross-model to compare it with --weights anyway")
        log(f"warning: {msg}")
    elif src != wsha:
        msg = (f"{path}: exported from other weights ({rec.get('source_weights') or src[:12]}) than --weights "
               f"{weights}")
        if not cross_model:
            raise BackendError(msg + "; pass --cross-model to compare them anyway")
        log(f"warning: {msg} (--cross-model)")
    if isinstance(arch, dict) and arch.get("num_classes") not in (None, model.num_classes):
        raise BackendError(f"{path}: exported for {arch['num_classes']} classes, --weights {weights} has "
                           f"{model.num_classes}")
    size = rec.get("img_size")
    if size and int(size) != int(img_size):
        raise BackendError(f"{path}: exported for {size} px input, the benchmark uses {img_size} px")
