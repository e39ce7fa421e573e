"""Detector -> ONNX at fp32, fp16 and int8, with a JSON sidecar and a parity check against the source weights.

- fp32: `export_module()` (raw decoded predictions, no NMS) through the TorchScript-based exporter
  (`dynamo=False`), opset 17, input `images` [N,3,H,W] float32 in [0,1], output `predictions`, dynamic batch;
  `onnx.checker` and shape inference must pass.
- fp16: float16 weights and compute with float32 inputs and outputs (onnxconverter-common,
  `keep_io_types=True`). The box decode (everything downstream of the model's prediction layers:
  sigmoid, grid offsets, `exp(t) * anchor`) stays float32: `exp` overflows float16 past 11.1 and box
  coordinates of a 416 px image would only keep 0.25 px resolution.
- int8: explicit Q/DQ (QDQ format) through ONNX Runtime's static quantization on calibration images from the
  training data, symmetric int8 activations and per-channel symmetric int8 weights (the form TensorRT
  accepts for explicit quantization); the decode stays float. Optionally calibrated on clean plus PGD images
  made with the source weights, so activation ranges cover attacked inputs.
"""
from __future__ import annotations

import datetime
import os
import platform
from typing import Dict, Iterable, List, Sequence

import numpy as np
import torch

from fa_deploy.runtime.metadata import (ExportError, check_onnx, onnx_batch_range, onnx_metadata,  # noqa: F401
                                        read_sidecar, set_onnx_metadata, sha256, write_sidecar)

INPUT_NAME = "images"
OUTPUT_NAMES = ("predictions",)
DEFAULT_OPSET = 17
# parity tolerances by precision (Polygraphy convention: an element fails only if it exceeds both atol and rtol)
TOLERANCES = {"fp32": {"atol": 1e-3, "rtol": 1e-3, "max_fail_fraction": 0.0},
              "fp16": {"atol": 2e-2, "rtol": 2e-2, "max_fail_fraction": 1e-3},
              "int8": None}  # reported, not gated: the robustness harness gates int8 on AP


def library_versions() -> Dict[str, str]:
    import onnx
    import torchvision

    from fa_train import __version__

    from fa_deploy.runtime.backends import import_onnxruntime

    return {"fa_toolkit": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "onnx": onnx.__version__, "onnxruntime": import_onnxruntime().__version__,
            "python": platform.python_version()}


def stamp_onnx(path: str, info: Dict) -> None:
    """Record where a file comes from inside it (metadata_props, see `onnx_metadata`), rewriting it in place
    through a temporary file."""
    import onnx

    model = onnx.load(path)
    set_onnx_metadata(model, info)
    tmp = path + ".stamp.tmp"
    onnx.save(model, tmp)
    os.replace(tmp, path)


def export_fp32(model, path: str, img_size: int, batch: int = 1, dynamic_batch: bool = True,
                opset: int = DEFAULT_OPSET) -> str:
    module = model.export_module().eval()  # NotImplementedError for models without an export path yet
    dummy = torch.rand(batch, 3, img_size, img_size)
    dyn = {INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in OUTPUT_NAMES}} if dynamic_batch else None
    tmp = path + ".tmp.onnx"
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        # shape checks and the per-scale loop are constant for a fixed input size: the trace is exact
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, (dummy,), tmp, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          opset_version=opset, dynamic_axes=dyn, dynamo=False, do_constant_folding=True)
    check_onnx(tmp)
    os.replace(tmp, path)
    return path


def decode_nodes(onnx_model, prefixes: Sequence[str]) -> List[str]:
    """Names of the nodes downstream of the convolutions whose weights start with one of `prefixes`."""
    init_names = {i.name for i in onnx_model.graph.initializer}
    seeds = set()
    for node in onnx_model.graph.node:
        if node.op_type == "Conv" and any(i in init_names and any(i.startswith("model." + p) or i.startswith(p)
                                                                   for p in prefixes) for i in node.input):
            seeds.update(node.output)
    if not seeds:
        raise ExportError(f"no prediction convolutions found for {list(prefixes)} in the exported graph")
    consumers: Dict[str, list] = {}
    for node in onnx_model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    out, frontier, seen = [], list(seeds), set()
    while frontier:
        t = frontier.pop()
        for node in consumers.get(t, []):
            if node.name not in seen:
                seen.add(node.name)
                out.append(node.name)
                frontier.extend(node.output)
    return out


