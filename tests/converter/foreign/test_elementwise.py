"""Add/Sub/Mul/Div/Sum/Mean/Max/Min/Pow -> Eltwise, Scale, Bias, Power (atol 1e-5, rtol 1e-4)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.converter.foreign.helpers import check_conversion, feeds_for, layer_types, make_model, node

SHAPE = [2, 3, 4, 5]
ARITH = ["Add", "Sub", "Mul", "Div"]


@pytest.mark.parametrize("op", ARITH)
def test_two_blobs_of_one_shape(op: str, tmp_path: Path) -> None:
    model = make_model([node(op, ["a", "b"])], {"a": SHAPE, "b": SHAPE}, ["y"])
    result = check_conversion(model, feeds_for(model, 0, positive=op == "Div"), tmp_path)
    assert "Eltwise" in layer_types(result)


@pytest.mark.parametrize("op", ARITH)
@pytest.mark.parametrize(("big_first", "small"), [
    (True, [2, 3, 1, 1]), (False, [2, 3, 1, 1]), (True, [4, 5]), (False, [1, 3, 4, 1]),
], ids=["nc11", "nc11_first", "hw", "1ch1_first"])
def test_blob_broadcast_onto_blob(op: str, big_first: bool, small: list[int], tmp_path: Path) -> None:
    """SE-block style x * gate(N, C, 1, 1): a two-bottom Scale/Bias over the axes the smaller blob covers."""
    inputs = ["a", "b"] if big_first else ["b", "a"]
    model = make_model([node(op, inputs)], {"a": SHAPE, "b": small}, ["y"])
    result = check_conversion(model, feeds_for(model, 1, positive=op == "Div"), tmp_path)
    assert ("Bias" if op in ("Add", "Sub") else "Scale") in layer_types(result)


@pytest.mark.parametrize("op", ARITH)
@pytest.mark.parametrize("const_first", [False, True], ids=["x_op_c", "c_op_x"])
@pytest.mark.parametrize("const_shape", [(), (3, 1, 1), (1, 3, 4, 1), (5,), (3, 1, 5)],
                         ids=["scalar", "c11", "1ch1", "w", "c1w_inner_broadcast"])
def test_blob_and_constant(op: str, const_first: bool, const_shape: tuple, tmp_path: Path) -> None:
    c = (np.random.default_rng(2).random(const_shape, dtype=np.float32) + 0.5) * np.float32(1.5)
    inputs = ["c", "x"] if const_first else ["x", "c"]
    model = make_model([node(op, inputs)], {"x": SHAPE}, ["y"], {"c": c})
    result = check_conversion(model, feeds_for(model, 3, positive=op == "Div"), tmp_path)
    expected = "Power" if not const_shape else ("Bias" if op in ("Add", "Sub") else "Scale")
    assert expected in layer_types(result)


def test_constant_bias_keeps_its_initializer_shareable(tmp_path: Path) -> None:
    """Two Adds of the same (non-constant) bias initializer: one shared Bias param."""
    c = np.random.default_rng(4).standard_normal((3, 1, 1)).astype(np.float32)
    model = make_model([node("Add", ["x", "c"], ["h"]), node("Add", ["h", "c"])], {"x": SHAPE}, ["y"], {"c": c})
    result = check_conversion(model, feeds_for(model, 4), tmp_path)
    biases = [lay for lay in result.net.layer if lay.type == "Bias"]
    assert [lay.param[0].name for lay in biases] == ["c", "c"]
    assert all(result.blobs[lay.name][0].shape == (3,) for lay in biases)


@pytest.mark.parametrize("op", ["Sum", "Mean", "Max", "Min"])
@pytest.mark.parametrize("n", [2, 3])
def test_variadic(op: str, n: int, tmp_path: Path) -> None:
    names = [f"x{i}" for i in range(n)]
    model = make_model([node(op, names)], {k: SHAPE for k in names}, ["y"])
    result = check_conversion(model, feeds_for(model, 5), tmp_path)
    assert "Eltwise" in layer_types(result)


@pytest.mark.parametrize("op", ["Max", "Min"])
@pytest.mark.parametrize("value", [0.0, 0.3])
def test_max_min_with_a_constant(op: str, value: float, tmp_path: Path) -> None:
    model = make_model([node(op, ["x", "c"])], {"x": SHAPE}, ["y"], {"c": np.array(value, np.float32)})
    result = check_conversion(model, feeds_for(model, 6), tmp_path)
    assert "ReLU" in layer_types(result)


@pytest.mark.parametrize(("op", "inits"), [
    ("Pow", {"e": np.array(1.5, np.float32)}), ("Sqrt", {}), ("Reciprocal", {}), ("Neg", {}),
])
def test_power_family(op: str, inits: dict, tmp_path: Path) -> None:
    model = make_model([node(op, ["x", *inits])], {"x": SHAPE}, ["y"], inits)
    result = check_conversion(model, feeds_for(model, 7, positive=True), tmp_path)
    assert layer_types(result) == ["Input", "Power"]


def test_single_input_sum_is_an_alias_named_by_a_split(tmp_path: Path) -> None:
    model = make_model([node("Sum", ["x"])], {"x": SHAPE}, ["y"])
    result = check_conversion(model, feeds_for(model, 8), tmp_path)
    assert layer_types(result) == ["Input", "Split"]
