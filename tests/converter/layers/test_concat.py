"""Concat against a numpy reference of Caffe's Forward_cpu and the layer_zoo Caffe fixture (exact)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from caffeonnx.errors import LayerError
from tests.helpers import assert_close, convert_text, reference_subnet, rng, run


def _inputs(shapes: list[tuple[int, ...]]) -> str:
    """One Input layer per bottom, tops x0, x1, ..."""
    return "".join(
        f'layer {{ name: "in{i}" type: "Input" top: "x{i}" input_param {{ shape {{ '
        + " ".join(f"dim: {d}" for d in s) + " } } }\n"
        for i, s in enumerate(shapes)
    )


def _concat(n: int, param: str = "") -> str:
    bottoms = " ".join(f'bottom: "x{i}"' for i in range(n))
    return f'layer {{ name: "cat" type: "Concat" {bottoms} top: "y" concat_param {{ {param} }} }}\n'


def caffe_concat(bottoms: list[np.ndarray], axis: int) -> np.ndarray:
    """Caffe's ConcatLayer::Forward_cpu: for each of the count(0, axis) outer rows, copy each bottom's block."""
    top_shape = list(bottoms[0].shape)
    top_shape[axis] = sum(b.shape[axis] for b in bottoms)
    outer, inner = math.prod(top_shape[:axis]), math.prod(top_shape[axis + 1:])
    top = np.empty(math.prod(top_shape), np.float32)
    offset = 0
    for b in bottoms:
        flat, size = b.reshape(-1), b.shape[axis] * inner
        for n in range(outer):
            dst = (n * top_shape[axis] + offset) * inner
            top[dst:dst + size] = flat[n * size:(n + 1) * size]
        offset += b.shape[axis]
    return top.reshape(top_shape)


CASES = [
    # (bottom shapes, concat_param text, canonical axis)
    ([(2, 3, 4, 5), (2, 1, 4, 5)], "", 1),
    ([(2, 3, 4, 5), (2, 2, 4, 5), (2, 4, 4, 5)], "axis: 1", 1),
    ([(2, 3, 4, 5), (3, 3, 4, 5)], "axis: 0", 0),
    ([(2, 3, 4, 5), (2, 3, 4, 2)], "axis: -1", 3),
    ([(2, 3, 2, 5), (2, 3, 6, 5)], "axis: 2", 2),
    ([(4, 7), (4, 3)], "", 1),
    ([(2, 3, 4), (1, 3, 4)], "concat_dim: 0", 0),
    ([(2, 3, 4), (2, 5, 4)], "concat_dim: 1", 1),
    ([(2, 3, 4, 5)], "", 1),
]


@pytest.mark.parametrize(("shapes", "param", "axis"), CASES)
def test_concat_matches_caffe(shapes: list[tuple[int, ...]], param: str, axis: int) -> None:
    g = rng(len(shapes) * 10 + axis)
    xs = [g.standard_normal(s).astype(np.float32) for s in shapes]
    m = convert_text(_inputs(shapes) + _concat(len(shapes), param))
    got = run(m, {f"x{i}": x for i, x in enumerate(xs)})["y"]
    assert_close(got, caffe_concat(xs, axis), f"Concat {param or 'default'} of {shapes}", atol=0, rtol=0)


@pytest.mark.parametrize(("param", "axis"), [("axis: 1", 1), ("axis: 0", 0), ("axis: -1", 3)])
def test_concat_takes_another_batch(param: str, axis: int) -> None:
    shapes = [(2, 3, 4, 5), (2, 3, 4, 5)]
    m = convert_text(_inputs(shapes) + _concat(2, param))
    g = rng(axis)
    xs = [g.standard_normal((5, 3, 4, 5)).astype(np.float32) for _ in shapes]
    got = run(m, {"x0": xs[0], "x1": xs[1]})["y"]
    assert_close(got, caffe_concat(xs, axis), f"Concat {param} at batch 5 (prototxt batch 2)", atol=0, rtol=0)


@pytest.mark.parametrize(
    ("shapes", "param", "message"),
    [
        ([(2, 3, 4), (2, 3, 5)], "axis: 1", "must have the same shape, except at concat axis 1"),
        ([(2, 3, 4), (2, 3)], "", "has 2 axes but 'x0' has 3"),
        ([(2, 3), (2, 3)], "axis: 1 concat_dim: 1", "Either axis or concat_dim"),
        ([(2, 3), (2, 3)], "concat_dim: 2", "concat_dim 2 is out of range"),
        ([(2, 3), (2, 3)], "axis: -3", "axis -3 is out of range"),
    ],
)
def test_concat_refuses_what_caffe_refuses(shapes: list[tuple[int, ...]], param: str, message: str) -> None:
    with pytest.raises(LayerError, match="layer 'cat' \\(Concat\\)") as err:
        convert_text(_inputs(shapes) + _concat(len(shapes), param))
    assert message in str(err.value)


def test_layer_zoo_concat_matches_caffe() -> None:
    text, feeds, want = reference_subnet("layer_zoo", ["concat"])
    got = run(convert_text(text), feeds)
    assert_close(got["cat"], want["cat"], "layer_zoo cat", atol=0, rtol=0)
