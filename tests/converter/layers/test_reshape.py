"""Reshape: Caffe's top shares the bottom's memory, so the reference is the same values in Caffe's top shape (exact).

Top shapes follow ReshapeLayer::Reshape (cases as in Caffe's test_reshape_layer.cpp): `shape` replaces
bottom axes [axis, axis + num_axes); 0 copies the bottom dim at that position, one -1 is inferred.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from caffeonnx.errors import LayerError
from tests.helpers import assert_close, convert_text, reference_subnet, rng, run

TopShape = Callable[[int], tuple[int, ...]]  # batch -> Caffe's top shape


def _net(shape: tuple[int, ...], param: str) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return (
        f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}\n'
        f'layer {{ name: "reshape" type: "Reshape" bottom: "x" top: "y" reshape_param {{ {param} }} }}\n'
    )


def _shape(*dims: int) -> str:
    return "shape { " + " ".join(f"dim: {d}" for d in dims) + " }"


# (reshape_param text, Caffe's top shape for a bottom of shape (n, 3, 6, 5))
CASES = [
    (_shape(0, -1), lambda n: (n, 90)),
    (_shape(0, 3, 10, -1), lambda n: (n, 3, 10, 3)),
    (_shape(3, 10, -1) + " axis: 1", lambda n: (n, 3, 10, 3)),
    (_shape(-1) + " axis: 1 num_axes: 2", lambda n: (n, 18, 5)),
    (_shape(1, 1, 1) + " axis: 0 num_axes: 0", lambda n: (1, 1, 1, n, 3, 6, 5)),
    (_shape(1, 1, 1) + " axis: 2 num_axes: 0", lambda n: (n, 3, 1, 1, 1, 6, 5)),
    (_shape(1, 1, 1) + " axis: -1 num_axes: 0", lambda n: (n, 3, 6, 5, 1, 1, 1)),
    (_shape(0, 0, 0, 0), lambda n: (n, 3, 6, 5)),
    (_shape(0, -1, 0) + " axis: 1", lambda n: (n, 3, 6, 5)),  # the 0s copy bottom axes 1 and 3
    (_shape(0, 2, -1) + " axis: 1", lambda n: (n, 3, 2, 15)),
    (_shape(2, 15) + " axis: -3", lambda n: (n, 3, 2, 15)),  # negative axis: -1 is after the last axis
    (_shape(5, 1) + " axis: -2", lambda n: (n, 3, 6, 5, 1)),
    (_shape(-1, 6) + " axis: 0 num_axes: 2", lambda n: (n * 3 // 6, 6, 6, 5)),
    (_shape(-1), lambda n: (n * 90,)),
    (_shape() + " axis: 1 num_axes: 0", lambda n: (n, 3, 6, 5)),
]


@pytest.mark.parametrize(("param", "top"), CASES)
@pytest.mark.parametrize("batch", [2, 4])
def test_reshape_matches_caffe(param: str, top: TopShape, batch: int) -> None:
    """Converted with prototxt batch 2; batch 4 is Caffe's Reshape re-run for a new batch (dynamic batch)."""
    m = convert_text(_net((2, 3, 6, 5), param))
    x = rng(batch).standard_normal((batch, 3, 6, 5)).astype(np.float32)
    got = run(m, {"x": x})["y"]
    assert_close(got, x.reshape(top(batch)), f"Reshape {param} at batch {batch}", atol=0, rtol=0)


@pytest.mark.parametrize(
    ("param", "top"),
    [(_shape(2, 90), lambda n: (n, 90)), (_shape(2, -1, 5), lambda n: (n, 18, 5))],
)
def test_reshape_reads_the_prototxt_batch_as_the_batch(param: str, top: TopShape) -> None:
    """A leading literal equal to the prototxt's batch (2) follows the fed batch, like the other layers."""
    m = convert_text(_net((2, 3, 6, 5), param))
    x = rng(5).standard_normal((5, 3, 6, 5)).astype(np.float32)
    assert_close(run(m, {"x": x})["y"], x.reshape(top(5)), f"Reshape {param} at batch 5", atol=0, rtol=0)


def test_reshape_with_fixed_batch_keeps_caffe_literals() -> None:
    x = rng(6).standard_normal((4, 3, 6, 5)).astype(np.float32)
    got = run(convert_text(_net((2, 3, 6, 5), _shape(2, -1)), batch=4), {"x": x})["y"]
    assert_close(got, x.reshape(2, 180), "Reshape {2, -1} with --batch 4", atol=0, rtol=0)


@pytest.mark.parametrize(
    ("param", "message"),
    [
        (_shape(-1, -1), "contains multiple -1 dims"),
        (_shape(0, -2), "negative dim other than -1"),
        (_shape(0, 7, -1), "must be divisible by the product of the specified dimensions (14)"),
        (_shape(0, 7, 10), "output count must match input count"),
        (_shape(1, 0) + " axis: 3", "no axis 4 to copy"),
        (_shape(1) + " axis: 5", "reshape_param.axis 5 is out of range"),
        (_shape(1) + " axis: -6", "reshape_param.axis -6 is out of range"),
        (_shape(1) + " axis: 3 num_axes: 2", "is beyond the 4-D bottom"),
        (_shape(1) + " num_axes: -2", "num_axes -2 must be >= 0"),
    ],
)
def test_reshape_refuses_what_caffe_refuses(param: str, message: str) -> None:
    with pytest.raises(LayerError, match="layer 'reshape' \\(Reshape\\)") as err:
        convert_text(_net((2, 3, 6, 5), param))
    assert message in str(err.value)


def test_layer_zoo_reshape_matches_caffe() -> None:
    text, feeds, want = reference_subnet("layer_zoo", ["reshape"])
    got = run(convert_text(text), feeds)
    assert_close(got["reshaped"], want["reshaped"], "layer_zoo reshaped", atol=0, rtol=0)
