"""fa-export's work, apart from its command line: ONNX files of every precision asked for (a single network, or
the parts of a split detector with a pipeline manifest), their parity against the source weights, their TensorRT
compatibility (checked on the CPU), and TensorRT engines. `run_export(settings)` returns an `ExportResult`; the
command prints it and sets the exit code.

Every file is written in a staging folder and moved into place with its sidecar (parity included) only when
complete, so a crashed export never leaves a file without sidecar or a sidecar without parity. Every ONNX file also
carries its origin in `metadata_props` (`fa_deploy.runtime.metadata.onnx_metadata`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import numpy as np

from fa_deploy.exporting import onnx_export as ex
from fa_deploy.exporting import two_network as split
from fa_deploy.exporting.compat import check_tensorrt_compat, TensorRTIncompatible
from fa_deploy.exporting.tensorrt_build import build_engine, profile_for
from fa_deploy.report.tables import console_table
from fa_deploy.runtime.backends import OrtBackend, run_batched, TorchBackend, TrtBackend
from fa_deploy.runtime.datasets import checkpoint_data, dataset_for
from fa_deploy.runtime.metadata import ExportError, sha256, Staging
from fa_deploy.runtime.tensorrt import tensorrt_available, TensorRTUnavailable
from fa_deploy.settings import ExportSettings


@dataclass
class ExportResult:
    files: List[Dict] = field(default_factory=list)  # {"path", "precision", "kind": onnx|engine|pipeline, "parity"}
    tables: List[tuple] = field(default_factory=list)  # (title, rows, columns)
    failed: List[str] = field(default_factory=list)  # precisions outside the parity tolerances
    compat: Dict[str, dict] = field(default_factory=dict)  # file -> TensorRT compatibility report

    @property
    def parity_failed(self) -> bool:
        return bool(self.failed)


def _verify_images(model, ckpt, s: ExportSettings, img_size: int, log) -> np.ndarray:
    test_ds = dataset_for(ckpt, "test", s.calib_data, img_size, max_images=s.verify_images, log=log,
                          flag="--calib-data")
    if len(test_ds) == 0:
        raise ExportError("the test split has no images for the parity check")
    return np.concatenate([test_ds[i][0][None].numpy() for i in range(min(s.verify_images, len(test_ds)))])


def tensorrt_or_explain(s: ExportSettings, img_size: int) -> None:
    """--engine without TensorRT or a GPU: the ONNX files are written; the error says what to run on the GPU."""
    ok, why = tensorrt_available()
    if not ok:
        batch = f" --batch {s.batch}" if s.batch is not None else \
            (f" --dynamic-batch {':'.join(map(str, s.dynamic))}" if s.dynamic else "")
        raise TensorRTUnavailable(
            f"TensorRT engines not built: {why}.\nThe ONNX files are written; build the engines on the deployment "
            f"GPU with:\n  pip install -e '.[gpu]'\n  fa-export {s.weights} "
            + " ".join(f"--engine {p}" for p in s.engine) + batch + f" --img-size {img_size}")


def calibration_dataset(ckpt, s: ExportSettings, img_size: int, log):
    """The training split's images without training augmentation: the random flips of the "train" role made every
    export calibrate on different images, so int8 files (and the demo's int8 row) changed from run to run."""
    from fa_train.data import DEFAULT_SPLITS, parse_data_spec


    spec = checkpoint_data(ckpt, s.calib_data, img_size)[0]
    own = None if s.calib_data else ckpt.get("config", {}).get("data", {}).get("train_split")
    split = own or DEFAULT_SPLITS[parse_data_spec(spec)[0]]["train"]
    return dataset_for(ckpt, "test", s.calib_data, img_size, split=split, max_images=s.calib_images, log=log,
                       flag="--calib-data")


def _origin(weights: str, ckpt: dict, model, precision: str, batch_range, img_size: int) -> dict:
    """What every exported ONNX file records about itself in metadata_props."""
    from fa_train import __version__


    return {"source_sha256": sha256(weights), "source_weights": os.path.abspath(weights), "precision": precision,
            "batch_range": list(batch_range), "img_size": img_size, "fa_toolkit_version": __version__,
            "model": model.arch_config(), "classes": ckpt.get("class_names")}


def _compat(path: str, final: str, for_engine: bool, result: ExportResult, log) -> dict:
    """The CPU-side TensorRT check of one written file: a warning for ONNX targets, an error for --engine ones."""
    rep = check_tensorrt_compat(path)
    rep.path = final
    result.compat[final] = rep.as_dict()
    if not rep.ok and not for_engine:
        log(f"fa-export: warning: {rep.summary()}")
    return {"report": rep, "for_engine": for_engine}


def _refuse_incompatible(checks: List[dict]) -> None:
    bad = [c["report"] for c in checks if c["for_engine"] and not c["report"].ok]
    if bad:
        raise TensorRTIncompatible("not building TensorRT engines: " + " | ".join(r.summary() for r in bad))


def run_export(s: ExportSettings, log: Callable[[str], None] = print,
               show: Callable[[str], None] = print) -> ExportResult:
    """`log` gets progress lines, `show` each table as soon as it is complete."""
    from fa_train.models import load_model


    s.validate()
    model, ckpt = load_model(s.weights)
    model.eval()
    calib_spec, img_size, _ = checkpoint_data(ckpt, s.calib_data, s.img_size)
    if img_size % 32:
        from fa_train.errors import SettingsError

        raise SettingsError(f"--img-size {img_size}: must be a multiple of 32")
    out_dir = s.out_dir or os.path.join(os.path.dirname(os.path.abspath(s.weights)), "export")
    if not s.out_dir:  # the default beside the weights: a read-only weights folder is named with the flag to use
        from fa_train.errors import check_output_dir

        check_output_dir(out_dir, "--out (default: the weights' folder/export)")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(s.weights))[0]
    if getattr(model, "export_parts", None):  # deployed as several networks with the model's glue
        return _export_split(model, ckpt, s, out_dir, stem, img_size, calib_spec, log, show)
    return _export_single(model, ckpt, s, out_dir, stem, img_size, calib_spec, log, show)


