"""Will TensorRT's ONNX parser take this file? A check on the CPU, before a GPU ever sees the file.

Two parts:
- every node against the parser's supported-operator table (`data/tensorrt_onnx_operators.tsv`, taken from
  onnx-tensorrt's docs/operators.md, its version in the file's header): the op is imported at all, the opset is in
  the parser's range, and the element types of the node's data inputs are among the op's supported types;
- the rules of explicit quantization (TensorRT's Q/DQ): DequantizeLinear only on INT8 / FP8 / INT4 / FP4 inputs
  (ONNX Runtime's INT32 bias DequantizeLinear is what breaks `--engine int8`), QuantizeLinear to INT8 / FP8,
  zero points constant and 0, per-channel scales only on constant weights, along the output-channel axis of the
  convolution they feed.

`check_tensorrt_compat(path)` returns a `CompatReport`; fa-export runs it on every file it writes. Torch-free.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tensorrt_onnx_operators.tsv")
TENSORRT_TABLE_VERSION = "TensorRT 10.1 GA table (onnx-tensorrt 96e7811), checked against 10.15 GA"

# ONNX element types as the table names them
_TYPE_NAMES = {"FLOAT": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16", "DOUBLE": "DOUBLE", "INT8": "INT8",
               "UINT8": "UINT8", "INT32": "INT32", "INT64": "INT64", "BOOL": "BOOL", "INT4": "INT4",
               "FLOAT8E4M3FN": "FP8", "FLOAT4E2M1": "FP4"}
# which inputs carry the data whose type the table lists (the others are shapes, indices, scales, axes)
_DATA_INPUTS = {
    "Resize": (0,), "Upsample": (0,), "Reshape": (0,), "Slice": (0,), "Gather": (0,), "GatherElements": (0,),
    "GatherND": (0,), "Expand": (0,), "Tile": (0,), "Pad": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "TopK": (0,),
    "Split": (0,), "Clip": (0,), "CumSum": (0,), "QuantizeLinear": (0,), "DequantizeLinear": (0,),
    "ConstantOfShape": (), "Where": (1, 2), "ScatterND": (0, 2), "ScatterElements": (0, 2), "Scatter": (0, 2),
    "OneHot": (2,), "RoiAlign": (0, 1), "NonMaxSuppression": (0, 1), "ReverseSequence": (0,), "Trilu": (0,),
    "ReduceMax": (0,), "ReduceMin": (0,), "ReduceMean": (0,), "ReduceSum": (0,), "ReduceProd": (0,),
    "ReduceL1": (0,), "ReduceL2": (0,), "ReduceLogSum": (0,), "ReduceLogSumExp": (0,), "ReduceSumSquare": (0,),
    "Dropout": (0,), "If": (), "Loop": (), "Scan": (),
}
_QUANT_INPUT_TYPES = {"INT8", "FP8", "INT4", "FP4"}
_WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1}  # the output-channel axis of the weight each op takes as input 1


class TensorRTIncompatible(RuntimeError):
    """An --engine target that TensorRT's parser would refuse: stopped before the build, with the reasons."""


@dataclass
class CompatReport:
    path: str
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    ops: Dict[str, int] = field(default_factory=dict)
    opset: Optional[int] = None
    table: str = TENSORRT_TABLE_VERSION

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self, limit: int = 5) -> str:
        name = os.path.basename(self.path)
        if self.ok:
            return f"{name}: TensorRT-compatible ({sum(self.ops.values())} nodes, opset {self.opset}; {self.table})"
        more = f" (+{len(self.problems) - limit} more)" if len(self.problems) > limit else ""
        return (f"{name}: {len(self.problems)} TensorRT incompatibilities ({self.table}): "
                + "; ".join(self.problems[:limit]) + more)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "problems": self.problems, "notes": self.notes, "opset": self.opset,
                "table": self.table}


def load_table(path: str = TABLE_PATH) -> Tuple[Dict[str, Optional[Set[str]]], Tuple[int, int]]:
    """{op: set of supported types, or None when the parser does not import the op}, (opset min, opset max)."""
    table: Dict[str, Optional[Set[str]]] = {}
    opsets = [9, 20]
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("#opset_min\t"):
                opsets[0] = int(line.split("\t")[1])
            elif line.startswith("#opset_max\t"):
                opsets[1] = int(line.split("\t")[1])
            if not line or line.startswith("#"):
                continue
            op, sup, types = (line.split("\t") + ["", ""])[:3]
            table[op] = {t for t in types.split(",") if t} if sup == "Y" else None
    return table, (opsets[0], opsets[1])


def _type_name(elem_type: int) -> str:
    import onnx

    return _TYPE_NAMES.get(onnx.TensorProto.DataType.Name(elem_type), onnx.TensorProto.DataType.Name(elem_type))


