"""An ONNX graph run by PyTorch node by node, differentiable with respect to its inputs: what a deployed file
computes, in a form an attack can take gradients through. `fa_deploy/robustness/twin.py` proves a graph equal to ONNX
Runtime's outputs of the same file before anything uses it.

The graph is interpreted as it is, not rebuilt from the model, so the twin is the deployed computation by
construction: the same weights (after the float16 conversion or int8 quantization), the same nodes kept in
float32, the same scales and zero points.

- float16 (`fp16="emulate"`, the default): a float16 tensor of the file is a float32 torch tensor holding float16
  values. Every node whose output the file types float16 computes in float32 on float16 inputs and rounds its
  output to the nearest float16 (round half to even, as a Cast does), so every activation the file stores in
  float16 is a float16 value, as on float16 hardware, at float32 speed (PyTorch's float16 convolutions on a CPU
  are ~15x slower). The rounding's gradient is the identity (straight-through), so gradients stay float32 and
  do not underflow. `fp16="native"` keeps float16 torch tensors instead (for a GPU).
- int8 (QDQ): a QuantizeLinear followed by DequantizeLinear with the same scale and zero point is one
  fake-quantization, `(clamp(round(x / s) + z, qmin, qmax) - z) * s`, with ONNX's round half to even, the
  file's own scales and zero points, per tensor or per channel; its gradient is straight-through for the
  rounding and zero where the clamp saturates. Dequantized constants (int8 weights, int32 biases) are folded
  once; a float bias (quantizer option `QuantizeBias: False`) is just a float constant.
- Nodes that depend on shapes only (Shape, and the index arithmetic after it: the YOLOv3 grid, the FPN's
  upsampling sizes) are evaluated once per input shape and cached; constants are folded at construction.

Only the operators our exports use are interpreted (`OPS`); any other is refused at construction, naming it, and
so is an attribute value that would change an operator's meaning beyond what is implemented (Resize's linear
and cubic modes, antialias, exclude_outside, axes: `check_attributes`). Conv's and MaxPool's `auto_pad` (VALID,
SAME_UPPER, SAME_LOWER) and Clip without bounds (the identity) are ONNX's definitions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FLOAT, UINT8, INT8, INT32, INT64, BOOL, FLOAT16, DOUBLE = 1, 2, 3, 6, 7, 9, 10, 11
_QRANGE = {INT8: (-128, 127), UINT8: (0, 255)}


class GraphError(RuntimeError):
    """A graph the interpreter cannot run (an operator or attribute outside what our exports use)."""


# ---------------------------------------------------------------------------------------------- autograd pieces


class RoundToHalf(torch.autograd.Function):
    """float32 -> the nearest float16 value, still float32 (round half to even, inf past 65504, as a Cast to float16).
    Backward: the identity (straight-through), in float32."""

    @staticmethod
    def forward(ctx, x):
        return x.to(torch.float16).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g


def _broadcast(p: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """A per-channel parameter [C] shaped to broadcast along `axis` of an ndim tensor; scalars stay as they are."""
    if p.dim() == 0:
        return p
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return p.reshape(shape)


class FakeQuant(torch.autograd.Function):
    """y = (clamp(round(x / s) + z, qmin, qmax) - z) * s: ONNX QuantizeLinear then DequantizeLinear, round half to
    even, computed as clamp(x, (qmin - z) s, (qmax - z) s) / s, rounded, times s: the same values in four
    in-place passes. The division is ONNX's: PyTorch's fused fake-quantize kernel rounds x * (1 / s) instead,
    which moves exact half-step ties (a LeakyRelu's 0.1 k s re-quantized with s: 2 % of the values of a layer
    one step off, measured). `s` and `z` are Python numbers (per tensor) or tensors shaped to broadcast (per
    channel). Backward: g where the quantizer does not saturate (x / s inside the integer range by less than
    half a step), else 0: straight-through for the rounding, the true gradient of the clamp, in one fused pass
    (hardtanh's backward)."""

    @staticmethod
    def forward(ctx, x, s, z, qmin, qmax):
        lo, hi = qmin - z, qmax - z
        ctx.save_for_backward(x)
        ctx.bounds = ((lo - 0.5) * s, (hi + 0.5) * s)
        return torch.clamp(x, lo * s, hi * s).div_(s).round_().mul_(s)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        lo, hi = ctx.bounds
        if isinstance(lo, torch.Tensor):
            return g * ((x > lo) & (x < hi)), None, None, None, None
        return torch.ops.aten.hardtanh_backward(g, x, lo, hi), None, None, None, None


class Quantize(torch.autograd.Function):
    """QuantizeLinear alone: the integers clamp(round(x / s) + z, qmin, qmax), as float. Backward: g / s where the
    clamp is inactive (straight-through), so a later DequantizeLinear's `* s` gives FakeQuant's gradient."""

    @staticmethod
    def forward(ctx, x, s, z, qmin, qmax):
        q = torch.round(x / s)
        if z is not None:
            q += z
        mask = (q >= qmin) & (q <= qmax)
        ctx.save_for_backward(mask, s)
        return q.clamp_(qmin, qmax)

    @staticmethod
    def backward(ctx, g):
        mask, s = ctx.saved_tensors
        return g * mask / s, None, None, None, None


# ---------------------------------------------------------------------------------------------- operators
# each: fn(args, attrs, graph) -> tuple of outputs; args are tensors (None for an omitted optional input)


def _ints(t) -> List[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def _pads(at, x, kernel, nd) -> Tuple[List[int], List[int]]:
    """(begin, end) padding of the spatial dimensions: `pads`, or what ONNX's `auto_pad` says: VALID none,
    SAME_UPPER / SAME_LOWER an output of ceil(input / stride), the odd extra pixel at the end (UPPER) or at the
    beginning (LOWER)."""
    mode = at.get("auto_pad", "NOTSET")
    if mode == "NOTSET":
        pads = at.get("pads", [0] * 2 * nd)
        return list(pads[:nd]), list(pads[nd:])
    if mode == "VALID":
        return [0] * nd, [0] * nd
    strides, dil = at.get("strides", [1] * nd), at.get("dilations", [1] * nd)
    begin, end = [], []
    for d in range(nd):
        n = x.shape[2 + d]
        total = max((-(-n // strides[d]) - 1) * strides[d] + (kernel[d] - 1) * dil[d] + 1 - n, 0)
        small = total // 2
        begin.append(small if mode == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return begin, end


def _conv(a, at, g):
    x, w = a[0], a[1]
    b = a[2] if len(a) > 2 else None
    nd = w.dim() - 2
    if nd != 2:
        raise GraphError(f"Conv with {nd} spatial dimensions: only 2-D convolutions are interpreted")
    begin, end = _pads(at, x, list(w.shape[2:]), nd)
    if begin != end:
        x = F.pad(x, [p for d in reversed(range(nd)) for p in (begin[d], end[d])])
        begin = [0] * nd
    return (F.conv2d(x, w, b, stride=at.get("strides", [1] * nd), padding=begin,
                     dilation=at.get("dilations", [1] * nd), groups=at.get("group", 1)),)


def _gemm(a, at, g):
    x, w = a[0], a[1]
    c = a[2] if len(a) > 2 else None
    if at.get("transA", 0):
        x = x.t()
    alpha, beta = at.get("alpha", 1.0), at.get("beta", 1.0)
    if at.get("transB", 0) and alpha == 1.0 and beta == 1.0:
        return (F.linear(x, w, c),)
    y = x @ (w.t() if at.get("transB", 0) else w)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return (y,)


def _maxpool(a, at, g):
    x = a[0]
    k = at["kernel_shape"]
    nd = len(k)
    if nd != 2 or at.get("storage_order", 0) or len(g.outputs_of_current) > 1:
        raise GraphError("MaxPool: only 2-D pooling without the indices output is interpreted")
    begin, end = _pads(at, x, k, nd)
    if begin != end:
        x = F.pad(x, [p for d in reversed(range(nd)) for p in (begin[d], end[d])], value=float("-inf"))
        begin = [0] * nd
    return (F.max_pool2d(x, k, stride=at.get("strides", [1] * nd), padding=begin,
                         dilation=at.get("dilations", [1] * nd), ceil_mode=bool(at.get("ceil_mode", 0))),)


def _div(a, at, g):
    x, y = a
    if not x.is_floating_point() and not y.is_floating_point():
        return (torch.div(x, y, rounding_mode="trunc"),)
    return (x / y,)


def _clip(a, at, g):
    """Clip: min and max are optional inputs (opset 11+; attributes before), each absent bound unbounded; neither
    given is the identity (ONNX's definition)."""
    x = a[0]
    lo = a[1] if len(a) > 1 and a[1] is not None else at.get("min")
    hi = a[2] if len(a) > 2 and a[2] is not None else at.get("max")
    if lo is None and hi is None:
        return (x,)
    return (torch.clamp(x, lo, hi),)


def _shape(a, at, g):
    dims = list(a[0].shape)
    start, end = at.get("start", 0), at.get("end", None)
    return (torch.tensor(dims[start:end], dtype=torch.int64),)


def _gather(a, at, g):
    x, idx = a
    axis = at.get("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    if idx.dim() == 0:
        return (x.select(axis, int(idx)),)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return (out.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:]),)


def _unsqueeze(a, at, g):
    x = a[0]
    axes = _ints(a[1]) if len(a) > 1 and a[1] is not None else at["axes"]
    nd = x.dim() + len(axes)
    for ax in sorted(ax % nd for ax in axes):
        x = x.unsqueeze(ax)
    return (x,)


def _squeeze(a, at, g):
    x = a[0]
    axes = _ints(a[1]) if len(a) > 1 and a[1] is not None else at.get("axes")
    if axes is None:
        return (x.squeeze(),)
    return (x.squeeze(tuple(ax % x.dim() for ax in axes)),)


def _reshape(a, at, g):
    x, shape = a[0], _ints(a[1])
    if not at.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return (x.reshape(shape),)


def _expand(a, at, g):
    x = a[0]
    return (x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(a[1])))),)


def _slice(a, at, g):
    x = a[0]
    starts, ends = _ints(a[1]), _ints(a[2])
    axes = _ints(a[3]) if len(a) > 3 and a[3] is not None else list(range(len(starts)))
    steps = _ints(a[4]) if len(a) > 4 and a[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st <= 0:
            raise GraphError("Slice with a step <= 0 is not interpreted")
        index[ax % x.dim()] = slice(s, e, st)  # Python's clamping of out-of-range bounds is ONNX's
    return (x[tuple(index)],)


def _range(a, at, g):
    start, limit, delta = (t.item() for t in a)
    return (torch.arange(start, limit, delta, dtype=a[0].dtype),)


def _flatten(a, at, g):
    x = a[0]
    axis = at.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return (x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:])),)


