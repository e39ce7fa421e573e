"""Differentiable twins of deployed files: a torch Detector that computes what an exported ONNX file computes,
proven equal to ONNX Runtime's outputs of that file before anything may use it, so an attack loop can take
gradients through the deployed precision (white-box on fp16 / int8) instead of only transferring from the source.

- The network is the file's graph interpreted in PyTorch (`fa_deploy/robustness/interpreter.py`), not the model rebuilt with
  the file's settings: float16 nodes exactly where the file has them, the file's own int8 scales and zero points
  (fake quantization, straight-through rounding), so the twin is the deployed graph by construction. Everything
  around the network is the model's own code: YOLOv3's `yolo_loss` on the head maps the file's decode reads,
  its `postprocess`; for Faster R-CNN torchvision's transform, anchors, proposals, RoIAlign, losses and
  detection post-processing with the two part twins in place of the backbone + RPN head and of the box head, so
  the whole deployment is differentiable end to end with respect to the input images.
- `YoloTwin` and `FasterRCNNTwin` are the model classes with their networks replaced; they keep the Detector
  contract (`forward_train`, `predict`, `postprocess`, `features`, `loss_domains`) and refuse to run until
  `verify(images)` has passed: `verify_twin` compares every output with ONNX Runtime on the same inputs,
  Polygraphy style (an element fails when it is outside both atol and rtol), with the tolerances of
  `TOLERANCES`, and raises `TwinMismatch` naming the file and the output, with the numbers.
- `load_twin(path, verify_images)` opens what fa-export wrote: a whole-model `.onnx` (its sidecar describes the
  model), a `.pipeline.json` manifest of parts, or a TensorRT engine (attacked through the twin of the ONNX file
  it was built from, named in its sidecar).

Reference and tolerances (`TOLERANCES`; atol in units of the output's RMS), measured on the test fixtures and on
a random-weight ResNet-50 FPN at 320 px (README "Twins of the deployed files"):
- fp32: ONNX Runtime CPU; the twin differs by float32 summation order only (at most 2e-5 x RMS); atol = rtol = 1e-4.
- fp16: ONNX Runtime CPU. Its CPU kernels do not compute in float16: it casts float16 nodes to float32 and then
  removes the Cast pairs between them, so it runs float32 arithmetic on float16 weights with no float16 rounding
  of activations (measured: its outputs are not even float16 values). The twin rounds every float16 node output
  as the file specifies (as float16 hardware does); the tolerance covers that rounding: measured at most
  1.3e-2 x RMS (7e-3 on the trained fixture), so atol 3e-2, rtol 2e-2, at most 0.1 % of elements outside.
- fp32 / fp16 whose free-running outputs miss the gate by at most LAYER_CHECK_SLACK (10) x: decided layer by layer
  (`_verify_layers`), each layer of the twin on ONNX Runtime's own inputs, every floating-point tensor within the
  same tolerance, on every verification input; for ill-conditioned networks (FCOS's GroupNorm over 2 values on a
  1 x 1 level) where a correct twin's outputs differ by more than the last bits of float sums. Both comparisons
  stay in the report (`free_running`, `layers`).
- int8: ONNX Runtime's integer kernels in its high-precision mode (`session.x64quantprecision`). By default its
  x86 kernels on a CPU without VNNI (this machine: AVX2 only) multiply u8 x s8 with `vpmaddubsw`, which
  saturates pairs of products at int16, so they compute a different function from the file (measured: mean
  0.68 against 0.04 off on the fixture's predictions); the high-precision mode does not saturate (a no-op on
  VNNI CPUs). Its s8 -> u8 pass fails on initializers shared between nodes, so the reference loads the file with
  shared constants copied per reader (same values). A quantized network is discontinuous: float summation order
  moves a value across a rounding boundary now and then, and one step early on moves more values later (the
  fixture: 12 % of YOLOv3's predictions differ, 0.09 % by more than 10 %), so comparing free-running outputs
  cannot tell a correct twin from one with a wrong scale. The check is per layer instead: ONNX Runtime's integer
  activations are exposed (which leaves its outputs unchanged, tested), each fake-quantized activation of the
  twin, computed from ONNX Runtime's own inputs to that layer, must be within one quantization step everywhere
  and a step apart on at most 5 % of its elements (measured 2026-12-02 on the test fixtures, clean images and
  the same with uniform noise at 0.03: 0.004-0.03 % of a layer's elements on average over the layers, at most
  0.20-1.04 % in one layer on this AVX2 machine, 1.56 % reported on an AVX-512 VNNI one, where ONNX Runtime's
  integer kernels and torch's float paths round differently; a scale off by 2x: 27 % to 100 %, up to 64 steps:
  5 % sits between the two with a margin of 3x above the correct twins and 5x below the wrong ones; the one-step
  bound, which a wrong scale breaks at once, is the sharper test); only flips away from a rounding tie count
  (the twin's value before rounding more than `tie_steps` = 0.02 steps from a boundary: a layer whose value sits
  on a boundary for every image, a squeeze-excitation channel of a tiny SSDlite, flipped 12.5 % of its elements
  together, every flip within 0.0023 steps of a boundary), and the outputs computed on that footing match to 1e-4.
  The free-running difference is reported (`free_running`), not gated. fa-bench verifies each twin on 8 test images
  and on the same with uniform noise at --eps, and logs the disagreement measured.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from fa_train.models.faster_rcnn import FPN_LEVELS, FasterRCNNFPN, _Call  # _Call: a function as a module
from fa_train.models.yolov3 import YoloConfig, YoloV3
from fa_train.models.one_stage import ONE_STAGE
from fa_train.models.ultralytics_yolo import UltralyticsYolo

from fa_deploy.robustness.interpreter import _broadcast, FLOAT16, OnnxGraph
from fa_deploy.runtime.backends import ENGINE_SUFFIXES, OrtBackend, unshare_constants
from fa_deploy.runtime.loading import PIPELINE_SUFFIX
from fa_deploy.runtime.metadata import onnx_metadata, read_sidecar
from fa_deploy.runtime.pipeline import read_manifest


# Polygraphy's convention with atol in units of the output's root mean square: an element fails when
# |twin - ort| > atol * rms(ort) and > rtol * |ort| (float error scales with the magnitudes computed: trained
# weights give activations of ~1, random ones ~70); an output passes when its values are finite and at most
# max_fail_fraction of its elements fail. int8 adds the quantized activations, each compared in quantization
# steps with the layer fed ONNX Runtime's own inputs: at most max_steps apart anywhere, and at most
# max_flip_fraction of the elements one step apart.
TOLERANCES = {
    "fp32": {"atol": 1e-4, "rtol": 1e-4, "max_fail_fraction": 0.0},
    "fp16": {"atol": 3e-2, "rtol": 2e-2, "max_fail_fraction": 1e-3},
    "int8": {"atol": 1e-4, "rtol": 1e-4, "max_fail_fraction": 0.0, "max_steps": 1.0, "max_flip_fraction": 5e-2,
             "tie_steps": 2e-2},
}
# the ONNX Runtime session options of the reference, per precision (see the module docstring for why)
REFERENCE_CONFIG = {"fp32": {}, "fp16": {}, "int8": {"session.x64quantprecision": "1"}}


class TwinError(RuntimeError):
    """A twin that cannot be built or used (no sidecar, an unknown model, not verified yet)."""


class TwinMismatch(TwinError):
    """The twin does not compute what the file computes: refused, with the numbers."""


# ---------------------------------------------------------------------------------------------- verification


def graph_precision(graph: OnnxGraph) -> str:
    """int8 when the graph quantizes, fp16 when it holds float16 tensors, else fp32: read from the file itself."""
    if graph.fake_quant_steps() or any(st.op in ("QuantizeLinear", "DequantizeLinear") for st in graph._steps):
        return "int8"
    if any(t == FLOAT16 for t in graph.types.values()):
        return "fp16"
    return "fp32"


def reference_session(onnx_path: str, precision: str, expose: Dict[str, int] = None, unfused: bool = False):
    """ONNX Runtime (CPU) on the file, configured as REFERENCE_CONFIG says; `expose` adds intermediate tensors
    ({name: ONNX element type}) to the outputs.

    int8 with `expose` (the twin's layer-by-layer check), or `unfused`, runs at ONNX Runtime's basic graph
    optimisations: each QuantizeLinear / DequantizeLinear runs as ONNX defines it around a float operator, which is
    the function the file specifies and the one the twin computes. At its default (extended) level ONNX Runtime
    fuses DQ -> op -> Q into integer kernels (QLinearConv and kin) that requantize with their own rounding, and it
    cannot fuse where a quantized tensor is a graph output, so exposing activations there would change what it
    computes (measured on the Faster R-CNN test fixture: 15-33 % of the backbone outputs one or two output steps
    apart). At the basic level exposing changes nothing (tested, bit for bit). The fused kernels' own rounding is
    what a deployment runs; the twin's free-running difference from it is reported (`free_running`), not gated."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    for k, v in REFERENCE_CONFIG[precision].items():
        so.add_session_config_entry(k, v)
    if precision == "int8" and (expose or unfused):
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if precision != "int8" and not expose:
        return ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    model = onnx.load(onnx_path)
    if precision == "int8":
        unshare_constants(model)
    have = {o.name for o in model.graph.output}
    for name, elem in (expose or {}).items():
        if name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def compare(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], names: Sequence[str],
            tol: dict) -> Dict[str, dict]:
    out = {}
    for name, a, b in zip(names, reference, candidate):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            out[name] = {"passed": False, "error": f"shape {b.shape} != ONNX Runtime's {a.shape}"}
            continue
        diff = np.abs(a - b)
        rms = float(np.sqrt(np.mean(a * a))) if a.size else 0.0
        fails = (diff > tol["atol"] * (rms or 1.0)) & (diff > tol["rtol"] * np.abs(a))
        entry = {"rms": rms, "max_abs": float(diff.max(initial=0.0)),
                 "mean_abs": float(diff.mean()) if diff.size else 0.0,
                 "max_rel": float((diff / np.maximum(np.abs(a), 1e-12)).max(initial=0.0)),
                 "fail_fraction": float(fails.mean()) if fails.size else 0.0, "finite": bool(np.isfinite(b).all())}
        entry["passed"] = entry["finite"] and entry["fail_fraction"] <= tol["max_fail_fraction"]
        out[name] = entry
    return out


