"""Two-network deployment of a detector whose whole graph neither converts to float16 nor parses in TensorRT
(Faster R-CNN: torchvision's graph holds NMS with data-dependent output sizes, multi-scale RoIAlign and the `If`
and `Loop` nodes they bring; onnxconverter-common's float16 pass fails on those subgraphs, and TensorRT's parser
has no RoIAlign / dynamic NMS without plugins).

The model names its deployable networks (`Detector.part_modules()`, for Faster R-CNN `backbone` = ResNet + FPN +
RPN head convolutions, and `roi_heads` = the box head MLP + predictor); each is exported like any network (ONNX
fp32 / fp16 / int8, TensorRT engines) and a manifest `<stem>.<precision>.pipeline.json` lists the files. At run
time `PipelineBackend` (fa_deploy/runtime/pipeline.py) runs the parts (ONNX Runtime or TensorRT) and the model's `run_split` glue: torchvision's
own code for the transform, anchors, proposal decoding + NMS, multi-scale RoIAlign, detection decoding + NMS and
rescaling, on the CPU in PyTorch. int8 quantizes the backbone part (where the compute is); the RoI head part stays
float32. Parts are exported with the TorchScript-based exporter (`dynamo=False`, opset 17): the dynamo exporter
fails on torchvision's detection models.
"""
from __future__ import annotations

import os
import shutil
import warnings
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from fa_deploy.exporting import onnx_export as ex
from fa_deploy.runtime.pipeline import read_manifest
from fa_deploy.report.tables import write_json

BACKBONE_INPUT = "images"
ROI_INPUT = "box_features"


def _part_names(model) -> Dict[str, dict]:
    from fa_train.models.faster_rcnn import FPN_LEVELS

    lv = [f"p{l}" for l in FPN_LEVELS]
    return {"backbone": {"input": BACKBONE_INPUT,
                         "outputs": [f"feat_{l}" for l in lv] + [f"objectness_{l}" for l in lv]
                         + [f"deltas_{l}" for l in lv]},
            "roi_heads": {"input": ROI_INPUT, "outputs": ["class_logits", "box_regression"]}}


def _export_part(module, dummy, path, input_name, output_names, opset, dynamic=True):
    dyn = {input_name: {0: "n"}, **{o: {0: "n"} for o in output_names}} if dynamic else None
    tmp = path + ".tmp.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # dynamo=False on purpose: see the module docstring
        torch.onnx.export(module.eval(), (dummy,), tmp, input_names=[input_name], output_names=output_names,
                          opset_version=opset, dynamic_axes=dyn, dynamo=False, do_constant_folding=True)
    ex.check_onnx(tmp)
    os.replace(tmp, path)
    return path


def transformed(model, images: np.ndarray) -> np.ndarray:
    """The backbone part's input: the images after torchvision's transform (normalised, resized, padded)."""
    image_list, _ = model.detector.transform(list(torch.as_tensor(images)))
    return image_list.tensors.numpy()


def torch_runners(model) -> Dict[str, Callable]:
    parts = {k: m.eval() for k, m in model.part_modules().items()}

    def runner(m):
        def run(x):
            with torch.inference_mode():
                return [o.numpy() for o in m(torch.from_numpy(np.ascontiguousarray(x)))]
        return run

    return {k: runner(m) for k, m in parts.items()}


def roi_features(model, images: np.ndarray) -> np.ndarray:
    """The RoI head part's inputs on `images`, as the source model computes them (for parity and calibration)."""
    runs = torch_runners(model)
    seen: List[np.ndarray] = []

    def record(x):
        seen.append(np.array(x))
        return runs["roi_heads"](x)

    model.run_split(images, runs["backbone"], record)
    return np.concatenate(seen) if seen else np.zeros((0,), np.float32)


def part_profiles(model, img_size: int, batch_range) -> Dict[str, tuple]:
    """(min, opt, max) input shapes of each part for a batch range of images: the backbone's in images, the RoI
    heads' in RoIs (up to the RPN's post-NMS top-n per image)."""
    h, w = model.transformed_size(img_size)
    channels = model.detector.backbone.out_channels
    pool = model.detector.roi_heads.box_roi_pool.output_size
    pool = (pool, pool) if isinstance(pool, int) else tuple(pool)
    per_image = int(model.detector.rpn._post_nms_top_n["testing"])
    return {"backbone": tuple((int(b), 3, h, w) for b in batch_range),
            "roi_heads": ((1, channels, *pool), (per_image * int(batch_range[1]), channels, *pool),
                          (per_image * int(batch_range[2]), channels, *pool))}