def export_fp16(fp32_path: str, path: str, keep_float32_prefixes: Sequence[str]) -> List[str]:
    import onnx
    from onnxconverter_common import float16

    import warnings

    model = onnx.load(fp32_path)
    keep = decode_nodes(model, keep_float32_prefixes) if keep_float32_prefixes else []
    _detach_consumed_outputs(model)
    with warnings.catch_warnings():  # one warning per weight below float16's smallest normal; expected
        warnings.simplefilter("ignore", UserWarning)
        model16 = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    _outputs_to_float32(model16)
    tmp = path + ".tmp.onnx"
    onnx.save(model16, tmp)
    check_onnx(tmp)
    os.replace(tmp, path)
    return keep


def _detach_consumed_outputs(model) -> None:
    """A graph output that other nodes also consume (Faster R-CNN's FPN levels feed the RPN head and leave the
    backbone part) would stay float32 under keep_io_types while its consumers get float16 weights; give such an
    output its own Identity node, so the internal tensor converts and only the graph output is cast back."""
    from onnx import helper

    outputs = {o.name for o in model.graph.output}
    consumed = {i for n in model.graph.node for i in n.input}
    for name in sorted(outputs & consumed):
        inner = name + "_inner"
        for n in model.graph.node:
            n.output[:] = [inner if o == name else o for o in n.output]
            n.input[:] = [inner if i == name else i for i in n.input]
        model.graph.node.append(helper.make_node("Identity", [inner], [name], name=name + "_output"))


def _outputs_to_float32(model) -> None:
    """onnxconverter-common casts a graph output back to float16 when the node producing it is in the block
    list, despite keep_io_types; make every float16 graph output float32 again."""
    import onnx
    from onnx import helper

    producers = {o: n for n in model.graph.node for o in n.output}
    for out in model.graph.output:
        tt = out.type.tensor_type
        if tt.elem_type != onnx.TensorProto.FLOAT16:
            continue
        node = producers.get(out.name)
        if node is not None and node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to":
                    a.i = onnx.TensorProto.FLOAT
        else:
            src = out.name + "_fp16"
            if node is not None:
                node.output[list(node.output).index(out.name)] = src
            model.graph.node.append(helper.make_node("Cast", [src], [out.name], to=onnx.TensorProto.FLOAT,
                                                     name=out.name + "_to_float32"))
        tt.elem_type = onnx.TensorProto.FLOAT


def rebatch(batches: Iterable[np.ndarray], batch_range) -> List[np.ndarray]:
    """The same images in batches a file accepts (MIN:OPT:MAX, MAX None = any): at most MAX each, a remainder
    below MIN padded with copies of its last image (min-max calibration ranges do not change with duplicates)."""
    lo, _, hi = batch_range
    images = [b for b in batches if len(b)]
    if not images:
        return []
    allx = np.concatenate(images)
    hi = len(allx) if hi is None else int(hi)
    out = []
    for i in range(0, len(allx), hi):
        chunk = allx[i:i + hi]
        if len(chunk) < lo:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], lo - len(chunk), axis=0)])
        out.append(np.ascontiguousarray(chunk, dtype=np.float32))
    return out


class _CalibrationReader:
    def __init__(self, batches: Iterable[np.ndarray], input_name: str = INPUT_NAME):
        self._batches = list(batches)
        self._it = iter(self._batches)
        self.input_name = input_name

    def get_next(self):
        b = next(self._it, None)
        return None if b is None else {self.input_name: b}

    def __len__(self):
        return len(self._batches)

    def rewind(self):
        self._it = iter(self._batches)


