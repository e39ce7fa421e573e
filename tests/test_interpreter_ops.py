"""Operators of the ONNX interpreter (fa_deploy/robustness/interpreter.py) added for Ultralytics' graphs, against
ONNX Runtime on one-node graphs: Softmax (YOLOv8 / YOLO11's DFL decode, YOLO11's attention)."""
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from fa_deploy.robustness.interpreter import GraphError, OnnxGraph


def _graph(node, shape, opset):
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("axis", [None, 1, -2, 3])
def test_softmax_against_onnxruntime_and_its_gradient(axis):
    import onnxruntime as ort

    x = (np.random.default_rng(0).standard_normal((2, 4, 16, 5)) * 6).astype(np.float32)
    node = helper.make_node("Softmax", ["x"], ["y"], "sm", **({} if axis is None else {"axis": axis}))
    model = _graph(node, x.shape, 17)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    g = OnnxGraph(model)
    xt = torch.from_numpy(x).requires_grad_(True)
    got = g(xt)[0]
    np.testing.assert_allclose(got.detach().numpy(), ref, rtol=1e-5, atol=1e-7)
    # gradient: float64 finite differences of the interpreted node (the graph in double precision)
    x64 = torch.from_numpy(x[:1, :2, :3, :3]).double().requires_grad_(True)
    g64 = OnnxGraph(_graph(node, x64.shape, 17)).double()
    assert torch.autograd.gradcheck(lambda v: g64(v)[0], (x64,))


def test_softmax_of_an_older_opset_is_refused():
    """Before opset 13 Softmax flattened the axes from `axis` on: another function, refused by name."""
    node = helper.make_node("Softmax", ["x"], ["y"], "sm", axis=1)
    with pytest.raises(GraphError, match=r"opset 11: \['Softmax'\] .* from opset 13 on"):
        OnnxGraph(_graph(node, (2, 4, 3), 11))
