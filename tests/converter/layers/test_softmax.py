"""Softmax over one axis against numpy, and the layer_zoo `softmax` blob (axis 2) computed by Caffe.

Nets declare batch 2 and are fed batch 3 (batch-agnostic). Tolerances atol 1e-5, rtol 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

from caffeonnx.errors import LayerError
from tests.helpers import assert_close, convert_text, reference_subnet, rng, run


def _net(shape: tuple[int, ...], params: str = "") -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return (
        f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}\n'
        f'layer {{ name: "prob" type: "Softmax" bottom: "x" top: "y" {params} }}\n'
    )


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((2, 10), None),
        ((2, 10), -1),
        ((2, 3, 4, 5), None),
        ((2, 3, 4, 5), 2),
        ((2, 3, 4, 5), -1),
        ((2, 3, 4, 5), 0),
        ((2, 6, 7), -2),
    ],
)
@pytest.mark.parametrize("opset", [13, 21])
def test_matches_caffe_forward(shape: tuple[int, ...], axis: int | None, opset: int) -> None:
    fed = (3, *shape[1:])
    x = (5 * rng(len(shape)).standard_normal(fed)).astype(np.float32)
    x.flat[0] = 80.0  # exp would overflow without Caffe's max subtraction
    params = "" if axis is None else f"softmax_param {{ axis: {axis} }}"
    got = run(convert_text(_net(shape, params), opset=opset), {"x": x})["y"]
    want = _softmax(x.astype(np.float64), 1 if axis is None else axis)
    assert_close(got, want, f"softmax {shape} axis {axis} y")


def test_last_axis_works_before_opset_13() -> None:
    x = rng(1).standard_normal((3, 4, 5)).astype(np.float32)
    got = run(convert_text(_net((2, 4, 5), "softmax_param { axis: 2 }"), opset=12), {"x": x})["y"]
    assert_close(got, _softmax(x.astype(np.float64), 2), "softmax opset 12 y")


def test_inner_axis_before_opset_13_is_refused() -> None:
    """Opset < 13 Softmax normalises over axis..end jointly; converting anyway would be silently wrong."""
    with pytest.raises(
        LayerError, match=r"layer 'prob' \(Softmax\): softmax over axis 1 of a 4-D blob needs opset >= 13"
    ):
        convert_text(_net((2, 3, 4, 5)), opset=12)


@pytest.mark.parametrize("axis", [4, -5])
def test_axis_out_of_range_is_a_layer_error(axis: int) -> None:
    with pytest.raises(LayerError, match=rf"softmax_param.axis {axis} is out of range for a 4-D input"):
        convert_text(_net((2, 3, 4, 5), f"softmax_param {{ axis: {axis} }}"))


def test_layer_zoo_blob_matches_caffe() -> None:
    """Softmax axis 2 of the layer_zoo net, fed the ip_axis2 blob Caffe gave it."""
    text, feeds, expected = reference_subnet("layer_zoo", ["softmax"])
    got = run(convert_text(text), feeds)
    assert_close(got["softmax"], expected["softmax"], "layer_zoo softmax")