def export_int8(fp32_path: str, path: str, calibration: Iterable[np.ndarray], keep_float_prefixes: Sequence[str]):
    import logging

    import onnx

    fp32 = onnx.load(fp32_path)
    exclude = decode_nodes(fp32, keep_float_prefixes) if keep_float_prefixes else []
    input_name = [i.name for i in fp32.graph.input][0]
    batches = rebatch(calibration, onnx_batch_range(fp32, input_name))  # batches the fp32 file accepts
    if not batches:
        raise ExportError("no calibration images: the calibration data is empty")
    del fp32
    tmp = path + ".tmp.onnx"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT's "consider pre-processing" advice, printed through the root logger
    try:
        _quantize(fp32_path, tmp, _CalibrationReader(batches, input_name), exclude)
    finally:
        root.setLevel(level)
    check_onnx(tmp)
    os.replace(tmp, path)
    return exclude


# Conv biases stay float: ONNX Runtime would otherwise store each as an INT32 DequantizeLinear, which TensorRT's
# parser refuses (DequantizeLinear takes INT8/FP8/INT4 inputs only). TensorRT fuses a float bias into the int8
# convolution itself.
QUANTIZE_OPTIONS = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}


def _quantize(fp32_path, tmp, reader, exclude):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(fp32_path, tmp, reader, quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude,
                    extra_options=dict(QUANTIZE_OPTIONS))


def calibration_batches(model, loader, num_images: int, with_pgd: bool = False, eps: float = 0.03,
                        pgd_steps: int = 1) -> List[np.ndarray]:
    """Calibration inputs as float32 numpy batches: clean images, plus their PGD versions made with the source
    weights when `with_pgd` (so activation ranges cover attacked inputs)."""
    from fa_train.adversarial.attacks import pgd_attack

    out, n = [], 0
    for images, targets, _ in loader:
        if n >= num_images:
            break
        images = images[: num_images - n]
        targets = targets[: len(images)]
        out.append(images.numpy().astype(np.float32))
        if with_pgd:
            adv = pgd_attack(model, images, targets, eps=eps, steps=pgd_steps)
            out.append(adv.numpy().astype(np.float32))
        n += len(images)
    if not out:
        raise ExportError("no calibration images: the calibration data is empty")
    return out


def parity(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], precision: str,
           names: Sequence[str] = OUTPUT_NAMES) -> Dict:
    """Per output: max / mean absolute and relative error, the failing fraction, and pass/fail by precision."""
    tol = TOLERANCES[precision]
    report = {"precision": precision, "tolerance": tol, "outputs": {}, "passed": True}
    for name, a, b in zip(names, reference, candidate):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            report["outputs"][name] = {"error": f"shape {b.shape} != reference {a.shape}"}
            report["passed"] = False
            continue
        diff = np.abs(a - b)
        rel = diff / np.maximum(np.abs(a), 1e-12)
        entry = {"max_abs": float(diff.max(initial=0)), "mean_abs": float(diff.mean()) if diff.size else 0.0,
                 "max_rel": float(rel.max(initial=0)), "mean_rel": float(rel.mean()) if rel.size else 0.0,
                 "finite": bool(np.isfinite(b).all())}
        if tol is not None:
            fails = (diff > tol["atol"]) & (diff > tol["rtol"] * np.abs(a))
            entry["fail_fraction"] = float(fails.mean()) if fails.size else 0.0
            entry["passed"] = entry["finite"] and entry["fail_fraction"] <= tol["max_fail_fraction"]
            report["passed"] &= entry["passed"]
        report["outputs"][name] = entry
    return report


def sidecar_info(weights: str, ckpt: dict, model, img_size: int, precision: str, opset: int, batch) -> dict:
    return {
        "format": "onnx", "precision": precision, "source_weights": os.path.abspath(weights),
        "source_sha256": sha256(weights), "model": model.arch_config(), "classes": ckpt.get("class_names"),
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, img_size, img_size], "dtype": "float32",
                  "range": [0.0, 1.0], "batch": batch},
        "outputs": list(OUTPUT_NAMES), "opset": opset, "versions": library_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