def _parity_rows(label_of, reports, sizes, part_key=None):
    rows = []
    for key, rep in reports.items():
        for name, o in rep["outputs"].items():
            row = {"file": label_of(key), "output": name, "max_abs": o.get("max_abs"), "mean_abs": o.get("mean_abs"),
                   "max_rel": o.get("max_rel"), "fail_frac": o.get("fail_fraction", "-"),
                   "result": "pass" if o.get("passed", True) else "FAIL", "size_MB": sizes[key]}
            if part_key:
                row["part"] = key
            rows.append(row)
    return rows


def _export_single(model, ckpt, s, out_dir, stem, img_size, calib_spec, log, show) -> ExportResult:
    from fa_train.engine import make_loader


    keep = getattr(model, "export_keep_float32", ())
    brange, dynamic = s.batch_range, s.is_dynamic
    result = ExportResult()
    stage = Staging(out_dir)
    try:
        paths = {}
        fp32 = stage.path(f"{stem}.fp32.onnx")
        ex.export_fp32(model, fp32, img_size, batch=brange[1], dynamic_batch=dynamic, opset=s.opset)
        paths["fp32"] = fp32
        verify = _verify_images(model, ckpt, s, img_size, log)
        if "fp16" in s.precisions:
            paths["fp16"] = stage.path(f"{stem}.fp16.onnx")
            kept = ex.export_fp16(fp32, paths["fp16"], keep)
            log(f"fp16: {len(kept)} decode nodes kept in float32")
        if "int8" in s.precisions:
            cal_ds = calibration_dataset(ckpt, s, img_size, log)
            cal = ex.calibration_batches(model, make_loader(cal_ds, 8, False, 0), s.calib_images, s.calib_pgd,
                                         s.calib_eps)
            paths["int8"] = stage.path(f"{stem}.int8.onnx")
            ex.export_int8(fp32, paths["int8"], cal, keep)
            log(f"int8: calibrated on {sum(len(c) for c in cal)} images{' (clean + PGD)' if s.calib_pgd else ''}")
        checks = []
        for prec in s.precisions:
            ex.stamp_onnx(paths[prec], _origin(s.weights, ckpt, model, prec, brange, img_size))
            info = ex.sidecar_info(s.weights, ckpt, model, img_size, prec, s.opset, list(brange))
            info["batch_range"], info["dynamic_batch"] = list(brange), dynamic
            if prec == "int8":
                info["calibration"] = {"images": s.calib_images, "pgd": s.calib_pgd,
                                       "eps": s.calib_eps if s.calib_pgd else None, "data": calib_spec,
                                       "quantizer": "onnxruntime quantize_static", **ex.QUANTIZE_OPTIONS}
            final = os.path.join(out_dir, os.path.basename(paths[prec]))
            checks.append(_compat(paths[prec], final, prec in s.engine, result, log))
            info["tensorrt_compat"] = result.compat[final]
            ex.write_sidecar(paths[prec], info)

        def run(backend):  # parity in batches the exported file accepts
            return run_batched(backend.raw, verify, backend.batch_range)

        ref = run_batched(TorchBackend(model).raw, verify, brange)
        reports = {}
        for prec in s.precisions:
            rep = ex.parity(ref, run(OrtBackend(paths[prec], ["cpu"])), prec)
            ex.write_sidecar(paths[prec], {**ex.read_sidecar(paths[prec]), "parity": rep})
            reports[prec] = rep
        stage.commit()  # every file with its complete sidecar, together
    finally:
        stage.discard()
    for prec in s.precisions:
        final = os.path.join(out_dir, os.path.basename(paths[prec]))
        paths[prec] = final
        result.files.append({"path": final, "precision": prec, "kind": "onnx", "parity": reports[prec]})
        if not reports[prec]["passed"]:
            result.failed.append(prec)
    rows = _parity_rows(lambda p: os.path.basename(paths[p]), reports,
                        {p: os.path.getsize(paths[p]) / 2**20 for p in reports})
    columns = ["file", "output", "max_abs", "mean_abs", "max_rel", "fail_frac", "result", "size_MB"]
    title = f"parity against {s.weights} on {len(ref[0])} images (ONNX Runtime CPU)"
    return _finish(result, s, img_size, checks, (title, rows, columns),
                   [f"wrote {paths[prec]} (+ .json sidecar)" for prec in s.precisions], show,
                   lambda: _build_single_engines(s, out_dir, stem, img_size, paths, ref, verify, result, log, show))