def _resize(a, at, g):
    """Resize, nearest mode (what the exports hold: YOLOv3's and the FPN's upsampling), with ONNX's coordinate
    transformations and nearest modes; the source index per output row/column is computed in float32 as ONNX
    Runtime does, then gathered."""
    x = a[0]
    scales = a[2] if len(a) > 2 and a[2] is not None and a[2].numel() else None
    sizes = a[3] if len(a) > 3 and a[3] is not None and a[3].numel() else None
    if sizes is not None:
        out = _ints(sizes)
        sc = [np.float32(o) / np.float32(i) for o, i in zip(out, x.shape)]
    else:
        sc = [np.float32(s) for s in scales.tolist()]
        out = [int(math.floor(i * s)) for i, s in zip(x.shape, sc)]
    ctm = at.get("coordinate_transformation_mode", "half_pixel")
    nmode = at.get("nearest_mode", "round_prefer_floor")
    for d, (n_in, n_out, s) in enumerate(zip(x.shape, out, sc)):
        if n_in == n_out and s == 1:
            continue
        o = np.arange(n_out, dtype=np.float32)
        if ctm == "asymmetric":
            src = o / s
        elif ctm == "half_pixel":
            src = (o + np.float32(0.5)) / s - np.float32(0.5)
        elif ctm == "pytorch_half_pixel":
            src = (o + np.float32(0.5)) / s - np.float32(0.5) if n_out > 1 else np.zeros_like(o)
        elif ctm == "align_corners":
            src = o * np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.zeros_like(o)
        elif ctm == "tf_half_pixel_for_nn":
            src = (o + np.float32(0.5)) / s
        else:
            raise GraphError(f"Resize coordinate_transformation_mode {ctm!r} is not interpreted")
        if nmode == "floor":
            idx = np.floor(src)
        elif nmode == "ceil":
            idx = np.ceil(src)
        elif nmode == "round_prefer_floor":
            idx = np.ceil(src - np.float32(0.5))
        elif nmode == "round_prefer_ceil":
            idx = np.floor(src + np.float32(0.5))
        else:
            raise GraphError(f"Resize nearest_mode {nmode!r} is not interpreted")
        idx = torch.from_numpy(np.clip(idx, 0, n_in - 1).astype(np.int64)).to(x.device)
        x = torch.index_select(x, d, idx)
    return (x,)


