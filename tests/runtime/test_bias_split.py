"""split_gemm_bias (the CUDA sessions' Gemm rewrite) computes the same codes as the original graph."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from caffeonnx.runtime.bench import deep_ae_encoder
from caffeonnx.runtime.bias_split import DISABLED_FUSIONS, split_gemm_bias
from tests.helpers import assert_close, rng


def _run(model: onnx.ModelProto, x: np.ndarray, disabled: tuple[str, ...] = ()) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled))
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_deep_encoder_gemms_become_gemm_then_add_with_the_same_codes(seed: int) -> None:
    model = deep_ae_encoder(seed)
    split = split_gemm_bias(model)
    onnx.checker.check_model(split, full_check=True)
    ops = [n.op_type for n in split.graph.node]
    assert ops.count("Gemm") == 4 and ops.count("Add") == 4 and ops.count("Sigmoid") == 3
    assert all(len(n.input) == 2 for n in split.graph.node if n.op_type == "Gemm")
    assert [o.name for o in split.graph.output] == [o.name for o in model.graph.output]
    x = rng(seed).random((7, 784), dtype=np.float32)
    assert_close(_run(split, x, DISABLED_FUSIONS), _run(model, x), "codes after the bias split", atol=1e-5, rtol=1e-5)


def test_caffe_encoder_keeps_caffes_codes(deep_encoder_path: Path, deep_blobs: dict) -> None:
    split = split_gemm_bias(onnx.load(str(deep_encoder_path)))
    assert_close(_run(split, deep_blobs["data"], DISABLED_FUSIONS), deep_blobs["encode4"], "encode4 (bias split)")


def test_gemms_it_cannot_split_are_left_alone() -> None:
    """beta != 1, a 2-D C and a C computed by the graph keep their Gemm (their meaning is not a bias row)."""
    w = numpy_helper.from_array(np.ones((3, 4), np.float32), "w")
    b = numpy_helper.from_array(np.ones(3, np.float32), "b")
    c2 = numpy_helper.from_array(np.ones((2, 3), np.float32), "c2")
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y1"], name="scaled", transB=1, beta=0.5),
             helper.make_node("Gemm", ["x", "w", "c2"], ["y2"], name="matrix_c", transB=1),
             helper.make_node("Relu", ["b"], ["rb"], name="relu"),
             helper.make_node("Gemm", ["x", "w", "rb"], ["y3"], name="computed_c", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("y1", "y2", "y3")],
                              [w, b, c2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert split_gemm_bias(model).graph.node == model.graph.node