def _finish(result: ExportResult, s: ExportSettings, img_size: int, checks: List[dict], table: tuple,
            written: List[str], show, build_engines: Callable[[], None]) -> ExportResult:
    """The end every export shares: the parity table, the files written, then the engines asked for (refused
    before any build when the compatibility check found a problem or TensorRT is missing)."""
    title, rows, columns = table
    result.tables.append(table)
    show(console_table(rows, columns, title))
    for line in written:
        show(line)
    if s.engine:
        _refuse_incompatible(checks)
        tensorrt_or_explain(s, img_size)
        build_engines()
    return result


def _build_single_engines(s, out_dir, stem, img_size, paths, ref, verify, result, log, show):
    stage = Staging(out_dir)
    try:
        built = []
        for prec in s.engine:
            eng = stage.path(f"{stem}.{prec}.engine")
            meta = build_engine(paths[prec], eng, ex.INPUT_NAME, img_size, s.batch_range, s.workspace, s.timing_cache,
                                log=log, profile_shapes=profile_for(s.batch_range, img_size))
            side = {k: v for k, v in ex.read_sidecar(paths[prec]).items() if k not in ("parity", "tensorrt_compat")}
            ex.write_sidecar(eng, {**side, **meta, "precision": prec})
            backend = TrtBackend(eng)
            rep = ex.parity(ref, backend.raw(verify), prec)  # in chunks of the engine's profile
            ex.write_sidecar(eng, {**ex.read_sidecar(eng), "parity": rep})
            built.append((os.path.join(out_dir, os.path.basename(eng)), prec, rep))
            del backend
        stage.commit()
    finally:
        stage.discard()
    for eng, prec, rep in built:
        result.files.append({"path": eng, "precision": prec, "kind": "engine", "parity": rep})
        show(f"wrote {eng}: parity {'pass' if rep['passed'] else 'FAIL'}")
        if not rep["passed"]:
            result.failed.append(f"{prec} engine")