def _dequantized(graph: OnnxGraph, st, q: np.ndarray) -> torch.Tensor:
    """ONNX Runtime's integers of a fake-quantized activation, dequantized with the twin's scale and zero point."""
    s = graph.constant(st.inputs[1])
    z = graph.constant(st.inputs[2]) if len(st.inputs) > 2 and st.inputs[2] else None
    v = torch.from_numpy(np.asarray(q)).to(s.device, s.dtype)
    axis = st.attrs.get("axis", 1)
    if z is not None:
        v = v - _broadcast(z.to(s.dtype), axis, v.dim())
    return v * _broadcast(s, axis, v.dim())


def _activation_steps(graph: OnnxGraph, steps, record, force, unrounded: Dict[str, torch.Tensor],
                      tie: float) -> Dict[str, dict]:
    """Each quantized activation of the twin against ONNX Runtime's, in quantization steps: the largest distance,
    the fraction of elements a step apart (`flip_fraction`), and the fraction a step apart where the twin's value
    before rounding was more than `tie` steps from a rounding boundary (`off_tie_flip_fraction`): float summation
    order moves a value that sits on a boundary to either side (measured: every flip of the test fixtures and of
    a tiny SSDlite within 0.0023 steps of one), a wrong scale or zero point moves values that do not."""
    out = {}
    for st in steps:
        name = st.outputs[0]
        if name not in record:
            continue
        s = _broadcast(graph.constant(st.inputs[1]), st.attrs.get("axis", 1), record[name].dim())
        d = ((record[name] - force[name]).abs() / s).double()
        q = (unrounded[st.inputs[0]] / s).double()  # in steps; the zero point, an integer, moves no tie
        flip, off_tie = d > 0.5, (q - q.floor() - 0.5).abs() > tie
        empty = not d.numel()
        out[st.attrs["q_output"]] = {"flip_fraction": 0.0 if empty else float(flip.double().mean()),
                                     "off_tie_flip_fraction": 0.0 if empty else float((flip & off_tie).double().mean()),
                                     "max_steps": 0.0 if empty else float(d.max())}
    return out


