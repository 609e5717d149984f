"""Scale and Bias against a numpy reference of Caffe's (outer, operand, inner) loops."""
from __future__ import annotations

import math

import numpy as np
import pytest

from caffeonnx.errors import LayerError, WeightsError
from tests.helpers import assert_close, convert_text, rng, run

X_SHAPE = (2, 3, 4, 5)


def _input(name: str, shape: tuple[int, ...]) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {dims} }} }} }}\n'


def caffe_apply(x: np.ndarray, operand: np.ndarray, axis: int, op: str) -> np.ndarray:
    """Caffe's Forward_cpu: x seen as (outer, operand.size, inner), operand applied along the middle."""
    axis = 0 if operand.ndim == 0 else axis % x.ndim
    outer = math.prod(x.shape[:axis])
    view = x.reshape(outer, operand.size, -1)
    o = operand.reshape(1, -1, 1)
    return (view * o if op == "mul" else view + o).reshape(x.shape)


# (axis, num_axes, operand shape for X_SHAPE)
LEARNED = [(1, 1, (3,)), (1, 2, (3, 4)), (1, -1, (3, 4, 5)), (0, 0, ()), (-2, 1, (4,)), (2, 2, (4, 5)), (0, 1, (2,))]


@pytest.mark.parametrize(("axis", "num_axes", "operand"), LEARNED)
@pytest.mark.parametrize("bias_term", [False, True])
def test_scale_learned(axis: int, num_axes: int, operand: tuple[int, ...], bias_term: bool) -> None:
    g = rng(len(operand) * 7 + axis + 3 * bias_term)
    blobs = [g.normal(size=operand).astype(np.float32)] + ([g.normal(size=operand).astype(np.float32)] if bias_term else [])
    text = _input("x", X_SHAPE) + (f'layer {{ name: "sc" type: "Scale" bottom: "x" top: "y" scale_param {{ '
                                   f'axis: {axis} num_axes: {num_axes} bias_term: {str(bias_term).lower()} }} }}')
    m = convert_text(text, {"sc": blobs})
    x = g.normal(size=X_SHAPE).astype(np.float32)
    want = caffe_apply(x, blobs[0], axis, "mul")
    if bias_term:
        want = caffe_apply(want, blobs[1], axis, "add")
    assert_close(run(m, {"x": x})["y"], want, "y")
    assert [w.shape for w in m.weights.values()] == [operand] * len(blobs)


@pytest.mark.parametrize(("axis", "num_axes", "operand"), LEARNED)
def test_bias_learned(axis: int, num_axes: int, operand: tuple[int, ...]) -> None:
    g = rng(len(operand) * 5 + axis)
    blob = g.normal(size=operand).astype(np.float32)
    text = _input("x", X_SHAPE) + (f'layer {{ name: "b" type: "Bias" bottom: "x" top: "y" '
                                   f'bias_param {{ axis: {axis} num_axes: {num_axes} }} }}')
    m = convert_text(text, {"b": [blob]})
    x = g.normal(size=X_SHAPE).astype(np.float32)
    assert_close(run(m, {"x": x})["y"], caffe_apply(x, blob, axis, "add"), "y")
    assert [w.shape for w in m.weights.values()] == [operand]


# (axis, second bottom's shape)
FROM_BOTTOM = [(0, (2, 3)), (1, (3, 4)), (1, (3,)), (-1, (5,)), (0, (2, 3, 4, 5)), (1, ())]


@pytest.mark.parametrize(("axis", "operand"), FROM_BOTTOM)
@pytest.mark.parametrize("bias_term", [False, True])
def test_scale_from_second_bottom(axis: int, operand: tuple[int, ...], bias_term: bool) -> None:
    g = rng(len(operand) * 11 + axis + bias_term)
    bias = [g.normal(size=operand).astype(np.float32)] if bias_term else []
    text = _input("x", X_SHAPE) + _input("s", operand) + (
        f'layer {{ name: "sc" type: "Scale" bottom: "x" bottom: "s" top: "y" '
        f'scale_param {{ axis: {axis} bias_term: {str(bias_term).lower()} }} }}')
    m = convert_text(text, {"sc": bias} if bias_term else None)
    x, s = g.normal(size=X_SHAPE).astype(np.float32), g.normal(size=operand).astype(np.float32)
    want = caffe_apply(x, s, axis, "mul")
    if bias_term:
        want = caffe_apply(want, bias[0], axis, "add")
    assert_close(run(m, {"x": x, "s": s})["y"], want, "y")
    # With a scale bottom Caffe's only blob is the bias.
    assert [w.shape for w in m.weights.values()] == [operand] * len(bias)


