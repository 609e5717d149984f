"""prepare(): shape chains folded to constants, ties recovered, provenance kept, dead branches pruned."""
from __future__ import annotations

import numpy as np

from caffeonnx.converter.foreign.prepare import prepare
from tests.converter.foreign.helpers import make_model, node

I64 = np.int64
A = np.random.default_rng(40).standard_normal((3, 4)).astype(np.float32)


def test_shape_gather_unsqueeze_concat_reshape_chain_folds_to_a_constant() -> None:
    """torch's x.view(x.size(0), -1) with a dynamic batch: only the Reshape is left, its target constant."""
    nodes = [
        node("Shape", ["x"], ["s"]),
        node("Gather", ["s", "zero"], ["n"], axis=0),
        node("Unsqueeze", ["n", "axes"], ["n1"]),
        node("Concat", ["n1", "minus1"], ["target"], axis=0),
        node("Reshape", ["x", "target"]),
    ]
    inits = {"zero": np.array(0, I64), "axes": np.array([0], I64), "minus1": np.array([-1], I64)}
    graph = prepare(make_model(nodes, {"x": ["batch", 3, 4, 5]}, ["y"], inits), batch=7)
    assert [n.op_type for n in graph.nodes] == ["Reshape"]
    assert graph.consts["target"].value.tolist() == [7, -1]
    assert graph.shapes["y"] == (7, 60) and graph.inputs == [("x", (7, 3, 4, 5))]


def test_transposed_copy_of_an_initializer_is_that_initializer_transposed() -> None:
    inits = {"A": A, "A_t": A.T.copy(), "A_copy": A.copy(), "zeros": np.zeros((4, 3), np.float32),
             "zeros_t": np.zeros((3, 4), np.float32)}
    nodes = [node("MatMul", ["x", "A_t"], ["y1"]), node("MatMul", ["y1", "A_copy"], ["y2"]),
             node("MatMul", ["y2", "zeros"], ["y3"]), node("MatMul", ["y3", "zeros_t"], ["y"])]
    graph = prepare(make_model(nodes, {"x": [2, 4]}, ["y"], inits))
    tied = graph.consts["A_t"]
    assert tied.source == "A" and tied.transposed and tied.is_source_transposed()
    assert graph.consts["A_copy"].source == "A_copy", "an identical copy is not taken for a tie"
    assert graph.consts["zeros"].source == "zeros", "constant arrays are never tied"


def test_folded_constants_remember_their_initializer() -> None:
    nodes = [
        node("Identity", ["A"], ["a1"]),
        node("Transpose", ["a1"], ["a2"], perm=[1, 0]),
        node("Reshape", ["A", "shape"], ["a3"]),
        node("Mul", ["A", "two"], ["a4"]),
        node("MatMul", ["x", "a2"], ["y1"]),
        node("Add", ["x3", "a3"], ["y2"]),
        node("Add", ["x", "a4"], ["y3"]),
    ]
    inits = {"A": A, "shape": np.array([2, 6], I64), "two": np.array(2, np.float32)}
    graph = prepare(make_model(nodes, {"x": [3, 4], "x3": [2, 6]}, ["y1", "y2", "y3"], inits))
    assert graph.consts["a1"].is_source() and graph.consts["a2"].is_source_transposed()
    assert graph.consts["a3"].same_order() and graph.consts["a3"].value.shape == (2, 6)
    assert graph.consts["a4"].source is None and np.array_equal(graph.consts["a4"].value, A * 2)
    assert [n.op_type for n in graph.nodes] == ["MatMul", "Add", "Add"]


def test_dead_branches_are_pruned_before_support_is_checked() -> None:
    nodes = [node("Relu", ["x"], ["y"]), node("Erf", ["x"], ["unused"])]
    graph = prepare(make_model(nodes, {"x": [2, 3]}, ["y"]))
    assert [n.op_type for n in graph.nodes] == ["Relu"]


def test_unnamed_nodes_get_op_and_position_names() -> None:
    model = make_model([node("Relu", ["x"], ["a"]), node("Sigmoid", ["a"])], {"x": [2, 3]}, ["y"])
    for n in model.graph.node:
        n.name = ""
    graph = prepare(model)
    assert [n.name for n in graph.nodes] == ["Relu_0", "Sigmoid_1"]
    assert [n.name for n in model.graph.node] == ["", ""], "the caller's model is left unchanged"