def export_split(model, weights: str, ckpt: dict, out_dir: str, stem: str, precisions, img_size: int, opset: int,
                 calibration: Optional[Callable[[], List[np.ndarray]]], calib_info: dict, log=print,
                 batch_range=(1, 8, 32), dynamic: bool = True) -> Dict[str, str]:
    """ONNX parts for every precision and one manifest each; returns {precision: manifest path}. The backbone part
    takes a dynamic batch (`batch_range` is recorded for its engine profile) or, with `dynamic` False, a static
    batch of batch_range[0]; the RoI head part's axis is always dynamic (the number of RoIs varies)."""
    names = _part_names(model)
    mods = model.part_modules()
    h, w = model.transformed_size(img_size)
    channels = model.detector.backbone.out_channels
    pool = model.detector.roi_heads.box_roi_pool.output_size
    pool = (pool, pool) if isinstance(pool, int) else tuple(pool)
    profiles = part_profiles(model, img_size, batch_range)
    dummies = {"backbone": torch.rand(int(batch_range[1]), 3, h, w), "roi_heads": torch.rand(16, channels, *pool)}
    files = {p: {} for p in precisions}
    for part in ("backbone", "roi_heads"):
        fp32 = os.path.join(out_dir, f"{stem}.fp32.{part}.onnx")
        _export_part(mods[part], dummies[part], fp32, names[part]["input"], names[part]["outputs"], opset,
                     dynamic=dynamic or part != "backbone")
        files.setdefault("fp32", {})[part] = fp32
        if "fp16" in precisions:
            files["fp16"][part] = os.path.join(out_dir, f"{stem}.fp16.{part}.onnx")
            ex.export_fp16(fp32, files["fp16"][part], ())
    if "int8" in precisions:
        cal = calibration() if calibration else []
        files["int8"]["backbone"] = os.path.join(out_dir, f"{stem}.int8.backbone.onnx")
        ex.export_int8(files["fp32"]["backbone"], files["int8"]["backbone"], [transformed(model, c) for c in cal], ())
        files["int8"]["roi_heads"] = os.path.join(out_dir, f"{stem}.int8.roi_heads.onnx")
        shutil.copyfile(files["fp32"]["roi_heads"], files["int8"]["roi_heads"])
        log(f"int8: backbone part calibrated on {sum(len(c) for c in cal)} images; the RoI head part stays float32")
    manifests = {}
    for prec in precisions:
        info = ex.sidecar_info(weights, ckpt, model, img_size, prec, opset, list(batch_range))
        info.update(format="onnx-pipeline", outputs=["detections"], batch_range=list(batch_range),
                    dynamic_batch=dynamic,
                    part_batch_range={k: [v[0][0], v[1][0], v[2][0]] for k, v in profiles.items()},
                    parts={k: os.path.basename(v) for k, v in files[prec].items()},
                    part_precisions={"backbone": prec, "roi_heads": "fp32" if prec == "int8" else prec},
                    part_io=names, transformed_size=[h, w],
                    glue="torchvision (transform, anchors, proposals + NMS, MultiScaleRoIAlign, detections + NMS)")
        if prec == "int8":
            info["calibration"] = calib_info
        manifests[prec] = write_manifest(os.path.join(out_dir, f"{stem}.{prec}.pipeline.json"), info)
    return manifests


def write_manifest(path: str, info: dict) -> str:
    write_json(info, path)  # atomic: temporary file, then rename
    return path


def part_parity(model, manifest: str, verify: np.ndarray, run_part: Callable[[str], Callable]) -> dict:
    """Each part against the source's torch part on the same inputs: the backbone on the transformed verify
    images, the RoI heads on the source's pooled RoI features of those images."""
    info = read_manifest(manifest)
    runs = torch_runners(model)
    inputs = {"backbone": transformed(model, verify), "roi_heads": roi_features(model, verify)}
    reports = {}
    for part in ("backbone", "roi_heads"):
        ref = runs[part](inputs[part])
        cand = run_part(part)(inputs[part])
        reports[part] = ex.parity(ref, cand, info["part_precisions"][part], names=info["part_io"][part]["outputs"])
    return reports


