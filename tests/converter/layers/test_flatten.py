"""Flatten: Caffe's top shares the bottom's memory, so the reference is the same values in a new shape (exact)."""
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
        f'layer {{ name: "flat" type: "Flatten" bottom: "x" top: "y" flatten_param {{ {param} }} }}\n'
    )


# (flatten_param text, top shape for a bottom of shape (n, 3, 4, 5)), from FlattenLayer::Reshape
CASES = [
    ("", lambda n: (n, 60)),
    ("axis: 1 end_axis: -1", lambda n: (n, 60)),
    ("axis: 2", lambda n: (n, 3, 20)),
    ("axis: 1 end_axis: 2", lambda n: (n, 12, 5)),
    ("axis: -3 end_axis: -2", lambda n: (n, 12, 5)),
    ("axis: 0", lambda n: (n * 60,)),
    ("axis: 0 end_axis: 1", lambda n: (n * 3, 4, 5)),
    ("axis: 3", lambda n: (n, 3, 4, 5)),
    ("axis: 2 end_axis: 1", lambda n: (n, 3, 1, 4, 5)),  # empty range: Caffe inserts an axis of 1
]


@pytest.mark.parametrize(("param", "top"), CASES)
@pytest.mark.parametrize("batch", [2, 5])
def test_flatten_matches_caffe(param: str, top: TopShape, batch: int) -> None:
    """Converted with prototxt batch 2; batch 5 checks the graph keeps the batch dynamic."""
    m = convert_text(_net((2, 3, 4, 5), param))
    x = rng(batch).standard_normal((batch, 3, 4, 5)).astype(np.float32)
    got = run(m, {"x": x})["y"]
    assert_close(got, x.reshape(top(batch)), f"Flatten {param or 'default'} at batch {batch}", atol=0, rtol=0)


def test_flatten_with_fixed_batch() -> None:
    x = rng(3).standard_normal((3, 3, 4)).astype(np.float32)
    got = run(convert_text(_net((2, 3, 4), "axis: 0"), batch=3), {"x": x})["y"]
    assert_close(got, x.reshape(36), "Flatten axis 0 with --batch 3", atol=0, rtol=0)


@pytest.mark.parametrize(
    ("param", "message"),
    [
        ("axis: 4", "flatten_param.axis 4 is out of range for a 4-D input"),
        ("end_axis: -5", "flatten_param.end_axis -5 is out of range"),
        ("axis: 3 end_axis: 1", "end_axis 1 (axis 1) comes before axis 3"),
    ],
)
def test_flatten_refuses_bad_axes(param: str, message: str) -> None:
    with pytest.raises(LayerError, match="layer 'flat' \\(Flatten\\)") as err:
        convert_text(_net((2, 3, 4, 5), param))
    assert message in str(err.value)


def test_layer_zoo_flatten_matches_caffe() -> None:
    text, feeds, want = reference_subnet("layer_zoo", ["flat"])
    got = run(convert_text(text), feeds)
    assert_close(got["flat"], want["flat"], "layer_zoo flat", atol=0, rtol=0)
