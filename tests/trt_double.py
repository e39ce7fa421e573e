"""TEST DOUBLE of TensorRT's name-based Python API and of a CUDA binding (pycuda), for tests on a machine without a
GPU. Nothing here is TensorRT: no result computed through it is a TensorRT result. It stands in for the documented
contract the real code must follow, and computes with ONNX Runtime (CPU) on the ONNX file the "engine" was built
from, so outputs can be compared with the file's.

Contract enforced (TensorRT 10/11 documentation, NVIDIA/TensorRT#1042):
- `IExecutionContext.set_input_shape` returns False for a shape outside the engine's one optimization profile
  (min/opt/max), and for a fixed-shape input anything but its shape;
- output dims stay -1 until every input shape is set (a static engine has fixed output dims from the start);
- I/O tensors are listed in an order different from the ONNX file's (outputs reversed, input between them);
- `execute_async_v3` needs a stream handle that is not the legacy default stream (0), every address set, and
  buffers large enough (checked against the CUDA double's allocations);
- the builder: strongly typed flag, TF32 flag on by default (recorded, so tests can see it was cleared),
  `set_timing_cache` returns whether a cache is accepted, the timing cache serialises, the plan is bytes.

`install(monkeypatch)` puts the doubles in sys.modules as `tensorrt`, `pycuda`, `pycuda.driver`,
`pycuda.autoprimaryctx`; it imports neither torch nor the project (the torch-free runtime test uses it too).
"""
from __future__ import annotations

import ctypes
import json
import sys
import types

import numpy as np

DOUBLE_VERSION = "10.99.0-double"
DOUBLE_GPU = "Test Double GPU (not a device)"


# -- CUDA (pycuda) double: device memory is host memory with a registry of allocations ----------------------------

class _Registry:
    allocations = {}  # address -> (buffer, nbytes)
    streams = []
    copies = 0
    allocs = 0


def _check_range(ptr: int, nbytes: int, what: str):
    for base, (_, size) in _Registry.allocations.items():
        if base <= ptr and ptr + nbytes <= base + size:
            return
    raise RuntimeError(f"CUDA double: {what}: {nbytes} bytes at {ptr:#x} are outside every device allocation")


class _DeviceAllocation:
    def __init__(self, nbytes):
        self.buf = ctypes.create_string_buffer(nbytes)
        self.ptr = ctypes.addressof(self.buf)
        _Registry.allocations[self.ptr] = (self.buf, nbytes)
        _Registry.allocs += 1

    def __int__(self):
        return self.ptr

    def free(self):
        _Registry.allocations.pop(self.ptr, None)


class _Stream:
    def __init__(self):
        self.handle = 0x5000 + len(_Registry.streams) + 1
        _Registry.streams.append(self)

    def synchronize(self):
        pass


def _htod(dst, src, stream=None):
    src = np.ascontiguousarray(src)
    _check_range(int(dst), src.nbytes, "memcpy_htod")
    ctypes.memmove(int(dst), src.ctypes.data, src.nbytes)
    _Registry.copies += 1


def _dtoh(dst, src, stream=None):
    _check_range(int(src), dst.nbytes, "memcpy_dtoh")
    ctypes.memmove(dst.ctypes.data, int(src), dst.nbytes)
    _Registry.copies += 1


def make_pycuda():
    driver = types.ModuleType("pycuda.driver")
    driver.mem_alloc = _DeviceAllocation
    driver.Stream = _Stream
    driver.pagelocked_empty = lambda shape, dtype: np.empty(shape, dtype)
    driver.memcpy_htod_async = _htod
    driver.memcpy_dtoh_async = _dtoh
    driver.Device = lambda i: types.SimpleNamespace(name=lambda: DOUBLE_GPU)
    pkg = types.ModuleType("pycuda")
    pkg.__path__ = []
    pkg.driver = driver
    auto = types.ModuleType("pycuda.autoprimaryctx")
    pkg.autoprimaryctx = auto
    return {"pycuda": pkg, "pycuda.driver": driver, "pycuda.autoprimaryctx": auto}


# -- TensorRT double -----------------------------------------------------------------------------------------------

class _Enum:
    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


TensorIOMode = _Enum(NONE=0, INPUT=1, OUTPUT=2)
DataType = _Enum(FLOAT=0, HALF=1, INT8=2, INT32=3, BOOL=4, INT64=8)
_NP = {0: np.float32, 1: np.float16, 2: np.int8, 3: np.int32, 4: np.bool_, 8: np.int64}
_FROM_ONNX = {1: 0, 10: 1, 3: 2, 6: 3, 9: 4, 7: 8}  # ONNX elem type -> DataType


def nptype(dt):
    return _NP[dt]


class Logger:
    WARNING, ERROR, INFO, VERBOSE = 1, 0, 2, 3

    def __init__(self, severity=1):
        self.severity = severity