@pytest.mark.parametrize(("axis", "operand"), FROM_BOTTOM)
def test_bias_from_second_bottom(axis: int, operand: tuple[int, ...]) -> None:
    g = rng(len(operand) * 13 + axis)
    text = _input("x", X_SHAPE) + _input("b", operand) + (
        f'layer {{ name: "bi" type: "Bias" bottom: "x" bottom: "b" top: "y" bias_param {{ axis: {axis} }} }}')
    m = convert_text(text, None)
    x, b = g.normal(size=X_SHAPE).astype(np.float32), g.normal(size=operand).astype(np.float32)
    assert_close(run(m, {"x": x, "b": b})["y"], caffe_apply(x, b, axis, "add"), "y")
    assert not m.weights


def test_caffemodel_must_hold_the_bias_of_a_two_bottom_scale() -> None:
    """Its bias_term blob is learned even though the scale is a bottom: missing weights are an error, not a fill."""
    text = (_input("x", X_SHAPE) + _input("s", (3,)) + 'layer { name: "sc" type: "Scale" bottom: "x" bottom: "s" top: "y" '
            'scale_param { bias_term: true } }\nlayer { name: "b" type: "Bias" bottom: "y" bottom: "s" top: "z" }')
    with pytest.raises(WeightsError, match=r"no weights for layer\(s\) 'sc';"):
        convert_text(text, {"other": [np.zeros(1)]})


def test_second_bottom_holding_the_batch_stays_batch_agnostic() -> None:
    """Squeeze-excitation style: x (N, C, H, W) scaled by s (N, C) with axis 0, fed another batch size."""
    g = rng(21)
    text = _input("x", X_SHAPE) + _input("s", (2, 3)) + (
        'layer { name: "sc" type: "Scale" bottom: "x" bottom: "s" top: "y" scale_param { axis: 0 } }')
    m = convert_text(text, None)
    x, s = g.normal(size=(5, 3, 4, 5)).astype(np.float32), g.normal(size=(5, 3)).astype(np.float32)
    assert_close(run(m, {"x": x, "s": s})["y"], caffe_apply(x, s, 0, "mul"), "y (batch 5)")


def test_default_fillers_are_identity() -> None:
    """Without weights Scale fills its scale with 1 and its bias with 0, Bias its bias with 0 (Caffe's defaults)."""
    text = _input("x", X_SHAPE) + ('layer { name: "sc" type: "Scale" bottom: "x" top: "s" scale_param { bias_term: true } }\n'
                                   'layer { name: "b" type: "Bias" bottom: "s" top: "y" }')
    m = convert_text(text, None)
    assert [w.tolist() for w in m.weights.values()] == [[1.0] * 3, [0.0] * 3, [0.0] * 3]
    x = rng(4).normal(size=X_SHAPE).astype(np.float32)
    assert_close(run(m, {"x": x})["y"], x, "y")


@pytest.mark.parametrize("layer", ['type: "Scale" scale_param { num_axes: 0 bias_term: true }', 'type: "Bias" bias_param { num_axes: 0 }'])
def test_scalar_operand_without_weights_keeps_zero_axes(layer: str) -> None:
    """num_axes 0 makes a 0-axis blob in Caffe; filled from the filler it must stay 0-axis."""
    m = convert_text(_input("x", X_SHAPE) + f'layer {{ name: "l" {layer} bottom: "x" top: "y" }}', None)
    assert all(w.shape == () for w in m.weights.values()) and m.weights
    x = rng(6).normal(size=X_SHAPE).astype(np.float32)
    assert_close(run(m, {"x": x})["y"], x, "y")


def test_fillers_are_used() -> None:
    text = _input("x", X_SHAPE) + ('layer { name: "sc" type: "Scale" bottom: "x" top: "y" scale_param { '
                                   'filler { type: "constant" value: 2.5 } bias_term: true '
                                   'bias_filler { type: "constant" value: -1 } } }')
    assert [w.tolist() for w in convert_text(text, None).weights.values()] == [[2.5] * 3, [-1.0] * 3]


@pytest.mark.parametrize(("layer", "match"), [
    ('type: "Scale" bottom: "x" scale_param { num_axes: -2 }', r"'l' \(Scale\): num_axes -2 is invalid"),
    ('type: "Bias" bottom: "x" bias_param { axis: 2 num_axes: 3 }', r"'l' \(Bias\): num_axes 3 from axis 2 extends past"),
    ('type: "Scale" bottom: "x" scale_param { axis: 4 }', r"'l' \(Scale\): axis 4 is out of range for a 4-D input"),
    ('type: "Scale" bottom: "x" bottom: "s" scale_param { axis: 2 }',
     r"'l' \(Scale\): scale shape \[3, 4\] does not match input shape \[2, 3, 4, 5\] from axis 2"),
    ('type: "Bias" bottom: "x" bottom: "s" bias_param { axis: 0 }',
     r"'l' \(Bias\): bias shape \[3, 4\] does not match input shape \[2, 3, 4, 5\] from axis 0"),
])
def test_shape_errors(layer: str, match: str) -> None:
    text = _input("x", X_SHAPE) + _input("s", (3, 4)) + f'layer {{ name: "l" {layer} top: "y" }}'
    with pytest.raises(LayerError, match=match):
        convert_text(text, None)