def verify_twin(twin: OnnxGraph, onnx_path: str, inputs, precision: Optional[str] = None,
                tolerance: Optional[dict] = None, taps: Sequence[str] = ()) -> dict:
    """The twin's outputs against ONNX Runtime's outputs of `onnx_path` on the same `inputs` (one array, or a dict
    by input name); returns the report, or raises TwinMismatch naming the file and each failing output. `taps`:
    intermediate tensors checked the same way (those a Detector twin's loss and features read), exposed as extra
    outputs of ONNX Runtime's session.

    int8: quantized networks are discontinuous, so float summation order alone moves a few values across a
    rounding boundary, and a one-step difference early on moves more of them later (measured on the test
    fixture: 0.09 % of YOLOv3's predictions beyond 10 %). So each layer is checked on ONNX Runtime's own
    inputs: ONNX Runtime's integer activations are exposed, each fake-quantized activation of the twin is
    compared with them in quantization steps and then replaced by them, and the outputs are compared on that
    footing; the free-running difference is reported too (`free_running`), not gated."""
    precision = precision or graph_precision(twin)
    tol = tolerance or TOLERANCES[precision]
    feeds = inputs if isinstance(inputs, dict) else {twin.input_names[0]: inputs}
    feeds = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in feeds.items()}
    device = next(iter(twin.constants.buffers()), torch.zeros(())).device
    feeds_t = {k: torch.from_numpy(v).to(device) for k, v in feeds.items()}
    outs = list(twin.output_names) + [t for t in taps if t not in twin.output_names]
    fq = twin.fake_quant_steps() if precision == "int8" else []
    expose = {t: twin.tensor_type(t) for t in outs if t not in twin.output_names}
    expose.update({st.attrs["q_output"]: st.attrs["q_type"] for st in fq})
    ref = reference_session(onnx_path, precision, expose).run(outs + [n for n in expose if n not in outs], feeds)
    report = {"file": os.path.abspath(onnx_path), "precision": precision, "tolerance": tol,
              "reference": {"onnxruntime": "CPUExecutionProvider", "session_config": REFERENCE_CONFIG[precision]},
              "inputs": {k: list(v.shape) for k, v in feeds.items()}}
    with torch.no_grad():
        free = [o.float().cpu().numpy() for o in twin.run(feeds_t, outs)]
        if fq:
            force = {o: _dequantized(twin, st, q) for st, q in zip(fq, ref[len(outs):]) for o in st.outputs}
            record: Dict[str, torch.Tensor] = {}
            pre = [n for n in dict.fromkeys(st.inputs[0] for st in fq) if n not in outs]  # before rounding
            run = twin.run(feeds_t, outs + pre, force=force, record=record)
            got = [o.float().cpu().numpy() for o in run[:len(outs)]]
            report["activations"] = _activation_steps(twin, fq, record, force, dict(zip(outs + pre, run)),
                                                      tol.get("tie_steps", 0.0))
            report["free_running"] = compare(ref[:len(outs)], free, outs, tol)
        else:
            got = free
    report["outputs"] = compare(ref[:len(outs)], got, outs, tol)
    bad = _failures(report["outputs"], tol, twin.output_names)
    if bad and not fq:  # float: a near miss (within LAYER_CHECK_SLACK x the gate) is decided layer by layer
        loose = dict(tol, atol=tol["atol"] * LAYER_CHECK_SLACK, rtol=tol["rtol"] * LAYER_CHECK_SLACK)
        if all(o.get("passed", False) for o in compare(ref[:len(outs)], got, outs, loose).values()):
            layers = _verify_layers(twin, onnx_path, precision, feeds, feeds_t, outs, tol)
            layers["free_running_over_gate"] = max(o["max_abs"] / (tol["atol"] * (o["rms"] or 1.0))
                                                   for o in report["outputs"].values())
            report["free_running"], report["layers"] = report["outputs"], layers
            report["outputs"] = layers.pop("outputs")  # on ONNX Runtime's inputs, as int8's are
            bad = [] if layers["passed"] else [f"free running: {'; '.join(bad)}; layer by layer (each layer fed "
                                               f"ONNX Runtime's own inputs): " + "; ".join(layers["failures"])]
        else:
            bad.append(f"(free running beyond {LAYER_CHECK_SLACK:g}x the gate: no layer-by-layer check)")
    for n, a in report.get("activations", {}).items():
        a["passed"] = (a["max_steps"] <= tol["max_steps"] + 1e-3
                       and a["off_tie_flip_fraction"] <= tol["max_flip_fraction"])
        if not a["passed"]:
            bad.append(f"activation {n}: {a['off_tie_flip_fraction']:.3%} of elements a step or more apart away from "
                       f"a rounding tie (allowed {tol['max_flip_fraction']:.3%}; {a['flip_fraction']:.3%} in all), up "
                       f"to {a['max_steps']:.3g} steps (allowed {tol['max_steps']:g})")
    report["passed"] = not bad
    if bad:
        raise TwinMismatch(f"{onnx_path}: the {precision} twin does not compute what the file computes (against "
                           f"ONNX Runtime on {len(next(iter(feeds.values())))} inputs): " + "; ".join(bad))
    return report


