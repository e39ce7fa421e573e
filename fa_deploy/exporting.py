"""fa-export's work, apart from its command line: ONNX files of every precision asked for (a single network, or
the parts of a split detector with a pipeline manifest), their parity against the source weights, and TensorRT
engines. `run_export(settings)` returns an `ExportResult`; the command prints it and sets the exit code."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import numpy as np

from .settings import ExportSettings


@dataclass
class ExportResult:
    files: List[Dict] = field(default_factory=list)  # {"path", "precision", "kind": onnx|engine|pipeline, "parity"}
    tables: List[tuple] = field(default_factory=list)  # (title, rows, columns)
    failed: List[str] = field(default_factory=list)  # precisions outside the parity tolerances

    @property
    def parity_failed(self) -> bool:
        return bool(self.failed)


def _verify_images(model, ckpt, s: ExportSettings, img_size: int, log) -> np.ndarray:
    from .bench import dataset_for

    test_ds = dataset_for(ckpt, "test", s.calib_data, img_size, max_images=s.verify_images, log=log)
    if len(test_ds) == 0:
        from .export import ExportError

        raise ExportError("the test split has no images for the parity check")
    return np.concatenate([test_ds[i][0][None].numpy() for i in range(min(s.verify_images, len(test_ds)))])


def tensorrt_or_explain(s: ExportSettings, img_size: int) -> None:
    """--engine without TensorRT or a GPU: the ONNX files are written; the error says what to run on the GPU."""
    from .tensorrt import TensorRTUnavailable, tensorrt_available

    ok, why = tensorrt_available()
    if not ok:
        raise TensorRTUnavailable(
            f"TensorRT engines not built: {why}.\nThe ONNX files are written; build the engines on the deployment "
            f"GPU with:\n  pip install -e '.[gpu]'\n  fa-export {s.weights} "
            + " ".join(f"--engine {p}" for p in s.engine)
            + (f" --dynamic-batch {':'.join(map(str, s.dynamic))}" if s.dynamic else "") + f" --img-size {img_size}")


def run_export(s: ExportSettings, log: Callable[[str], None] = print,
               show: Callable[[str], None] = print) -> ExportResult:
    """`log` gets progress lines, `show` each table as soon as it is complete."""
    from fa_train.checkpoint import load_model

    from .bench import checkpoint_data

    s.validate()
    model, ckpt = load_model(s.weights)
    model.eval()
    calib_spec, img_size, _ = checkpoint_data(ckpt, s.calib_data, s.img_size)
    if img_size % 32:
        from fa_train.errors import SettingsError

        raise SettingsError(f"--img-size {img_size}: must be a multiple of 32")
    out_dir = s.out_dir or os.path.join(os.path.dirname(os.path.abspath(s.weights)), "export")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(s.weights))[0]
    if getattr(model, "export_parts", None):  # deployed as several networks with the model's glue
        return _export_split(model, ckpt, s, out_dir, stem, img_size, calib_spec, log, show)
    return _export_single(model, ckpt, s, out_dir, stem, img_size, calib_spec, log, show)


def _export_single(model, ckpt, s, out_dir, stem, img_size, calib_spec, log, show) -> ExportResult:
    from fa_train.engine import make_loader

    from . import export as ex
    from .backends import OrtBackend, TorchBackend, run_batched
    from .bench import dataset_for
    from .report import console_table

    keep = getattr(model, "export_keep_float32", ())
    brange, dynamic = s.batch_range, s.dynamic is not None
    result = ExportResult()
    paths = {}
    fp32 = os.path.join(out_dir, f"{stem}.fp32.onnx")
    ex.export_fp32(model, fp32, img_size, batch=brange[1], dynamic_batch=dynamic, opset=s.opset)
    paths["fp32"] = fp32
    verify = _verify_images(model, ckpt, s, img_size, log)
    if "fp16" in s.precisions:
        paths["fp16"] = os.path.join(out_dir, f"{stem}.fp16.onnx")
        kept = ex.export_fp16(fp32, paths["fp16"], keep)
        log(f"fp16: {len(kept)} decode nodes kept in float32")
    if "int8" in s.precisions:
        cal_ds = dataset_for(ckpt, "train", s.calib_data, img_size, max_images=s.calib_images, log=log)
        cal = ex.calibration_batches(model, make_loader(cal_ds, 8, False, 0), s.calib_images, s.calib_pgd,
                                     s.calib_eps)
        paths["int8"] = os.path.join(out_dir, f"{stem}.int8.onnx")
        ex.export_int8(fp32, paths["int8"], cal, keep)
        log(f"int8: calibrated on {sum(len(c) for c in cal)} images{' (clean + PGD)' if s.calib_pgd else ''}")
    for prec in s.precisions:
        info = ex.sidecar_info(s.weights, ckpt, model, img_size, prec, s.opset, list(brange) if dynamic else s.batch)
        if prec == "int8":
            info["calibration"] = {"images": s.calib_images, "pgd": s.calib_pgd,
                                   "eps": s.calib_eps if s.calib_pgd else None, "data": calib_spec}
        ex.write_sidecar(paths[prec], info)

    def run(backend):  # parity in batches the exported shape accepts
        return run_batched(backend.raw, verify, brange)

    ref = run(TorchBackend(model))
    rows = []
    for prec in s.precisions:
        rep = ex.parity(ref, run(OrtBackend(paths[prec], ["CPUExecutionProvider"])), prec)
        for name, o in rep["outputs"].items():
            rows.append({"file": os.path.basename(paths[prec]), "output": name, "max_abs": o.get("max_abs"),
                         "mean_abs": o.get("mean_abs"), "max_rel": o.get("max_rel"),
                         "fail_frac": o.get("fail_fraction", "-"),
                         "result": "pass" if o.get("passed", True) else "FAIL",
                         "size_MB": os.path.getsize(paths[prec]) / 2**20})
        ex.write_sidecar(paths[prec], {**ex.read_sidecar(paths[prec]), "parity": rep})
        result.files.append({"path": paths[prec], "precision": prec, "kind": "onnx", "parity": rep})
        if not rep["passed"]:
            result.failed.append(prec)
    columns = ["file", "output", "max_abs", "mean_abs", "max_rel", "fail_frac", "result", "size_MB"]
    title = f"parity against {s.weights} on {len(ref[0])} images (ONNX Runtime CPU)"
    result.tables.append((title, rows, columns))
    show(console_table(rows, columns, title))
    for prec in s.precisions:
        show(f"wrote {paths[prec]} (+ .json sidecar)")
    if s.engine:
        tensorrt_or_explain(s, img_size)
        from .backends import TrtBackend
        from .tensorrt import build_engine

        for prec in s.engine:
            eng = os.path.join(out_dir, f"{stem}.{prec}.engine")
            meta = build_engine(paths[prec], eng, ex.INPUT_NAME, img_size, brange, s.workspace, s.timing_cache,
                                log=log)
            ex.write_sidecar(eng, {**ex.read_sidecar(paths[prec]), **meta, "precision": prec})
            rep = ex.parity(ref, run(TrtBackend(eng)), prec)
            ex.write_sidecar(eng, {**ex.read_sidecar(eng), "parity": rep})
            result.files.append({"path": eng, "precision": prec, "kind": "engine", "parity": rep})
            show(f"wrote {eng}: parity {'pass' if rep['passed'] else 'FAIL'}")
            if not rep["passed"]:
                result.failed.append(f"{prec} engine")
    return result


def _export_split(model, ckpt, s, out_dir, stem, img_size, calib_spec, log, show) -> ExportResult:
    """A detector deployed as two networks (Faster R-CNN; fa_deploy/split.py): the ONNX parts and a pipeline
    manifest per precision, parity of each part against the source, TensorRT engines of each part."""
    from fa_train.engine import make_loader

    from . import export as ex
    from . import split
    from .backends import OrtBackend
    from .bench import dataset_for
    from .report import console_table

    def calibration():
        cal_ds = dataset_for(ckpt, "train", s.calib_data, img_size, max_images=s.calib_images, log=log)
        return ex.calibration_batches(model, make_loader(cal_ds, 4, False, 0), s.calib_images, s.calib_pgd,
                                      s.calib_eps)

    calib_info = {"images": s.calib_images, "pgd": s.calib_pgd, "eps": s.calib_eps if s.calib_pgd else None,
                  "data": calib_spec, "parts": ["backbone"]}
    manifests = split.export_split(model, s.weights, ckpt, out_dir, stem, s.precisions, img_size, s.opset,
                                   calibration, calib_info, log=log)
    verify = _verify_images(model, ckpt, s, img_size, log)
    result = ExportResult()
    rows = []

    def record(label, reports, sizes):
        ok = True
        for part, rep in reports.items():
            for name, o in rep["outputs"].items():
                rows.append({"file": label, "part": part, "output": name, "max_abs": o.get("max_abs"),
                             "mean_abs": o.get("mean_abs"), "max_rel": o.get("max_rel"),
                             "fail_frac": o.get("fail_fraction", "-"),
                             "result": "pass" if o.get("passed", True) else "FAIL", "size_MB": sizes[part]})
            ok &= rep["passed"]
        return ok

    for prec in s.precisions:
        info = split.read_manifest(manifests[prec])
        base = os.path.dirname(manifests[prec])
        part_files = {k: os.path.join(base, v) for k, v in info["parts"].items()}
        reports = split.part_parity(model, manifests[prec], verify,
                                    lambda part: OrtBackend(part_files[part], ["CPUExecutionProvider"]).raw)
        split.write_manifest(manifests[prec], {**info, "parity": reports})
        result.files.append({"path": manifests[prec], "precision": prec, "kind": "pipeline", "parity": reports})
        if not record(os.path.basename(manifests[prec]), reports,
                      {k: os.path.getsize(v) / 2**20 for k, v in part_files.items()}):
            result.failed.append(prec)
    columns = ["file", "part", "output", "max_abs", "mean_abs", "max_rel", "fail_frac", "result", "size_MB"]
    title = f"parity of each part against {s.weights} on {len(verify)} images (ONNX Runtime CPU)"
    result.tables.append((title, rows, columns))
    show(console_table(rows, columns, title))
    for prec in s.precisions:
        show(f"wrote {manifests[prec]} (parts: {', '.join(split.read_manifest(manifests[prec])['parts'].values())})")
    if s.engine:
        tensorrt_or_explain(s, img_size)
        from .backends import TrtBackend
        from .tensorrt import build_engine

        brange = s.batch_range
        h, w = model.transformed_size(img_size)
        channels = model.detector.backbone.out_channels
        pool = model.detector.roi_heads.box_roi_pool.output_size
        pool = (pool, pool) if isinstance(pool, int) else tuple(pool)
        per_image = int(model.detector.rpn._post_nms_top_n["testing"])
        shapes = {"backbone": tuple((b, 3, h, w) for b in brange),
                  "roi_heads": ((1, channels, *pool), (per_image * brange[1], channels, *pool),
                                (per_image * brange[2], channels, *pool))}
        for prec in s.engine:
            info = split.read_manifest(manifests[prec])
            base = os.path.dirname(manifests[prec])
            engines, metas = {}, {}
            for part, onnx_name in info["parts"].items():
                eng = os.path.join(out_dir, f"{stem}.{prec}.{part}.engine")
                metas[part] = build_engine(os.path.join(base, onnx_name), eng, info["part_io"][part]["input"], img_size,
                                           brange, s.workspace, s.timing_cache, log=log, profile_shapes=shapes[part])
                ex.write_sidecar(eng, {**metas[part], "precision": info["part_precisions"][part]})
                engines[part] = os.path.basename(eng)
            manifest = os.path.join(out_dir, f"{stem}.{prec}.engine.pipeline.json")
            split.write_manifest(manifest, {**info, **metas["backbone"], "format": "tensorrt-pipeline",
                                             "parts": engines})
            reports = split.part_parity(model, manifest, verify,
                                        lambda part: TrtBackend(os.path.join(out_dir, engines[part])).raw)
            split.write_manifest(manifest, {**split.read_manifest(manifest), "parity": reports})
            passed = all(r["passed"] for r in reports.values())
            result.files.append({"path": manifest, "precision": prec, "kind": "pipeline", "parity": reports})
            show(f"wrote {manifest}: parity {'pass' if passed else 'FAIL'}")
            if not passed:
                result.failed.append(f"{prec} engines")
    return result