NetworkDefinitionCreationFlag = _Enum(STRONGLY_TYPED=5)
MemoryPoolType = _Enum(WORKSPACE=0)
BuilderFlag = _Enum(TF32=7, FP16=0)


class _Tensor:
    def __init__(self, name, shape, dtype):
        self.name, self.shape, self.dtype = name, tuple(shape), dtype


class _Network:
    def __init__(self, flags):
        self.flags = flags
        self.onnx = None
        self.inputs, self.outputs = [], []

    @property
    def num_inputs(self):
        return len(self.inputs)

    @property
    def num_outputs(self):
        return len(self.outputs)

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.errors = network, []

    def parse(self, data: bytes) -> bool:
        import onnx

        model = onnx.load_from_string(data)
        for n in model.graph.node:  # the parser's best-known refusal: INT32 DequantizeLinear (biases)
            if n.op_type == "DequantizeLinear":
                inits = {i.name: i.data_type for i in model.graph.initializer}
                if inits.get(n.input[0]) == onnx.TensorProto.INT32:
                    self.errors.append(f"{n.name}: only activation types allowed as input to this layer")
        if self.errors:
            return False
        inits = {i.name for i in model.graph.initializer}

        def dims(vi):
            return [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]

        self.network.onnx = data
        self.network.inputs = [_Tensor(i.name, dims(i), _FROM_ONNX[i.type.tensor_type.elem_type])
                               for i in model.graph.input if i.name not in inits]
        self.network.outputs = [_Tensor(o.name, dims(o), _FROM_ONNX[o.type.tensor_type.elem_type])
                                for o in model.graph.output]
        return True

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, mn, opt, mx):
        self.shapes[name] = (tuple(mn), tuple(opt), tuple(mx))


class _TimingCache:
    def __init__(self, data: bytes):
        self.entries = json.loads(data.decode()) if data else {"version": DOUBLE_VERSION, "builds": 0}

    def serialize(self):
        return json.dumps(self.entries).encode()


class _Config:
    def __init__(self):
        self.flags = {BuilderFlag.TF32}  # on by default, as in TensorRT
        self.profiles, self.cache = [], None

    def set_memory_pool_limit(self, pool, size):
        self.workspace = size

    def clear_flag(self, f):
        self.flags.discard(f)

    def set_flag(self, f):
        self.flags.add(f)

    def get_flag(self, f):
        return f in self.flags

    def add_optimization_profile(self, p):
        self.profiles.append(p)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes):
        return _TimingCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch=False):
        if cache.entries.get("version") != DOUBLE_VERSION and not ignore_mismatch:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class Builder:
    def __init__(self, logger):
        pass

    def create_network(self, flags=0):
        return _Network(flags)

    def create_builder_config(self):
        return _Config()

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        inp = network.inputs[0]
        dynamic = any(d < 0 for d in inp.shape)
        if dynamic and not config.profiles:
            return None
        prof = config.profiles[0].shapes[inp.name] if dynamic else (inp.shape,) * 3
        if config.cache is not None:
            config.cache.entries["builds"] = config.cache.entries.get("builds", 0) + 1
        meta = {"input": [inp.name, list(inp.shape), inp.dtype],
                "outputs": [[o.name, list(o.shape), o.dtype] for o in network.outputs],
                "profile": [list(s) for s in prof], "tf32": BuilderFlag.TF32 in config.flags,
                "strongly_typed": bool(network.flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED))}
        head = json.dumps(meta).encode()
        return b"TRTDOUBLE" + len(head).to_bytes(8, "little") + head + network.onnx


class Runtime:
    def __init__(self, logger):
        pass

    def deserialize_cuda_engine(self, plan: bytes):
        if not plan.startswith(b"TRTDOUBLE"):
            return None
        n = int.from_bytes(plan[9:17], "little")
        return _Engine(json.loads(plan[17:17 + n]), plan[17 + n:])


