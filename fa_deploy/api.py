"""The Python API under the commands: `export`, `bench` and `load` (the commands are thin wrappers over the same
functions). Errors are exceptions; nothing here prints a table or exits.

    from fa_deploy import bench, export, load
    files = export("runs/fa/last.pt", onnx=["fp32", "int8"])          # [{"path", "precision", "kind", "parity"}]
    result = bench("runs/fa/last.pt", backends=[f["path"] for f in files], attack="pgd", max_images=50)
    result.rows                                                       # the table: a list of dicts
    model = load("runs/fa/export/last.int8.onnx"); model.predict(["img.jpg"])
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union


def _quiet(msg: str) -> None:
    pass


def export(weights: str, onnx: Sequence[str] = (), engine: Sequence[str] = (), log=_quiet, **options) -> List[Dict]:
    """fa-export as a function: the files written, each with its precision, kind (onnx, engine, pipeline) and its
    parity report. `options` are ExportSettings fields (out_dir, img_size, batch, dynamic, calib_images, ...)."""
    from fa_deploy.exporting.run import run_export
    from fa_deploy.settings import ExportSettings

    result = run_export(ExportSettings(weights=weights, onnx=tuple(onnx), engine=tuple(engine), **options), log=log,
                        show=log)
    return result.files


def bench(weights: Union[str, Sequence[str]], backends: Sequence[str] = (), attack: str = "pgd", log=_quiet,
          write: bool = True, **options):
    """fa-bench as a function: a BenchResult with `rows` (the table, a list of dicts), `columns`, `title`,
    `details` and, with backends, `failures` of the gate. `options` are BenchSettings fields (eps, steps, data,
    max_images, batch_size, json_path, report_dir, ...); the files they name are written when `write`."""
    from fa_deploy.robustness.bench import run_bench, write_outputs
    from fa_deploy.settings import BenchSettings

    weights = (weights,) if isinstance(weights, str) else tuple(weights)
    s = BenchSettings(weights=weights, backends=tuple(backends), attack=attack, quiet=options.pop("quiet", True),
                      **options)
    result = run_bench(s, log)
    if write:
        write_outputs(result, s, log)
    return result


def load(path: str, device: str = "auto", providers: Optional[List[str]] = None, **kw):
    """Any checkpoint, ONNX file, pipeline manifest or TensorRT engine as a model with `predict(images)`."""
    from fa_deploy.runtime.predict import Predictor

    return Predictor(path, device=device, providers=providers, **kw)
