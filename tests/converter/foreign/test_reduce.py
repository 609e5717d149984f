"""ReduceMean/Max/Sum/L1/SumSquare -> global Pooling (H, W) or Reduction (trailing axes) (atol 1e-5)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from caffeonnx.converter.onnx_to_caffe import onnx_to_caffe
from caffeonnx.errors import UnsupportedError
from tests.converter.foreign.helpers import check_conversion, feeds_for, layer_types, make_model, node

SHAPE = [2, 3, 4, 5]


@pytest.mark.parametrize("keepdims", [1, 0])
@pytest.mark.parametrize("op", ["ReduceMean", "ReduceMax"])
def test_spatial_reduction_is_global_pooling(op: str, keepdims: int, tmp_path: Path) -> None:
    model = make_model([node(op, ["x"], axes=[-2, -1], keepdims=keepdims)], {"x": SHAPE}, ["y"])
    result = check_conversion(model, feeds_for(model, 0), tmp_path)
    assert layer_types(result) == ["Input", "Pooling"] + ([] if keepdims else ["Reshape"])


@pytest.mark.parametrize("keepdims", [1, 0])
@pytest.mark.parametrize(("op", "axes"), [
    ("ReduceMean", [1, 2, 3]), ("ReduceSum", [3]), ("ReduceL1", [2, 3]), ("ReduceSumSquare", [0, 1, 2, 3]),
])
def test_trailing_axes_are_a_reduction(op: str, axes: list[int], keepdims: int, tmp_path: Path) -> None:
    inits, inputs, attrs = {}, ["x"], {"keepdims": keepdims}
    if op == "ReduceSum":  # axes are an input from opset 13
        inits, inputs = {"axes": np.array(axes, np.int64)}, ["x", "axes"]
    else:
        attrs["axes"] = axes
    model = make_model([node(op, inputs, **attrs)], {"x": SHAPE}, ["y"], inits)
    result = check_conversion(model, feeds_for(model, 1), tmp_path)
    assert layer_types(result)[:2] == ["Input", "Reduction"]


def test_axes_input_from_opset_18(tmp_path: Path) -> None:
    model = make_model([node("ReduceMean", ["x", "axes"])], {"x": SHAPE}, ["y"], {"axes": np.array([2, 3], np.int64)},
                       opset=18)
    check_conversion(model, feeds_for(model, 2), tmp_path)


def test_inner_axis_is_refused() -> None:
    model = make_model([node("ReduceMax", ["x"], axes=[1])], {"x": SHAPE}, ["y"])
    with pytest.raises(UnsupportedError, match=r"node 'reducemax_y' \(ReduceMax\): axes \[1\] of a 4-D input"):
        onnx_to_caffe(model)
