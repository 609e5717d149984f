"""Gemm / MatMul (+ Add) -> InnerProduct: orientation, bias forms, alpha/beta, shared and transposed weights."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.converter.foreign.helpers import check_conversion, feeds_for, layer_types, make_model, node

RNG = np.random.default_rng(10)
W = RNG.standard_normal((6, 4)).astype(np.float32)  # N x K as torch stores Linear weights
B = RNG.standard_normal(6).astype(np.float32)


@pytest.mark.parametrize(("attrs", "weight", "bias"), [
    ({"transB": 1}, W, B),
    ({"transB": 0}, W.T.copy(), B),
    ({"transB": 1}, W, B.reshape(1, 6)),
    ({"transB": 1}, W, np.float32(0.5)),
    ({"transB": 1, "alpha": 0.5, "beta": 2.0}, W, B),
    ({"transB": 1}, W, None),
], ids=["transB1", "transB0", "bias_1xN", "bias_scalar", "alpha_beta", "no_bias"])
def test_gemm(attrs: dict, weight: np.ndarray, bias: np.ndarray | None, tmp_path: Path) -> None:
    inits = {"W": weight} | ({} if bias is None else {"C": bias})
    model = make_model([node("Gemm", ["x", "W"] + ([] if bias is None else ["C"]), **attrs)], {"x": [3, 4]}, ["y"],
                       inits)
    result = check_conversion(model, feeds_for(model, 0), tmp_path)
    (ip,) = [lay for lay in result.net.layer if lay.type == "InnerProduct"]
    assert ip.inner_product_param.transpose == (attrs["transB"] == 0)
    assert ip.inner_product_param.bias_term == (bias is not None)


@pytest.mark.parametrize("x_shape", [[3, 4], [2, 3, 4]], ids=["2d", "3d"])
@pytest.mark.parametrize("bias_shape", [None, (6,), (1, 6)], ids=["no_add", "add", "add_1xN"])
def test_matmul_add_is_one_inner_product(x_shape: list[int], bias_shape: tuple | None, tmp_path: Path) -> None:
    nodes = [node("MatMul", ["x", "Wt"], ["mm" if bias_shape else "y"])]
    inits = {"Wt": W.T.copy()}
    if bias_shape:
        nodes.append(node("Add", ["mm", "b"]))
        inits["b"] = B.reshape(bias_shape)
    model = make_model(nodes, {"x": x_shape}, ["y"], inits)
    result = check_conversion(model, feeds_for(model, 1), tmp_path)
    assert layer_types(result) == ["Input", "InnerProduct"]
    ip = result.net.layer[1].inner_product_param
    assert ip.transpose and ip.bias_term == (bias_shape is not None) and ip.axis == len(x_shape) - 1


def test_shared_initializer_is_one_param_and_transpose_node_sets_transpose(tmp_path: Path) -> None:
    """encoder Gemm(W, transB=1); decoder MatMul(h, W) and a second decoder Gemm(Transpose(W), transB=1)."""
    nodes = [
        node("Gemm", ["x", "W", "b"], ["h"], transB=1),
        node("MatMul", ["h", "W"], ["y1"]),
        node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
        node("Gemm", ["h", "Wt", "c"], ["y2"], transB=1),
    ]
    model = make_model(nodes, {"x": [3, 4]}, ["y1", "y2"], {"W": W, "b": B, "c": RNG.standard_normal(4).astype(
        np.float32)})
    result = check_conversion(model, feeds_for(model, 2), tmp_path)
    ips = [lay for lay in result.net.layer if lay.type == "InnerProduct"]
    assert [lay.inner_product_param.transpose for lay in ips] == [False, True, True]
    assert [lay.param[0].name for lay in ips] == ["W"] * 3
    assert all(np.array_equal(result.blobs[lay.name][0], W) for lay in ips), "every user stores W as is"


def test_folded_transposed_copy_is_recognised_as_the_tie(tmp_path: Path) -> None:
    """An exporter's constant-folded W.t() (a second initializer) is read as W transposed: one shared param."""
    nodes = [node("Gemm", ["x", "W"], ["h"], transB=1), node("Gemm", ["h", "W_t"], transB=1)]
    model = make_model(nodes, {"x": [3, 4]}, ["y"], {"W": W, "W_t": W.T.copy()})
    result = check_conversion(model, feeds_for(model, 3), tmp_path)
    enc, dec = [lay for lay in result.net.layer if lay.type == "InnerProduct"]
    assert enc.param[0].name == dec.param[0].name == "W"
    assert dec.inner_product_param.transpose and not enc.inner_product_param.transpose
    assert result.blobs[dec.name][0].shape == (6, 4)


def test_equal_constant_arrays_are_not_tied(tmp_path: Path) -> None:
    """Zero biases an exporter merged into one initializer are not a tie (training them shared would be wrong)."""
    nodes = [node("Gemm", ["x", "W", "z"], ["h"], transB=1), node("Gemm", ["h", "V", "z"], transB=1)]
    model = make_model(nodes, {"x": [3, 4]}, ["y"], {"W": W, "V": RNG.standard_normal((6, 6)).astype(np.float32),
                                                     "z": np.zeros(6, np.float32)})
    result = check_conversion(model, feeds_for(model, 4), tmp_path)
    assert not any(spec.name for lay in result.net.layer for spec in lay.param)
