"""Reduction (SUM, ASUM, SUMSQ, MEAN; axis; coeff) against numpy versions of Caffe's forward.

The top keeps the axes before `axis` (axis 0 gives a 0-d blob). Nets declare batch 2 and are
fed batch 3 (batch-agnostic). Both axes-as-attribute (opset 13) and axes-as-input (opset 18+)
forms are run. Tolerances atol 1e-5, rtol 1e-4 (sums of at most 180 float32 values).
"""

from __future__ import annotations

import numpy as np
import pytest

from caffeonnx.errors import LayerError
from tests.helpers import assert_close, convert_text, rng, run

SHAPE = (2, 3, 4, 5)
FED = (3, 3, 4, 5)

REDUCE = {
    "SUM": lambda r: r.sum(axis=1),
    "ASUM": lambda r: np.abs(r).sum(axis=1),
    "SUMSQ": lambda r: (r * r).sum(axis=1),
    "MEAN": lambda r: r.mean(axis=1),
}


def caffe_reduction(x: np.ndarray, op: str, axis: int, coeff: float) -> np.ndarray:
    """Caffe's Reduction: each of the prod(shape[:axis]) slices reduced to one value, times coeff."""
    axis %= x.ndim
    rows = x.reshape(int(np.prod(x.shape[:axis])), -1)
    return (coeff * REDUCE[op](rows)).reshape(x.shape[:axis])


def _net(params: str, shape: tuple[int, ...] = SHAPE) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return (
        f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}\n'
        f'layer {{ name: "red" type: "Reduction" bottom: "x" top: "y" reduction_param {{ {params} }} }}\n'
    )


@pytest.mark.parametrize("op", sorted(REDUCE))
@pytest.mark.parametrize("axis", [None, 1, 2, -1, 3])
@pytest.mark.parametrize("coeff", [None, 0.5, -2.0])
@pytest.mark.parametrize("opset", [13, 21])
def test_matches_caffe_forward(op: str, axis: int | None, coeff: float | None, opset: int) -> None:
    x = rng(len(op)).standard_normal(FED).astype(np.float32)
    params = (
        f"operation: {op}" + ("" if axis is None else f" axis: {axis}") + ("" if coeff is None else f" coeff: {coeff}")
    )
    got = run(convert_text(_net(params), opset=opset), {"x": x})["y"]
    want = caffe_reduction(x.astype(np.float64), op, 0 if axis is None else axis, 1.0 if coeff is None else coeff)
    assert got.shape == want.shape, f"reduction {params}: top shape {got.shape}, Caffe's is {want.shape}"
    assert_close(got, want, f"reduction {params} y")


def test_default_is_sum_of_everything_as_a_scalar() -> None:
    x = rng(1).standard_normal((3, 4)).astype(np.float32)
    got = run(convert_text(_net("", (2, 4))), {"x": x})["y"]
    assert got.shape == (), f"top shape {got.shape}, Caffe's axis-0 reduction is 0-d"
    assert_close(got, np.array(x.astype(np.float64).sum()), "reduction default y")


@pytest.mark.parametrize("axis", [4, -5])
def test_axis_out_of_range_is_a_layer_error(axis: int) -> None:
    with pytest.raises(LayerError, match=rf"layer 'red' \(Reduction\): reduction_param.axis {axis} is out of range"):
        convert_text(_net(f"axis: {axis}"))