# attributes that change what an operator computes, beyond what its function above implements: refused at
# construction, naming the node, the operator and the attribute, instead of being run as something else
# ({op: {attribute: the values interpreted}}; an absent attribute takes ONNX's default, which is interpreted)
_INTERPRETED_VALUES = {
    "Resize": {"mode": ("nearest",), "antialias": (0,), "exclude_outside": (0,),
               "keep_aspect_ratio_policy": ("stretch",)},
    "Conv": {"auto_pad": ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")},
    "MaxPool": {"auto_pad": ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")},
}
_NOT_INTERPRETED = {"Resize": ("axes",)}  # attributes refused whatever their value


def check_attributes(op: str, name: str, attrs: dict) -> None:
    """GraphError when a node carries an attribute value the interpreter would not honour."""
    for key, allowed in _INTERPRETED_VALUES.get(op, {}).items():
        if key in attrs and attrs[key] not in allowed:
            raise GraphError(f"node {name} ({op}): attribute {key}={attrs[key]!r} is not interpreted (only "
                             f"{', '.join(map(repr, allowed))}); the twin would compute another function")
    for key in _NOT_INTERPRETED.get(op, ()):
        if key in attrs:
            raise GraphError(f"node {name} ({op}): attribute {key} is not interpreted")


def _cast(a, at, g):
    x, to = a[0], at["to"]
    if to in (FLOAT16,) and g.fp16 == "emulate":
        return (RoundToHalf.apply(x.float()) if x.is_floating_point() else x.float(),)
    return (x.to(_TORCH_TYPE[to]),)


def _quantize(a, at, g):
    x, s = a[0], a[1]
    z = a[2] if len(a) > 2 else None
    qmin, qmax = _QRANGE[g.current_types[0]]
    axis = at.get("axis", 1)
    s, zz = _broadcast(s, axis, x.dim()), None if z is None or not z.any() else _broadcast(z.to(s.dtype), axis, x.dim())
    return (Quantize.apply(x, s, zz, qmin, qmax),)


def _dequantize(a, at, g):
    q, s = a[0], a[1]
    z = a[2] if len(a) > 2 else None
    axis = at.get("axis", 1)
    s = _broadcast(s, axis, q.dim())
    q = q.to(s.dtype)
    if z is not None and z.any():
        q = q - _broadcast(z.to(s.dtype), axis, q.dim())
    return (q * s,)


def _fake_quant(a, at, g):
    x = a[0]
    if "scale" in at:  # per tensor, read once from the file's constants
        s, z = at["scale"], at["zero_point"]
    else:
        axis = at.get("axis", 1)
        s = _broadcast(a[1], axis, x.dim())
        z = _broadcast(a[2].to(a[1].dtype), axis, x.dim()) if len(a) > 2 and a[2] is not None else 0.0
    y = FakeQuant.apply(x, s, z, *at["qrange"])
    return (y,) * len(g.outputs_of_current)  # one value for every DequantizeLinear it replaced


def _requantized(a, at, g):
    """A FakeQuant whose input is already on its grid: the identity (see OnnxGraph._on_grid)."""
    return (a[0],) * len(g.outputs_of_current)


def _hard_sigmoid(x, alpha, beta):
    return torch.clamp(x * alpha + beta, 0.0, 1.0)


def _hardsigmoid(a, at, g):
    """HardSigmoid as ONNX defines it: max(0, min(1, alpha x + beta)), alpha 0.2 and beta 0.5 by default (torch's
    export of MobileNetV3's squeeze-excitation gate writes alpha 1/6)."""
    return (_hard_sigmoid(a[0], at.get("alpha", 0.2), at.get("beta", 0.5)),)


def _hardswish(a, at, g):
    """HardSwish as ONNX defines it: x max(0, min(1, x / 6 + 1 / 2)) (MobileNetV3's activation)."""
    return (a[0] * _hard_sigmoid(a[0], 1.0 / 6.0, 0.5),)


def _global_average_pool(a, at, g):
    """GlobalAveragePool: the mean over every spatial axis, kept as size-1 axes (the squeeze-excitation pooling)."""
    return (a[0].mean(tuple(range(2, a[0].dim())), keepdim=True),)


def _unary(fn):
    return lambda a, at, g: (fn(a[0]),)


def _binary(fn):
    return lambda a, at, g: (fn(a[0], a[1]),)


def _variadic(fn):
    """Max / Min: elementwise over any number of inputs, broadcast."""
    def run(a, at, g):
        out = a[0]
        for t in a[1:]:
            out = fn(out, t)
        return (out,)
    return run


def _instance_norm(a, at, g):
    """InstanceNormalization as ONNX defines it: per (image, channel) over the remaining axes, (x - mean) /
    sqrt(var + epsilon) x scale + bias, var the mean squared deviation (two passes). Evaluated in ONNX Runtime's
    order, x x (scale / std) + (bias - mean x scale / std): the same function, but where the values are close to
    their mean (a GroupNorm over 2 values, FCOS's 1 x 1 levels) the two orders round differently by more than the
    fp32 gate, and the twin must compute what the file computes."""
    x, scale, bias = a
    dims = tuple(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    d = x - mean
    inv_std = 1.0 / torch.sqrt((d * d).mean(dims, keepdim=True) + at.get("epsilon", 1e-5))
    channel_scale = inv_std * scale.view(shape)
    return (x * channel_scale + (bias.view(shape) - mean * channel_scale),)


def _split(a, at, g):
    x = a[0]
    axis = at.get("axis", 0) % x.dim()
    sizes = _ints(a[1]) if len(a) > 1 and a[1] is not None and a[1].numel() else at.get("split")
    if sizes is None:
        n = at.get("num_outputs", len(g.outputs_of_current))
        sizes = [-(-x.shape[axis] // n)] * (n - 1)
        sizes.append(x.shape[axis] - sum(sizes))
    return tuple(torch.split(x, list(sizes), axis))


def _softmax(a, at, g):
    """Softmax as ONNX defines it from opset 13 on: over the one axis `axis` (default -1; OnnxGraph refuses a file
    of an older opset, where it flattened the axes from `axis` on). Ultralytics' DFL decode and YOLO11's attention."""
    return (torch.softmax(a[0], at.get("axis", -1)),)


def _constant_of_shape(a, at, g):
    from onnx import numpy_helper

    value = at.get("value")
    v = torch.from_numpy(numpy_helper.to_array(value).copy()) if value is not None else torch.zeros(1)
    return (v.reshape(()).expand(_ints(a[0])).clone(),)


OPS: Dict[str, Callable] = {
    "Identity": lambda a, at, g: (a[0],),
    "Conv": _conv, "Gemm": _gemm, "MatMul": _binary(torch.matmul), "MaxPool": _maxpool,
    "Relu": _unary(torch.relu), "Sigmoid": _unary(torch.sigmoid), "Exp": _unary(torch.exp),
    "LeakyRelu": lambda a, at, g: (F.leaky_relu(a[0], at.get("alpha", 0.01)),),
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _div, "Clip": _clip,
    "Concat": lambda a, at, g: (torch.cat([t for t in a if t is not None], at["axis"]),),
    "Shape": _shape, "Gather": _gather, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Reshape": _reshape,
    "Transpose": lambda a, at, g: (a[0].permute(at.get("perm", list(reversed(range(a[0].dim()))))),),
    "Expand": _expand, "Slice": _slice, "Range": _range, "Flatten": _flatten, "Resize": _resize, "Cast": _cast,
    "QuantizeLinear": _quantize, "DequantizeLinear": _dequantize,
    "Sqrt": _unary(torch.sqrt),
    # GroupNorm's export (FCOS's head): [N, groups, -1] normalised per (image, group), the affine after it
    "InstanceNormalization": _instance_norm,
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Split": _split,
    "Tile": lambda a, at, g: (a[0].repeat(_ints(a[1])),), "ConstantOfShape": _constant_of_shape,
    # MobileNetV3 (SSDlite): its activation, its squeeze-excitation block; SSD's class softmax in the decode
    "HardSwish": _hardswish, "HardSigmoid": _hardsigmoid, "GlobalAveragePool": _global_average_pool,
    "Softmax": _softmax,
}
# operators whose meaning changed at an opset: {op: the first opset whose definition OPS implements}
_SINCE_OPSET = {"Softmax": 13}
# ops whose outputs are some of their data inputs' values: a quantization grid survives them
_SELECTING = {"Identity", "MaxPool", "Relu", "Concat", "Gather", "Unsqueeze", "Squeeze", "Reshape", "Transpose",
              "Expand", "Slice", "Flatten", "Resize", "Split", "Tile"}
# outputs that only select or move input values: in emulated float16 they need no rounding
_EXACT = {"Identity", "MaxPool", "Relu", "Clip", "Concat", "Shape", "Gather", "Unsqueeze", "Squeeze", "Reshape",
          "Transpose", "Expand", "Slice", "Flatten", "Resize", "Cast", "Range", "QuantizeLinear", "Max", "Min",
          "Split", "Tile", "ConstantOfShape"}
_TORCH_TYPE = {FLOAT: torch.float32, FLOAT16: torch.float16, DOUBLE: torch.float64, INT8: torch.int8,
               UINT8: torch.uint8, INT32: torch.int32, INT64: torch.int64, BOOL: torch.bool}


# ---------------------------------------------------------------------------------------------- the graph module


@dataclass
class _Step:
    op: str
    name: str
    inputs: List[str]
    outputs: List[str]
    attrs: dict
    types: List[int]
    fn: Callable = None
    static: bool = False  # depends on input shapes only (Shape and the arithmetic after it)
    round16: List[bool] = field(default_factory=list)


class _Ctx:
    """What an operator may need beyond its inputs: the interpreter's float16 mode, its output types."""

    def __init__(self, fp16):
        self.fp16 = fp16
        self.current_types: List[int] = []
        self.outputs_of_current: List[str] = []


def _attrs(node) -> dict:
    from onnx import helper

    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else list(v) if isinstance(v, (list, tuple)) else v
    return out


def _elem_types(model) -> Dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {}
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
    for i in g.initializer:
        types[i.name] = i.data_type
    return types


class OnnxGraph(nn.Module):
    """An ONNX model as a torch module. `forward(*inputs)` returns the graph outputs (a tuple, in the file's order);
    `run(feeds, names)` returns any tensors of the graph by name (intermediate ones included: taps)."""

    def __init__(self, model: Union[str, "onnx.ModelProto"], fp16: str = "emulate", name: Optional[str] = None):
        import onnx
        from onnx import numpy_helper

        super().__init__()
        if fp16 not in ("emulate", "native"):
            raise ValueError(f"fp16 must be 'emulate' or 'native', got {fp16!r}")
        self.path = model if isinstance(model, str) else None
        self.name = name or (self.path or model.graph.name)
        proto = onnx.load(model) if isinstance(model, str) else model
        self.fp16 = fp16
        self._ctx = _Ctx(fp16)
        g = proto.graph
        unknown = sorted({n.op_type for n in g.node if n.op_type not in OPS and n.op_type != "Constant"})
        if unknown or any(n.domain not in ("", "ai.onnx") for n in g.node):
            raise GraphError(f"{self.name}: operators outside what the twin interprets: "
                             f"{unknown or sorted({n.domain for n in g.node})} (supported: {sorted(OPS)})")
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        old = sorted({n.op_type for n in g.node if opset is not None and opset < _SINCE_OPSET.get(n.op_type, 0)})
        if old:
            raise GraphError(f"{self.name}: opset {opset}: {old} are interpreted as ONNX defines them from opset "
                             f"{max(_SINCE_OPSET[o] for o in old)} on; export at a newer opset")
        types = _elem_types(proto)
        inits = {i.name for i in g.initializer}
        self.input_names = [i.name for i in g.input if i.name not in inits]
        self.output_names = [o.name for o in g.output]
        self.types = types
        consts: Dict[str, torch.Tensor] = {}
        for i in g.initializer:
            consts[i.name] = self._const(numpy_helper.to_array(i))
        steps: List[_Step] = []
        for node in g.node:
            at = _attrs(node)
            try:
                check_attributes(node.op_type, node.name, at)
            except GraphError as e:
                raise GraphError(f"{self.name}: {e}") from None
            if node.op_type == "Constant":
                (key, val), = ((k, v) for k, v in at.items())
                if key != "value":
                    raise GraphError(f"{self.name}: Constant {node.name} with {key}: only 'value' is interpreted")
                consts[node.output[0]] = self._const(numpy_helper.to_array(val))
                types[node.output[0]] = val.data_type
                continue
            out_types = [types.get(o, self._fallback_type(node, at, types)) for o in node.output]
            for o, t in zip(node.output, out_types):
                types[o] = t
            steps.append(_Step(node.op_type, node.name, list(node.input), list(node.output), at, out_types,
                               OPS[node.op_type]))
        steps = self._fuse_qdq(steps, consts)
        self._on_grid(steps)
        for st in steps:
            st.round16 = [fp16 == "emulate" and t == FLOAT16 and st.op not in _EXACT for t in st.types]
        # fold what depends on constants only (dequantized weights and biases, Identity copies of initializers)
        live = []
        for st in steps:
            if st.op != "Shape" and all(i == "" or i in consts for i in st.inputs):
                for o, v in zip(st.outputs, self._call(st, [consts[i] if i else None for i in st.inputs])):
                    consts[o] = v.detach()
            else:
                live.append(st)
        static = set()
        for st in live:
            st.static = st.op == "Shape" or all(i == "" or i in consts or i in static for i in st.inputs)
            if st.static:
                static.update(st.outputs)
        self._steps = live
        self._static = static
        self._const_keys = {}
        used = {i for st in live for i in st.inputs} | set(self.output_names)
        self.constants = nn.Module()  # buffers, so .to(device) moves them; folded-away ones are dropped
        for n, v in consts.items():
            if n in used:
                key = f"c{len(self._const_keys)}"
                self.constants.register_buffer(key, v, persistent=False)
                self._const_keys[n] = key
        self._plans: Dict[tuple, tuple] = {}
        self._static_cache: Dict[tuple, Dict[str, torch.Tensor]] = {}

    # -- construction helpers
    def _const(self, arr: np.ndarray) -> torch.Tensor:
        if arr.dtype == np.float16 and self.fp16 == "emulate":
            arr = arr.astype(np.float32)  # float16 values, exactly
        return torch.from_numpy(np.array(arr, copy=True))

    @staticmethod
    def _fallback_type(node, at, types) -> int:
        if node.op_type == "Cast":
            return at["to"]
        if node.op_type == "QuantizeLinear":
            return types.get(node.input[2], UINT8) if len(node.input) > 2 else UINT8
        if node.op_type == "DequantizeLinear":
            return types.get(node.input[1], FLOAT)
        if node.op_type == "Shape":
            return INT64
        return types.get(node.input[0], FLOAT)

    def _fuse_qdq(self, steps: List[_Step], consts) -> List[_Step]:
        """QuantizeLinear -> DequantizeLinear(s) with the same scale and zero point (and nothing else reading the
        integers) -> one FakeQuant step writing the DequantizeLinear outputs."""
        readers: Dict[str, List[_Step]] = {}
        for st in steps:
            for i in st.inputs:
                readers.setdefault(i, []).append(st)
        graph_outputs = set(self.output_names)
        drop, out = set(), []
        for st in steps:
            if id(st) in drop:
                continue
            if st.op == "QuantizeLinear" and st.inputs[0] not in consts and st.outputs[0] not in graph_outputs:
                deq = readers.get(st.outputs[0], [])
                same = deq and all(d.op == "DequantizeLinear" and d.inputs[1:] == st.inputs[1:]
                                   and d.attrs.get("axis", 1) == st.attrs.get("axis", 1) for d in deq)
                if same:
                    qrange = _QRANGE.get(st.types[0])
                    if qrange is None:
                        raise GraphError(f"{self.name}: {st.name} quantizes to an unsupported type {st.types[0]}")
                    for d in deq:
                        drop.add(id(d))
                    outs = [d.outputs[0] for d in deq]
                    attrs = {"axis": st.attrs.get("axis", 1), "qrange": qrange, "q_output": st.outputs[0],
                             "q_type": st.types[0]}
                    s = consts.get(st.inputs[1])
                    z = consts.get(st.inputs[2]) if len(st.inputs) > 2 and st.inputs[2] else torch.zeros(())
                    if s is not None and z is not None and s.numel() == 1 and z.numel() == 1:
                        attrs.update(scale=float(s), zero_point=float(z))
                    out.append(_Step("FakeQuant", st.name, st.inputs, outs, attrs, [d.types[0] for d in deq],
                                     _fake_quant))
                    continue
            out.append(st)
        return out

    @staticmethod
    def _on_grid(steps: List[_Step]) -> None:
        """A fake quantization of values already on its grid is the identity, exactly (values and gradient: in
        range, the straight-through gradient is 1): a Relu, MaxPool, Resize, Concat... of fake-quantized tensors
        with the same scale, zero point and range, re-quantized with them (ResNet's Relus: a quarter of its
        quantizers). Such steps only pass their input on."""
        producers = {o: st for st in steps for o in st.outputs}

        def grid(st):
            return (st.attrs["scale"], st.attrs["zero_point"], st.attrs["qrange"]) if st.op == "FakeQuant" and \
                "scale" in st.attrs else None

        for st in steps:
            src = producers.get(st.inputs[0])
            if grid(st) is None or src is None or src.op not in _SELECTING:
                continue
            data = [i for i in (src.inputs if src.op == "Concat" else src.inputs[:1]) if i]
            if data and all(producers.get(i) is not None and grid(producers[i]) == grid(st) for i in data):
                st.fn = _requantized
                st.attrs["on_grid"] = True

    def _call(self, st: _Step, args) -> tuple:
        self._ctx.current_types = st.types
        self._ctx.outputs_of_current = st.outputs
        try:
            outs = st.fn(args, st.attrs, self._ctx)
        except GraphError as e:
            raise GraphError(f"{self.name}: node {st.name} ({st.op}): {e}") from None
        except Exception as e:
            raise GraphError(f"{self.name}: node {st.name} ({st.op}) failed: {type(e).__name__}: {e}") from e
        if any(st.round16):
            outs = tuple(RoundToHalf.apply(o) if r else o for o, r in zip(outs, st.round16))
        return outs

    # -- execution
    def _plan(self, names: Tuple[str, ...]):
        """The steps needed for `names` (all, and those left when the shape-only values are cached), and for each
        step the values no later step reads, to free them."""
        if names in self._plans:
            return self._plans[names]
        known = set(self._const_keys) | set(self.input_names)
        producers = {o: st for st in self._steps for o in st.outputs}
        for n in names:
            if n not in producers and n not in known:
                raise GraphError(f"{self.name}: no tensor named {n!r} in the graph")
        needed, stack = set(), list(names)
        while stack:
            t = stack.pop()
            st = producers.get(t)
            if st is not None and id(st) not in needed:
                needed.add(id(st))
                stack.extend(i for i in st.inputs if i)
        full = [st for st in self._steps if id(st) in needed]
        dynamic = [st for st in full if not st.static]
        boundary = sorted({i for st in dynamic for i in st.inputs if i in self._static} |
                          {n for n in names if n in self._static})

        def frees(steps):
            last = {}
            for k, st in enumerate(steps):
                for i in st.inputs:
                    last[i] = k
            keep = set(names)
            out = [[] for _ in steps]
            for t, k in last.items():
                if t and t not in keep:
                    out[k].append(t)
            return out

        plan = (full, frees(full), dynamic, frees(dynamic), boundary)
        self._plans[names] = plan
        return plan

    def constant(self, name: str) -> torch.Tensor:
        return self.constants._buffers[self._const_keys[name]]

    def fake_quant_steps(self) -> List[_Step]:
        """The quantized activations: one fused QuantizeLinear -> DequantizeLinear each, in graph order."""
        return [st for st in self._steps if st.op == "FakeQuant"]

    def run(self, feeds: Dict[str, torch.Tensor], names: Sequence[str], force: Optional[Dict[str, torch.Tensor]] = None,
            record: Optional[Dict[str, torch.Tensor]] = None) -> List[torch.Tensor]:
        """The tensors `names` on `feeds`. `force` replaces the values of some tensors as they are computed (what
        the twin computed is put in `record`): verification feeds each layer ONNX Runtime's own inputs this way."""
        names = tuple(names)
        full, full_free, dynamic, dyn_free, boundary = self._plan(names)
        bufs = self.constants._buffers
        env = {n: bufs[k] for n, k in self._const_keys.items()}
        for n in self.input_names:
            if n not in feeds:
                raise GraphError(f"{self.name}: input {n!r} not given")
        env.update(feeds)
        key = (names,) + tuple((n, tuple(feeds[n].shape), feeds[n].dtype, feeds[n].device) for n in self.input_names)
        cached = self._static_cache.get(key) if boundary else {}  # nothing shape-only needed: no cache
        if cached is not None:
            env.update(cached)
            steps, free = dynamic, dyn_free
        else:
            steps, free = full, full_free
        grad = torch.is_grad_enabled()
        keep = set(boundary)
        for st, fr in zip(steps, free):
            outs = self._call(st, [env[i] if i else None for i in st.inputs])
            env.update(zip(st.outputs, outs))
            if force:
                for o in st.outputs:
                    if o in force:
                        if record is not None:
                            record[o] = env[o]
                        f = force[o]
                        env[o] = f if f.dtype == env[o].dtype else f.to(env[o].dtype)
            if not grad:  # with autograd the graph holds them anyway
                for t in fr:
                    if t not in keep:
                        env.pop(t, None)
        if cached is None:
            if len(self._static_cache) >= 64:  # input shapes seen: a handful in practice; never grow unbounded
                self._static_cache.pop(next(iter(self._static_cache)))
            self._static_cache[key] = {n: env[n] for n in boundary}
        return [env[n] for n in names]

    def forward(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.input_names):
            raise GraphError(f"{self.name}: {len(inputs)} inputs given, the graph takes {self.input_names}")
        return tuple(self.run(dict(zip(self.input_names, inputs)), self.output_names))

    def tensor_type(self, name: str) -> int:
        return self.types.get(name, 0)

    def extra_repr(self) -> str:
        return f"{self.name}: {len(self._steps)} nodes, fp16={self.fp16}"