def _constants(graph) -> Dict[str, object]:
    from onnx import numpy_helper

    out = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def check_tensorrt_compat(path_or_model, table_path: str = TABLE_PATH) -> CompatReport:
    import onnx

    if isinstance(path_or_model, (str, os.PathLike)):
        path = str(path_or_model)
        model = onnx.load(path)
    else:
        path, model = "<model>", path_or_model
    table, (omin, omax) = load_table(table_path)
    rep = CompatReport(path)
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    rep.opset = opsets.get("ai.onnx")
    if rep.opset is not None and not omin <= rep.opset <= omax:
        rep.problems.append(f"opset {rep.opset} outside the parser's {omin}-{omax}")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as e:  # noqa: BLE001  (types stay unknown; the op table still applies)
        inferred = model
        rep.notes.append(f"shape inference failed ({type(e).__name__}); input types unchecked")
    types: Dict[str, str] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = _type_name(vi.type.tensor_type.elem_type)
    for init in g.initializer:
        types[init.name] = _type_name(init.data_type)
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = _type_name(a.t.data_type)
    _check_graph(model.graph, table, types, rep)
    _check_quantization(model.graph, types, rep)
    return rep


def _check_graph(graph, table, types, rep: CompatReport) -> None:
    for n in graph.node:
        rep.ops[n.op_type] = rep.ops.get(n.op_type, 0) + 1
        where = f"{n.op_type} {n.name or n.output[0]!r}"
        if n.domain not in ("", "ai.onnx"):
            rep.problems.append(f"{where}: custom domain {n.domain!r} (needs a TensorRT plugin)")
            continue
        if n.op_type not in table:
            rep.problems.append(f"{where}: not in TensorRT's ONNX operator table")
            continue
        supported = table[n.op_type]
        if supported is None:
            rep.problems.append(f"{where}: not supported by TensorRT's ONNX parser")
            continue
        idx = _DATA_INPUTS.get(n.op_type, tuple(range(len(n.input))))
        for i in idx:
            if i >= len(n.input) or not n.input[i]:
                continue
            t = types.get(n.input[i])
            if t is not None and t not in supported and t != "DOUBLE":
                rep.problems.append(f"{where}: input {n.input[i]!r} is {t}; TensorRT takes "
                                    f"{'/'.join(sorted(supported))}")
        if n.op_type in ("Constant", "Cast"):
            t = types.get(n.output[0])
            if t is not None and t not in supported:
                rep.problems.append(f"{where}: output is {t}; TensorRT takes {'/'.join(sorted(supported))}")
        for a in n.attribute:  # subgraphs of If / Loop / Scan
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _check_graph(sub, table, types, rep)


def _check_quantization(graph, types, rep: CompatReport) -> None:
    import numpy as np

    consts = _constants(graph)
    consumers: Dict[str, list] = {}
    for n in graph.node:
        for i, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, i))
    producers = {o: n for n in graph.node for o in n.output}
    for n in graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        where = f"{n.op_type} {n.name or n.output[0]!r}"
        t_in = types.get(n.input[0])
        if n.op_type == "DequantizeLinear" and t_in is not None and t_in not in _QUANT_INPUT_TYPES:
            rep.problems.append(f"{where}: dequantizes a {t_in} tensor; TensorRT takes INT8/FP8/INT4/FP4 only "
                                f"(ONNX Runtime writes INT32 Conv biases so unless QuantizeBias is off)")
        if len(n.input) > 2 and n.input[2]:
            zp = consts.get(n.input[2])
            if zp is None:
                rep.problems.append(f"{where}: zero point {n.input[2]!r} is not a constant")
            elif np.any(np.asarray(zp) != 0):
                rep.problems.append(f"{where}: zero point not 0 (TensorRT quantizes symmetrically)")
            elif n.op_type == "QuantizeLinear" and types.get(n.input[2]) not in ("INT8", "FP8", None):
                rep.problems.append(f"{where}: quantizes to {types.get(n.input[2])}; TensorRT takes INT8/FP8")
        scale = consts.get(n.input[1])
        if scale is None:
            rep.problems.append(f"{where}: scale {n.input[1]!r} is not a constant")
            continue
        scale = np.asarray(scale)
        if np.any(scale <= 0):
            rep.problems.append(f"{where}: scale not positive")
        if scale.size <= 1:
            continue
        # per-channel: only on constant weights, along the output channel of the consumer
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        source = n.input[0]
        if n.op_type == "DequantizeLinear":
            q = producers.get(source)
            if q is not None and q.op_type == "QuantizeLinear":
                source = q.input[0]
        if source not in consts:
            rep.problems.append(f"{where}: per-channel scale on an activation (TensorRT quantizes activations "
                                f"per tensor)")
            continue
        rank = np.asarray(consts[source]).ndim
        axis = axis % rank if rank else axis
        if n.op_type == "DequantizeLinear":
            for c, i in consumers.get(n.output[0], []):
                want = _WEIGHT_AXIS.get(c.op_type)
                if want is not None and i == 1 and axis != want:
                    rep.problems.append(f"{where}: per-channel axis {axis} on the weight of {c.op_type} "
                                        f"{c.name!r}; the output channel is axis {want}")
