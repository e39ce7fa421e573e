"""What an exported file says about itself, readable without PyTorch: the JSON sidecar beside every exported file,
the fa-toolkit keys in an ONNX file's `metadata_props`, and the batch range a file accepts.

A deployment service imports this (through `fa_deploy.runtime.engine`) with numpy only; `onnx` is imported where an ONNX
file is read. Everything that needs torch lives in `fa_deploy.exporting.onnx_export` and above.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Optional, Tuple

METADATA_PREFIX = "fa_toolkit."
# keys every exported ONNX file carries in metadata_props (values JSON-encoded strings)
METADATA_KEYS = ("source_sha256", "source_weights", "precision", "batch_range", "img_size", "fa_toolkit_version",
                 "model", "classes")


class ExportError(RuntimeError):
    pass


def sidecar_path(path: str) -> str:
    return path + ".json"


def write_json_atomic(obj, path: str) -> str:
    """Temporary file in the same folder, then rename: a reader never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_sidecar(path: str, info: dict) -> str:
    return write_json_atomic(info, sidecar_path(path))


def read_sidecar(path: str) -> Optional[dict]:
    side = sidecar_path(path)
    if not os.path.isfile(side):
        return None
    try:
        with open(side) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{side}: unreadable sidecar ({e})") from e


def check_onnx(path: str):
    """onnx.checker and strict shape inference; returns the loaded model. Errors name the file."""
    import onnx

    try:
        model = onnx.load(path)
        onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:  # onnx raises several types (ValidationError, InferenceError, DecodeError)
        raise ExportError(f"{path}: not a valid ONNX model ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    return model


def set_onnx_metadata(model, info: Dict) -> None:
    """Write `info` into the model's metadata_props under the fa_toolkit. prefix (replacing earlier fa keys)."""
    keep = [p for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    for p in keep:
        model.metadata_props.add(key=p.key, value=p.value)
    for k, v in info.items():
        model.metadata_props.add(key=METADATA_PREFIX + k, value=json.dumps(v))


def onnx_metadata(path_or_model) -> Dict:
    """The fa-toolkit keys of an ONNX file's metadata_props ({} for a file fa-export did not write): source_sha256,
    source_weights, precision, batch_range [min, opt, max], img_size, fa_toolkit_version, model, classes. Reads the
    protobuf without loading the weights' external data."""
    if isinstance(path_or_model, (str, os.PathLike)):
        import onnx

        try:
            model = onnx.load(str(path_or_model), load_external_data=False)
        except Exception as e:  # DecodeError and friends
            raise ExportError(f"{path_or_model}: not a readable ONNX file ({type(e).__name__}: {e})") from e
    else:
        model = path_or_model
    out = {}
    for p in model.metadata_props:
        if p.key.startswith(METADATA_PREFIX):
            try:
                out[p.key[len(METADATA_PREFIX):]] = json.loads(p.value)
            except json.JSONDecodeError:
                out[p.key[len(METADATA_PREFIX):]] = p.value
    return out


def onnx_batch_range(model, input_name: Optional[str] = None) -> Tuple[int, int, Optional[int]]:
    """(min, opt, max) batches an ONNX file's input accepts: (n, n, n) for a fixed batch n, (1, 1, None) for a
    symbolic batch axis (any batch). The recorded range (metadata or sidecar) narrows a symbolic one elsewhere."""
    inputs = {i.name: i for i in model.graph.input}
    inits = {i.name for i in model.graph.initializer}
    names = [n for n in inputs if n not in inits]
    name = input_name or names[0]
    dims = inputs[name].type.tensor_type.shape.dim
    if not dims:
        raise ExportError(f"input {name!r} has no shape")
    d0 = dims[0]
    if d0.HasField("dim_value") and d0.dim_value > 0:
        return (d0.dim_value, d0.dim_value, d0.dim_value)
    return (1, 1, None)


class Staging:
    """Files of one export written into a hidden folder beside their destination and moved into place together at
    `commit()`: a crashed export leaves no file without its sidecar and no sidecar without its parity. Sidecars
    move before the file they describe, pipeline manifests last. `discard()` removes what was not committed."""

    def __init__(self, out_dir: str):
        import tempfile

        self.out_dir = out_dir
        self.dir = tempfile.mkdtemp(prefix=".fa-export-", dir=out_dir)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def final(self, staged: str) -> str:
        return os.path.join(self.out_dir, os.path.relpath(staged, self.dir))

    def commit(self) -> list:
        names = sorted(os.listdir(self.dir), key=lambda n: (n.endswith(".pipeline.json"), not n.endswith(".json"), n))
        moved = []
        for n in names:
            if n.endswith(".tmp"):
                continue
            os.replace(os.path.join(self.dir, n), os.path.join(self.out_dir, n))
            moved.append(os.path.join(self.out_dir, n))
        self.discard()
        return moved

    def discard(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