class _Engine:
    def __init__(self, meta, onnx_bytes):
        self.meta, self.onnx_bytes = meta, onnx_bytes
        name, shape, dtype = meta["input"]
        self.inp = _Tensor(name, shape, dtype)
        self.outs = [_Tensor(*o) for o in meta["outputs"]]
        # an order different from the ONNX file's: outputs reversed, the input between them
        outs = [o.name for o in reversed(self.outs)]
        self.order = outs[: len(outs) // 2 + 1] + [self.inp.name] + outs[len(outs) // 2 + 1:]
        self.profile = [tuple(s) for s in meta["profile"]]
        self.tf32 = meta["tf32"]
        self._session = None

    @property
    def num_io_tensors(self):
        return len(self.order)

    num_optimization_profiles = 1

    def get_tensor_name(self, i):
        return self.order[i]

    def _t(self, name):
        return self.inp if name == self.inp.name else next(o for o in self.outs if o.name == name)

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name == self.inp.name else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self._t(name).dtype

    def get_tensor_shape(self, name):
        return list(self._t(name).shape)

    def get_tensor_profile_shape(self, name, index):
        if name != self.inp.name or index != 0:
            raise RuntimeError("TensorRT double: no profile for this tensor")
        return [list(s) for s in self.profile]

    def create_execution_context(self):
        return _Context(self)

    def session(self):
        if self._session is None:
            import onnxruntime as ort

            self._session = ort.InferenceSession(self.onnx_bytes, providers=["CPUExecutionProvider"])
        return self._session


class _Context:
    executions = []  # (stream handle, input shape) per call, for tests

    def __init__(self, engine):
        self.engine, self.shape, self.addresses = engine, None, {}
        if all(d >= 0 for d in engine.inp.shape):
            self.shape = tuple(engine.inp.shape)

    def set_input_shape(self, name, shape):
        if name != self.engine.inp.name:
            return False
        shape = tuple(int(d) for d in shape)
        mn, _, mx = self.engine.profile
        if len(shape) != len(mn) or any(not lo <= d <= hi for d, lo, hi in zip(shape, mn, mx)):
            return False
        self.shape = shape
        return True

    def get_tensor_shape(self, name):
        e = self.engine
        if name == e.inp.name:
            return list(self.shape) if self.shape else list(e.inp.shape)
        out = e._t(name)
        if self.shape is None:
            return [-1 if d < 0 else d for d in out.shape]
        return [self.shape[0] if d < 0 else d for d in out.shape]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream_handle):
        e = self.engine
        if not stream_handle:
            raise RuntimeError("TensorRT double: execute_async_v3 on the legacy default stream (0)")
        if self.shape is None:
            return False
        names = [e.inp.name] + [o.name for o in e.outs]
        if any(n not in self.addresses for n in names):
            return False
        dt = np.dtype(_NP[e.inp.dtype])
        nbytes = int(np.prod(self.shape)) * dt.itemsize
        _check_range(self.addresses[e.inp.name], nbytes, "input")
        x = np.frombuffer((ctypes.c_ubyte * nbytes).from_address(self.addresses[e.inp.name]), dt).reshape(self.shape)
        outs = e.session().run([o.name for o in e.outs], {e.inp.name: x.copy()})
        for o, val in zip(e.outs, outs):
            val = np.ascontiguousarray(val, _NP[o.dtype])
            if list(val.shape) != self.get_tensor_shape(o.name):
                raise RuntimeError(f"TensorRT double: {o.name} computed {val.shape}, context says "
                                   f"{self.get_tensor_shape(o.name)}")
            _check_range(self.addresses[o.name], val.nbytes, f"output {o.name}")
            ctypes.memmove(self.addresses[o.name], val.ctypes.data, val.nbytes)
        _Context.executions.append((stream_handle, self.shape))
        return True


def make_tensorrt():
    m = types.ModuleType("tensorrt")
    m.__version__ = DOUBLE_VERSION
    m.__doc__ = "TEST DOUBLE of TensorRT's Python API (tests/trt_double.py); not TensorRT"
    for name in ("Logger", "Builder", "Runtime", "OnnxParser", "TensorIOMode", "DataType", "nptype",
                 "NetworkDefinitionCreationFlag", "MemoryPoolType", "BuilderFlag"):
        setattr(m, name, globals()[name])
    m.IS_TEST_DOUBLE = True
    return m


def modules():
    mods = make_pycuda()
    mods["tensorrt"] = make_tensorrt()
    return mods


def install(monkeypatch):
    """The doubles as `tensorrt` and `pycuda` for one test (monkeypatch restores sys.modules afterwards)."""
    for name, mod in modules().items():
        monkeypatch.setitem(sys.modules, name, mod)
    _Context.executions.clear()
    return sys.modules["tensorrt"]


# -- a small ONNX file to build "engines" from (three outputs, so their order matters) -------------------------

def tiny_onnx(path, batch="n"):
    """x [N, 3] -> three outputs in ONNX order: twice = 2x, plus1 = x + 1, total = sum over the row [N, 1]."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])
    outs = [helper.make_tensor_value_info("twice", TensorProto.FLOAT, [batch, 3]),
            helper.make_tensor_value_info("plus1", TensorProto.FLOAT, [batch, 3]),
            helper.make_tensor_value_info("total", TensorProto.FLOAT, [batch, 1])]
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("Mul", ["x", "two"], ["twice"]), helper.make_node("Add", ["x", "one"], ["plus1"]),
             helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=1)]
    g = helper.make_graph(nodes, "tiny", [x], outs, [two, one, axes])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return str(path)