def _export_split(model, ckpt, s, out_dir, stem, img_size, calib_spec, log, show) -> ExportResult:
    """A detector deployed as two networks (Faster R-CNN; fa_deploy/exporting/two_network.py): the ONNX parts and a pipeline
    manifest per precision, parity of each part against the source, TensorRT engines of each part."""
    from fa_train.engine import make_loader


    def calibration():
        cal_ds = calibration_dataset(ckpt, s, img_size, log)
        return ex.calibration_batches(model, make_loader(cal_ds, 4, False, 0), s.calib_images, s.calib_pgd,
                                      s.calib_eps)

    calib_info = {"images": s.calib_images, "pgd": s.calib_pgd, "eps": s.calib_eps if s.calib_pgd else None,
                  "data": calib_spec, "parts": ["backbone"], "quantizer": "onnxruntime quantize_static",
                  **ex.QUANTIZE_OPTIONS}
    result = ExportResult()
    brange = s.batch_range
    stage = Staging(out_dir)
    try:
        manifests = split.export_split(model, s.weights, ckpt, stage.dir, stem, s.precisions, img_size, s.opset,
                                       calibration, calib_info, log=log, batch_range=brange, dynamic=s.is_dynamic)
        verify = _verify_images(model, ckpt, s, img_size, log)
        checks, reports_by, sizes_by = [], {}, {}
        for prec in s.precisions:
            info = split.read_manifest(manifests[prec])
            part_files = {k: os.path.join(stage.dir, v) for k, v in info["parts"].items()}
            for part, f in part_files.items():
                ex.stamp_onnx(f, _origin(s.weights, ckpt, model, info["part_precisions"][part],
                                         info["part_batch_range"][part], img_size))
                checks.append(_compat(f, os.path.join(out_dir, os.path.basename(f)), prec in s.engine, result, log))
            reports = split.part_parity(model, manifests[prec], verify,
                                        lambda part: OrtBackend(part_files[part], ["cpu"]).raw)
            compat = {k: result.compat[os.path.join(out_dir, os.path.basename(f))] for k, f in part_files.items()}
            split.write_manifest(manifests[prec], {**info, "parity": reports, "tensorrt_compat": compat})
            reports_by[prec] = reports
            sizes_by[prec] = {k: os.path.getsize(v) / 2**20 for k, v in part_files.items()}
        stage.commit()
    finally:
        stage.discard()
    rows = []
    for prec in s.precisions:
        manifests[prec] = os.path.join(out_dir, os.path.basename(manifests[prec]))
        label = os.path.basename(manifests[prec])
        rows += _parity_rows(lambda part: label, reports_by[prec], sizes_by[prec], part_key=True)
        result.files.append({"path": manifests[prec], "precision": prec, "kind": "pipeline",
                             "parity": reports_by[prec]})
        if not all(r["passed"] for r in reports_by[prec].values()):
            result.failed.append(prec)
    columns = ["file", "part", "output", "max_abs", "mean_abs", "max_rel", "fail_frac", "result", "size_MB"]
    title = f"parity of each part against {s.weights} on {len(verify)} images (ONNX Runtime CPU)"
    written = [f"wrote {manifests[prec]} (parts: {', '.join(split.read_manifest(manifests[prec])['parts'].values())})"
               for prec in s.precisions]
    return _finish(result, s, img_size, checks, (title, rows, columns), written, show,
                   lambda: _build_split_engines(model, s, out_dir, stem, img_size, manifests, verify, result, log,
                                                show))


def _build_split_engines(model, s, out_dir, stem, img_size, manifests, verify, result, log, show):
    stage = Staging(out_dir)
    done = []
    try:
        for prec in s.engine:
            info = split.read_manifest(manifests[prec])
            shapes = split.part_profiles(model, img_size, s.batch_range)
            engines, metas = {}, {}
            for part, onnx_name in info["parts"].items():
                eng = stage.path(f"{stem}.{prec}.{part}.engine")
                onnx_path = os.path.join(out_dir, onnx_name)
                metas[part] = build_engine(onnx_path, eng, info["part_io"][part]["input"], img_size,
                                           (shapes[part][0][0], shapes[part][1][0], shapes[part][2][0]), s.workspace,
                                           s.timing_cache, log=log, profile_shapes=shapes[part])
                want = info["part_io"][part]["outputs"]
                if sorted(metas[part]["outputs"]) != sorted(want):
                    raise ex.ExportError(f"{eng}: engine outputs {metas[part]['outputs']} are not the part's {want}")
                ex.write_sidecar(eng, {**metas[part], "outputs": want, "precision": info["part_precisions"][part],
                                       "source_sha256": info.get("source_sha256")})
                engines[part] = os.path.basename(eng)
            manifest = stage.path(f"{stem}.{prec}.engine.pipeline.json")
            split.write_manifest(manifest, {**{k: v for k, v in info.items() if k not in ("parity", "tensorrt_compat")},
                                             **metas["backbone"], "format": "tensorrt-pipeline", "parts": engines,
                                             "outputs": ["detections"]})
            reports = split.part_parity(model, manifest, verify,
                                        lambda part: TrtBackend(stage.path(engines[part])).raw)
            split.write_manifest(manifest, {**split.read_manifest(manifest), "parity": reports})
            done.append((os.path.join(out_dir, os.path.basename(manifest)), prec, reports))
        stage.commit()
    finally:
        stage.discard()
    for manifest, prec, reports in done:
        passed = all(r["passed"] for r in reports.values())
        result.files.append({"path": manifest, "precision": prec, "kind": "pipeline", "parity": reports})
        show(f"wrote {manifest}: parity {'pass' if passed else 'FAIL'}")
        if not passed:
            result.failed.append(f"{prec} engines")