def _failures(compared: Dict[str, dict], tol: dict, output_names: Sequence[str]) -> List[str]:
    """One line per tensor of a `compare` report that failed the gate, with its numbers."""
    return [f"{'output' if n in output_names else 'tap'} {n}: " + (o["error"] if "error" in o else
            f"{o['fail_fraction']:.3%} of elements outside atol {tol['atol']:g} x rms {o['rms']:.3g} / rtol "
            f"{tol['rtol']:g} (allowed {tol['max_fail_fraction']:.3%}), max abs {o['max_abs']:.3g}, mean abs "
            f"{o['mean_abs']:.3g}{'' if o['finite'] else ', non-finite values'}")
            for n, o in compared.items() if not o["passed"]]


# A float twin whose free-running outputs miss the gate, but by at most LAYER_CHECK_SLACK x its tolerances, is
# decided layer by layer (ill-conditioned networks: FCOS's fp16 twin misses by up to 4x, its fp32 twin by 1.3x); a
# twin further off is refused as it stands (small errors in every layer add up free running while each layer alone
# stays within the gate). The layer check runs on every verification input, LAYER_CHECK_ELEMENTS input values at a
# time (every activation of the file is held at once).
LAYER_CHECK_SLACK = 10.0
LAYER_CHECK_ELEMENTS = 1_000_000


def _verify_layers(twin: OnnxGraph, onnx_path: str, precision: str, feeds: Dict[str, np.ndarray],
                   feeds_t: Dict[str, torch.Tensor], outs: Sequence[str], tol: dict) -> dict:
    """The float twin checked layer by layer: ONNX Runtime's value of every floating-point tensor the file computes
    is exposed, each of the twin's layers runs on ONNX Runtime's own inputs (its inputs replaced by ONNX Runtime's
    values as they are computed) and its output must pass the gate against ONNX Runtime's. Where a network is
    ill-conditioned (FCOS's GroupNorm over the 2 values of a 1 x 1 map: a difference of one float32 rounding in its
    input moves its output by 300x that), free-running outputs of a correct twin miss the gate by the last bits of
    float32 sums; each layer, fed the same inputs, still computes what the file computes, and a wrong layer (a
    wrong weight, attribute or operator) fails here as it does free running. On every input row, in chunks of
    about LAYER_CHECK_ELEMENTS input values (all of a network's activations are held at once)."""
    floats = (1, FLOAT16)  # onnx.TensorProto.FLOAT, FLOAT16
    names = list(dict.fromkeys(o for st in twin._steps if not st.static for o in st.outputs
                               if o and twin.tensor_type(o) in floats))
    expose = {n: twin.tensor_type(n) for n in names if n not in twin.output_names}
    session = reference_session(onnx_path, precision, expose)
    first = next(iter(feeds.values()))
    rows = len(first)
    chunk = max(1, LAYER_CHECK_ELEMENTS // max(1, int(np.prod(first.shape[1:]))))
    device = next(iter(feeds_t.values())).device
    failures, checked, worst, at_outputs = [], 0, None, {}
    for i in range(0, rows, chunk):
        part = slice(i, min(rows, i + chunk))
        ref = dict(zip(names, session.run(names, {k: v[part] for k, v in feeds.items()})))
        force = {n: torch.from_numpy(np.ascontiguousarray(v)).to(device) for n, v in ref.items()}
        record: Dict[str, torch.Tensor] = {}
        with torch.no_grad():
            twin.run({k: v[part] for k, v in feeds_t.items()}, outs, force=force, record=record)
        got = [n for n in names if n in record]
        compared = compare([ref[n] for n in got], [record[n].float().cpu().numpy() for n in got], got, tol)
        where = f"inputs {part.start}-{part.stop - 1}"
        failures += [f"{where}: {f}" for f in _failures(compared, tol, twin.output_names)]
        for n in outs:  # each output and tap as its layer computes it, the worse of the images
            c = compared.get(n)
            if c is not None and (n not in at_outputs or c.get("max_abs", 0.0) > at_outputs[n].get("max_abs", 0.0)):
                at_outputs[n] = c
        checked = max(checked, len(got))
        for n, c in compared.items():
            r = c.get("max_abs", 0.0) / (c.get("rms") or 1.0)
            if worst is None or r > worst["max_abs_over_rms"]:
                worst = {"tensor": n, "inputs": [part.start, part.stop], "max_abs": c.get("max_abs"),
                         "rms": c.get("rms"), "max_abs_over_rms": r}
    if not checked:
        failures.append("no floating-point layer to check")
    return {"checked": checked, "inputs": rows, "passed": not failures, "failures": failures, "worst": worst,
            "outputs": at_outputs}


# ---------------------------------------------------------------------------------------------- taps


def _readers(graph: OnnxGraph) -> Dict[str, list]:
    out: Dict[str, list] = {}
    for st in graph._steps:
        for i in st.inputs:
            out.setdefault(i, []).append(st)
    return out


def follow_representation(graph: OnnxGraph, tensor: str) -> str:
    """From a tensor to the value its consumers read: through the Cast, QuantizeLinear / DequantizeLinear (fused
    or not) that only change how it is stored (a float16 head map cast to float32 for the decode, an int8
    activation dequantized for the next layer)."""
    readers = _readers(graph)
    while True:
        nxt = [st for st in readers.get(tensor, []) if st.op != "Shape"]
        if nxt and all(st.op in ("Cast", "FakeQuant", "QuantizeLinear", "DequantizeLinear") for st in nxt) and \
                len({(st.op, tuple(st.inputs)) for st in nxt}) == 1:
            # equivalent readers (one Cast per consumer): follow the one that feeds more than shape arithmetic
            tensor = next((st for st in nxt if any(r.op != "Shape" for r in readers.get(st.outputs[0], []))),
                          nxt[0]).outputs[0]
        else:
            return tensor


def scope_output(graph: OnnxGraph, scope: str) -> str:
    """The value leaving a module scope of the exported graph (node names are the module paths, '/a/b/Conv'):
    the output of its last computing node, as its readers see it."""
    marks = (f"/{scope}/", f"/model/{scope}/")
    last = None
    for st in graph._steps:
        if st.name.startswith(marks) and st.op not in ("FakeQuant", "QuantizeLinear", "DequantizeLinear", "Cast"):
            last = st
    if last is None:
        raise TwinError(f"{graph.name}: no node of module {scope!r} in the graph")
    return follow_representation(graph, last.outputs[0])


def conv_output(graph: OnnxGraph, weight_prefix: str) -> str:
    """The value read downstream of the convolution whose weight is named after `weight_prefix` (a parameter path
    such as 'branch32.pred')."""
    for st in graph._steps:
        if st.op == "Conv" and len(st.inputs) > 1 and any(
                st.inputs[1].startswith(p) for p in (f"model.{weight_prefix}.", f"{weight_prefix}.")):
            return follow_representation(graph, st.outputs[0])
    raise TwinError(f"{graph.name}: no convolution with weights {weight_prefix}.* in the graph")


# ---------------------------------------------------------------------------------------------- detector twins


def run_per_image(graph: OnnxGraph, feeds: Dict[str, torch.Tensor], names: Sequence[str],
                  sizes: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
    """`graph.run` on each group of leading rows (`sizes`; default one row each) alone, concatenated: what the file
    computes for each image, independent of the others in the batch (ONNX Runtime's CPU kernels run each image
    of a batch alone too: its outputs for a batch of 8 equal those of 8 batches of 1 exactly, measured)."""
    n = len(next(iter(feeds.values())))
    sizes = [1] * n if sizes is None else [int(k) for k in sizes]
    if sum(sizes) != n:
        raise TwinError(f"{graph.name}: groups of {sizes} rows do not split the batch of {n}")
    if len(sizes) <= 1:
        return graph.run(feeds, names)
    parts = {k: torch.split(v, sizes) for k, v in feeds.items()}
    # each group copied to its own memory, so that its kernels see the layout a batch of one has
    runs = [graph.run({k: v[j].clone() for k, v in parts.items()}, names) for j in range(len(sizes)) if sizes[j]]
    if not runs:
        return graph.run(feeds, names)
    return [torch.cat([r[i] for r in runs]) for i in range(len(names))]


class DeployedTwin:
    """What every twin adds to its model class: the part graphs, their files, and the verification gate."""
    graphs: nn.ModuleDict
    files: Dict[str, str]
    verification: Optional[Dict[str, dict]] = None

    def _init_twin(self, graphs: Dict[str, OnnxGraph], files: Dict[str, str], source: str):
        self.graphs = nn.ModuleDict(graphs)
        self.files = dict(files)
        self.source = source
        self.precisions = {k: graph_precision(g) for k, g in graphs.items()}
        self.verification = None
        self.eval()

    @property
    def precision(self) -> str:
        """The deployment's precision: int8 when any part is quantized, else fp16 when any is float16."""
        p = set(self.precisions.values())
        return "int8" if "int8" in p else "fp16" if "fp16" in p else "fp32"

    def _run(self, part: str, feeds: Dict[str, torch.Tensor], names: Sequence[str],
             sizes: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
        """The part's tensors `names`, computed one image at a time: `sizes` splits the leading dimension of every
        feed into the images' rows (default: one row per image), each group runs alone and the results are
        concatenated, so an image's outputs and gradients are the same bit for bit whatever it is batched with.
        (Run batched, a convolution's or a Gemm's kernel depends on the batch size, which moves the last bits of
        float32 sums; a quantized network turns those into whole quantization steps: issue 23, up to 15.7 apart.)"""
        if self.verification is None:
            raise TwinError(f"{self.source}: twin not verified against ONNX Runtime; call verify(images) first "
                            f"(or load_twin(path, verify_images))")
        return run_per_image(self.graphs[part], feeds, names, sizes)

    def verify(self, images) -> Dict[str, dict]:
        raise NotImplementedError


class OneNetworkTwin(DeployedTwin):
    """A twin whose deployment is one network ("model"): `features` is its tap `mid_name`, predictions its own
    output, verification against ONNX Runtime on the graph's outputs and the taps `_taps()` the loss reads."""

    input_name: str
    mid_name: str

    def _taps(self) -> List[str]:
        raise NotImplementedError

    def features(self, images):
        return self._run("model", {self.input_name: images}, [self.mid_name])[0]

    def export_module(self) -> nn.Module:
        return _Call(lambda images: self._run("model", {self.input_name: images}, self.graphs["model"].output_names)[0])

    def verify(self, images) -> Dict[str, dict]:
        self.verification = None
        x = np.asarray(images.detach().cpu() if isinstance(images, torch.Tensor) else images, np.float32)
        self.verification = {"model": verify_twin(self.graphs["model"], self.files["model"], x, taps=self._taps())}
        return self.verification


class YoloTwin(OneNetworkTwin, YoloV3):
    """YOLOv3 whose network is the deployed file: the loss reads the three head maps the file's decode reads,
    `features` the last Darknet-53 stage as the file computes it; predictions are the file's own decode."""

    def __init__(self, cfg: YoloConfig, graph: OnnxGraph, path: str):
        YoloV3.__init__(self, cfg)
        for name in ("backbone", "branch32", "lateral32", "branch16", "lateral16", "branch8"):
            delattr(self, name)  # the file holds the network
        self._init_twin({"model": graph}, {"model": path}, path)
        self.head_names = [conv_output(graph, p) for p in self.export_keep_float32]  # stride 32, 16, 8
        self.mid_name = scope_output(graph, "backbone")
        self.input_name = graph.input_names[0]

    def _heads(self, images):
        *heads, mid = self._run("model", {self.input_name: images}, self.head_names + [self.mid_name])
        return heads, mid

    def _taps(self) -> List[str]:
        return self.head_names + [self.mid_name]


class FasterRCNNTwin(DeployedTwin, FasterRCNNFPN):
    """Faster R-CNN FPN deployed as two networks, with torchvision's glue between them: the `backbone` part twin
    runs where the ResNet + FPN + RPN head run, the `roi_heads` part twin where the box head + predictor run;
    transform, anchors, proposals + NMS, MultiScaleRoIAlign, losses and post-processing are torchvision's own
    code, so losses against ground truth and detections come through the twin end to end."""

    def __init__(self, arch: dict, graphs: Dict[str, OnnxGraph], files: Dict[str, str], source: str):
        arch = dict(arch)
        arch.pop("name", None)
        FasterRCNNFPN.__init__(self, arch.pop("num_classes"), **arch)
        d = self.detector
        d.backbone = _Call(lambda x: self._features_of(x)[0])
        d.rpn.head = _Call(lambda feats: self._take_rpn_out())
        d.roi_heads.box_head = _Call(self._box_head)
        d.roi_heads.box_predictor = nn.Identity()
        pool = d.roi_heads.box_roi_pool
        d.roi_heads.box_roi_pool = _Call(lambda feats, boxes, sizes: self._pooled(pool, feats, boxes, sizes))
        self._roi_counts = None
        self._init_twin(graphs, files, source)
        bb = graphs["backbone"]
        self.backbone_input = bb.input_names[0]
        self.backbone_outputs = list(bb.output_names)
        if len(self.backbone_outputs) != 3 * len(FPN_LEVELS):
            raise TwinError(f"{files['backbone']}: {len(self.backbone_outputs)} outputs, expected "
                            f"{3 * len(FPN_LEVELS)} (FPN levels, objectness, deltas)")
        self.mid_name = scope_output(bb, "backbone/body/layer4")
        self._rpn_out = None

    def _features_of(self, x):
        self._roi_counts = None  # a new forward: no RoI counts of an earlier one
        outs = self._run("backbone", {self.backbone_input: x}, self.backbone_outputs + [self.mid_name])
        n = len(FPN_LEVELS)
        self._rpn_out = (outs[n:2 * n], outs[2 * n:3 * n])  # read by the RPN head right after
        return OrderedDict(zip(FPN_LEVELS, outs[:n])), outs[-1]

    def _take_rpn_out(self):
        out, self._rpn_out = self._rpn_out, None
        return out

    def _features(self, image_list):
        return self._features_of(image_list.tensors)

    def features(self, images):
        image_list, _ = self.detector.transform(list(images))
        return self._run("backbone", {self.backbone_input: image_list.tensors}, [self.mid_name])[0]

    def _pooled(self, pool, feats, boxes, image_sizes):
        """MultiScaleRoIAlign, noting how many RoIs each image has: the RoI head part runs on each image's RoIs
        alone (`_run`), so they do not depend on the other images of the batch."""
        self._roi_counts = [len(b) for b in boxes]
        return pool(feats, boxes, image_sizes)

    def _box_head(self, x):
        g = self.graphs["roi_heads"]
        counts, self._roi_counts = self._roi_counts, None
        if x.shape[0] == 0:
            k = self.num_classes + 1
            return x.new_zeros(0, k), x.new_zeros(0, 4 * k)
        if counts is None or sum(counts) != x.shape[0]:
            counts = [x.shape[0]]  # RoI features not pooled by the glue: one group
        return tuple(self._run("roi_heads", {g.input_names[0]: x}, g.output_names, sizes=counts))

    def part_modules(self) -> dict:
        return dict(self.graphs)

    def verify(self, images) -> Dict[str, dict]:
        """Each part against ONNX Runtime on the inputs the deployed pipeline gives it: the backbone on the
        transformed images, the RoI heads on the pooled RoI features of those images (computed with ONNX
        Runtime's backbone part and the glue, as `PipelineBackend` runs it)."""

        self.verification = None
        x = torch.as_tensor(np.asarray(images.detach().cpu() if isinstance(images, torch.Tensor) else images,
                                       np.float32))
        with torch.no_grad():
            transformed = self.detector.transform(list(x))[0].tensors.numpy()
        seen: List[np.ndarray] = []
        ort_roi = OrtBackend(self.files["roi_heads"], ["CPUExecutionProvider"])

        def record(feats):
            seen.append(np.array(feats))
            return ort_roi.raw(feats)

        ort_backbone = OrtBackend(self.files["backbone"], ["CPUExecutionProvider"])
        self.run_split(x.numpy(), ort_backbone.raw, record)
        pooled = np.concatenate(seen) if seen else np.zeros((0,), np.float32)
        if pooled.size == 0:
            raise TwinError(f"{self.source}: no RoI features on the verify images to check the roi_heads part with")
        reports = {"backbone": verify_twin(self.graphs["backbone"], self.files["backbone"], transformed,
                                           taps=[self.mid_name]),
                   "roi_heads": verify_twin(self.graphs["roi_heads"], self.files["roi_heads"], pooled)}
        self.verification = reports
        return reports


class OneStageTwin(OneNetworkTwin):
    """RetinaNet / FCOS / SSDlite whose network is the deployed file (one network): the loss reads the head's
    prediction convolutions of every level as the file computes them (the maps its decode reads), `features` the
    M-th layer (ResNet `layer4`, the end of SSDlite's MobileNetV3 body) as the file computes it; anchors, matching,
    losses and the box decode are torchvision's, predictions the file's own output. Mixed into the model class by
    `one_stage_twin`."""

    def _init_one_stage(self, graph: OnnxGraph, path: str):
        self.detector.backbone = None  # the file holds the network (the head stays for torchvision's loss code)
        self._init_twin({"model": graph}, {"model": path}, path)
        self.input_name = graph.input_names[0]
        self.mid_name = scope_output(graph, self.twin_mid_scope)
        convs = self.head_convs()  # {head output: one conv shared by the levels, or one conv per level}
        self.head_keys = tuple(convs)
        self.head_names = [level_conv_outputs(graph, f"detector.{c}") if isinstance(c, str) else
                           [conv_output(graph, f"detector.{one}") for one in c] for c in convs.values()]
        if len({len(v) for v in self.head_names}) != 1:
            raise TwinError(f"{path}: the head's prediction convolutions differ in level count "
                            f"{[len(v) for v in self.head_names]}")

    def _network(self, images, x):
        names = [n for level in self.head_names for n in level]
        outs = self._run("model", {self.input_name: images}, [self.mid_name] + names)
        mid, outs = outs[0], outs[1:]
        levels = len(self.head_names[0])
        head = {}
        for j, key in enumerate(self.head_keys):
            maps = outs[j * levels:(j + 1) * levels]
            k = self.head_width(key)
            head[key] = torch.cat([m.view(m.shape[0], -1, k, *m.shape[-2:]).permute(0, 3, 4, 1, 2)
                                   .reshape(m.shape[0], -1, k) for m in maps], 1)
        return mid, head, [(int(m.shape[-2]), int(m.shape[-1])) for m in outs[:levels]]

    def _taps(self) -> List[str]:
        return [self.mid_name] + [n for level in self.head_names for n in level]


def level_conv_outputs(graph: OnnxGraph, weight_prefix: str) -> List[str]:
    """The values read downstream of every convolution with weights `weight_prefix` (a head convolution shared by
    the FPN levels: one node per level), in the order the export traced them (P3 first)."""
    import re

    found = []
    for k, st in enumerate(graph._steps):
        if st.op == "Conv" and len(st.inputs) > 1 and any(
                st.inputs[1].startswith(p) for p in (f"model.{weight_prefix}.", f"{weight_prefix}.")):
            m = re.search(r"_(\d+)/[^/]*$", st.name or "")  # '/head/.../cls_logits_3/Conv': the 4th call
            found.append((int(m.group(1)) if m else 0, k, follow_representation(graph, st.outputs[0])))
    if not found:
        raise TwinError(f"{graph.name}: no convolution with weights {weight_prefix}.* in the graph")
    return [name for _, _, name in sorted(found)]


def one_stage_twin(arch: dict, graph: OnnxGraph, path: str):
    """The twin of a one-stage detector's ONNX file: the model class of `arch["name"]` with its network replaced."""
    arch = dict(arch)
    name = arch.pop("name")
    cls = ONE_STAGE[name]
    twin_cls = type(f"{cls.__name__}Twin", (OneStageTwin, cls), {})
    twin = twin_cls.__new__(twin_cls)
    cls.__init__(twin, arch.pop("num_classes"), **arch)
    twin._init_one_stage(graph, path)
    return twin


# ---------------------------------------------------------------------------------------------- Ultralytics
# The twin of an exported Ultralytics YOLOv8 / YOLO11 ONNX file (fp32, fp16, int8): the file's graph, interpreted in
# torch (`interpreter.py`), runs the network up to the Detect head's raw outputs, and our Ultralytics wrapper's own code
# (`fa_train/models/ultralytics_yolo.py`) runs on them: Ultralytics' `v8DetectionLoss` (task-aligned assigner, CIoU,
# DFL, BCE), the per-image and per-object losses, the attack outputs (TOG's slots, the class-score "objectness"), so
# the gradient an attack takes is the deployed file's. Predictions are the file's own output (its DFL decode and
# sigmoid) through the wrapper's `postprocess`, as every backend runs it.
#
# What is read from the graph (`_taps`, each verified against ONNX Runtime with the outputs, see `verify_twin`):
# - per level k, the last convolution of the box branch (`cv2.k.2`: [N, 4 x reg_max, H, W], the DFL logits before
#   the decode) and of the class branch (`cv3.k.2`: [N, C, H, W] class logits), found by their weight names, as the
#   file stores them (the export keeps them float32 at fp16; at int8 the value after its Q/DQ, as the decode reads it);
# - the M-th layer (`features`: the last backbone layer of the YAML, YOLOv8's SPPF, YOLO11's C2PSA), the value leaving
#   that module's scope.
#
# The model's own Python network is dropped (the file holds it); the Detect module stays for what the loss reads from
# it (strides, class count, reg_max, the fixed DFL projection of `output_slots`' decode); its own convolutions are
# never run.


class _FileHoldsIt(nn.Module):
    """In place of a layer of the Python network in a twin: the deployed file computes it; running it is a bug."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.f, self.i = getattr(layer, "f", -1), getattr(layer, "i", None)

    def forward(self, *a):
        raise TwinError(f"layer {self.i} of the twin's Python network ran; the deployed file computes it")


class UltralyticsTwin(OneNetworkTwin, UltralyticsYolo):
    """UltralyticsYolo whose network is the deployed file: `_network` returns the head's raw outputs and the M-th
    layer as the file computes them; loss, per-image / per-object losses, the attack outputs and `postprocess` are
    the wrapper's own, `predict` / `export_module` the file's own output."""

    def __init__(self, arch: dict, graph: OnnxGraph, path: str):
        if not isinstance(arch.get("cfg"), dict):
            raise TwinError(f"{path}: its model description holds no Ultralytics model YAML (cfg)")
        UltralyticsYolo.__init__(self, arch["cfg"], int(arch["num_classes"]), spec=path)
        layers = self.net.model
        for j in range(len(layers) - 1):
            layers[j] = _FileHoldsIt(layers[j])  # the file holds the network
        head = layers[-1]
        self._init_twin({"model": graph}, {"model": path}, path)
        self.input_name = graph.input_names[0]
        self.box_names = [conv_output(graph, f"net.model.{head.i}.cv2.{k}.2") for k in range(head.nl)]
        self.cls_names = [conv_output(graph, f"net.model.{head.i}.cv3.{k}.2") for k in range(head.nl)]
        self.mid_name = self._mid_tap(graph)

    def _mid_tap(self, graph: OnnxGraph) -> str:
        i = self.mid_index
        for scope in (f"model.{i}", f"net/model.{i}", f"model/net/model.{i}"):
            try:
                return scope_output(graph, scope)
            except TwinError:
                continue
        raise TwinError(f"{graph.name}: no node of the M-th layer (model.{i}, the last backbone layer) in the graph")

    def _taps(self) -> List[str]:
        return self.box_names + self.cls_names + [self.mid_name]

    def _network(self, images, stop_at_mid: bool = False):
        if stop_at_mid:
            return None, self._run("model", {self.input_name: images}, [self.mid_name])[0]
        outs = self._run("model", {self.input_name: images}, self._taps())
        nl, n = len(self.box_names), images.shape[0]
        boxes, scores, mid = outs[:nl], outs[nl:2 * nl], outs[-1]
        for b, s in zip(boxes, scores):
            if b.shape[1] != 4 * self.reg_max or s.shape[1] != self.num_classes or b.shape[-2:] != s.shape[-2:]:
                raise TwinError(f"{self.source}: head maps of shapes {tuple(b.shape)} / {tuple(s.shape)}, expected "
                                f"[N, {4 * self.reg_max}, H, W] / [N, {self.num_classes}, H, W]")
        raw = {"boxes": torch.cat([b.reshape(n, 4 * self.reg_max, -1) for b in boxes], -1),
               "scores": torch.cat([s.reshape(n, self.num_classes, -1) for s in scores], -1),
               "feats": boxes}  # the loss and the decode read the levels' sizes (and dtype, device) from these
        return raw, mid


def ultralytics_twin(arch: dict, graph: OnnxGraph, path: str) -> UltralyticsTwin:
    return UltralyticsTwin(arch, graph, path)


# ---------------------------------------------------------------------------------------------- loading


def _onnx_behind_engine(path: str) -> str:
    side = read_sidecar(path) or {}
    onnx_path = side.get("onnx")
    if not onnx_path or not os.path.isfile(onnx_path):
        raise TwinError(f"{path}: a TensorRT engine is attacked through the twin of the ONNX file it was built from, "
                        f"but its sidecar names none that exists ({onnx_path!r})")
    return onnx_path


def load_twin(path: str, verify_images=None, fp16: str = "emulate"):
    """The twin of an exported file (whole-model `.onnx`, `.pipeline.json`, or a TensorRT engine / engine pipeline:
    the twin of the ONNX file(s) it was built from). With `verify_images` ([N,3,H,W] in [0,1]) it is verified
    before it is returned; a twin that does not match raises TwinMismatch. Without, `verify` must be called
    before the twin will run."""
    from fa_train.models import create_model


    if not os.path.isfile(path):
        raise TwinError(f"{path}: file not found")
    if path.endswith(PIPELINE_SUFFIX):

        info = read_manifest(path)
        base = os.path.dirname(os.path.abspath(path))
        files = {k: os.path.join(base, v) for k, v in info["parts"].items()}
        if info["format"] == "tensorrt-pipeline":
            files = {k: _onnx_behind_engine(v) for k, v in files.items()}
        arch = dict(info["model"])
        if arch.get("name") != FasterRCNNFPN.model_name or set(files) != {"backbone", "roi_heads"}:
            raise TwinError(f"{path}: no twin for a {arch.get('name')} pipeline of parts {sorted(files)}")
        graphs = {k: OnnxGraph(v, fp16=fp16) for k, v in files.items()}
        twin = FasterRCNNTwin(arch, graphs, files, path)
    else:
        if os.path.splitext(path)[1].lower() in ENGINE_SUFFIXES:
            return load_twin(_onnx_behind_engine(path), verify_images, fp16)
        model_info = (read_sidecar(path) or {}).get("model") or onnx_metadata(path).get("model")
        if not model_info:
            raise TwinError(f"{path}: neither a fa-export sidecar ({path}.json) nor the file's metadata describes the "
                            f"model; the twin needs it")
        arch = dict(model_info)
        name = arch.pop("name")
        if name in ONE_STAGE:
            twin = one_stage_twin(model_info, OnnxGraph(path, fp16=fp16), path)
        elif name == "ultralytics":  # YOLOv8 / YOLO11
            twin = ultralytics_twin(model_info, OnnxGraph(path, fp16=fp16), path)
        elif name == YoloV3.model_name:
            ref = create_model(name, **arch)  # the configuration (anchors, strides, loss gains) of the source model
            twin = YoloTwin(ref.cfg, OnnxGraph(path, fp16=fp16), path)
        else:
            raise TwinError(f"{path}: no whole-model twin for {name!r} (a Faster R-CNN is deployed as a pipeline: "
                            f"load its .pipeline.json)")
    if verify_images is not None:
        twin.verify(verify_images)
    return twin


__all__ = ["TOLERANCES", "REFERENCE_CONFIG", "TwinError", "TwinMismatch", "verify_twin", "load_twin", "YoloTwin",
           "FasterRCNNTwin", "OneStageTwin", "one_stage_twin", "graph_precision", "follow_representation",
           "scope_output", "conv_output", "UltralyticsTwin", "ultralytics_twin"]
