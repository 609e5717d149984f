"""Slice against a numpy reference of Caffe's Forward_cpu and the layer_zoo Caffe fixture (exact)."""
from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest

from caffeonnx.errors import LayerError
from tests.helpers import assert_close, convert_text, reference_subnet, rng, run


def _net(shape: tuple[int, ...], tops: int, param: str) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    top_list = " ".join(f'top: "y{i}"' for i in range(tops))
    return (
        f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}\n'
        f'layer {{ name: "slice" type: "Slice" bottom: "x" {top_list} slice_param {{ {param} }} }}\n'
    )


def caffe_slice(x: np.ndarray, axis: int, points: list[int], tops: int) -> list[np.ndarray]:
    """Caffe's SliceLayer::Forward_cpu: each top copies its run of the axis from every count(0, axis) outer row."""
    dim = x.shape[axis]
    bounds = [0, *points, dim] if points else [dim // tops * i for i in range(tops + 1)]
    outer, inner = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1:])
    flat = x.reshape(-1)
    out = []
    for lo, hi in pairwise(bounds):
        shape = list(x.shape)
        shape[axis] = hi - lo
        top = np.empty(math.prod(shape), np.float32)
        size = (hi - lo) * inner
        for n in range(outer):
            src = (n * dim + lo) * inner
            top[n * size:(n + 1) * size] = flat[src:src + size]
        out.append(top.reshape(shape))
    return out


CASES = [
    # (bottom shape, tops, slice_param text, canonical axis, slice points)
    ((2, 6, 3, 4), 3, "slice_point: 2 slice_point: 3", 1, [2, 3]),
    ((2, 6, 3, 4), 3, "", 1, []),
    ((2, 6, 3, 4), 2, "axis: 2 slice_point: 1", 2, [1]),
    ((2, 6, 3, 4), 2, "axis: -1", 3, []),
    ((4, 6, 3, 4), 3, "axis: 0 slice_point: 1 slice_point: 3", 0, [1, 3]),
    ((4, 6, 3, 4), 2, "axis: 0", 0, []),
    ((2, 6, 3, 4), 2, "slice_dim: 1 slice_point: 5", 1, [5]),
    ((4, 6), 2, "slice_dim: 0", 0, []),
    ((2, 6, 3, 4), 1, "", 1, []),
]


@pytest.mark.parametrize(("shape", "tops", "param", "axis", "points"), CASES)
def test_slice_matches_caffe(shape: tuple[int, ...], tops: int, param: str, axis: int, points: list[int]) -> None:
    x = rng(tops * 10 + axis).standard_normal(shape).astype(np.float32)
    got = run(convert_text(_net(shape, tops, param)), {"x": x})
    for i, want in enumerate(caffe_slice(x, axis, points, tops)):
        assert_close(got[f"y{i}"], want, f"Slice {param or 'default'} of {shape}: top y{i}", atol=0, rtol=0)


@pytest.mark.parametrize(
    ("tops", "param", "axis", "points"),
    [
        (3, "slice_point: 1 slice_point: 4", 1, [1, 4]),
        (2, "axis: 0 slice_point: 1", 0, [1]),
        (2, "axis: 0", 0, []),
    ],
)
def test_slice_takes_another_batch(tops: int, param: str, axis: int, points: list[int]) -> None:
    """Converted at the prototxt's batch 2, run at batch 6: Caffe's Reshape at batch 6 is the reference."""
    m = convert_text(_net((2, 6, 3, 4), tops, param))
    x = rng(axis).standard_normal((6, 6, 3, 4)).astype(np.float32)
    got = run(m, {"x": x})
    for i, want in enumerate(caffe_slice(x, axis, points, tops)):
        assert_close(got[f"y{i}"], want, f"Slice {param} at batch 6: top y{i}", atol=0, rtol=0)


@pytest.mark.parametrize("opset", [11, 13])
def test_slice_in_older_opsets(opset: int) -> None:
    x = rng(opset).standard_normal((2, 6, 3)).astype(np.float32)
    got = run(convert_text(_net((2, 6, 3), 2, "slice_point: 4"), opset=opset), {"x": x})
    for i, want in enumerate(caffe_slice(x, 1, [4], 2)):
        assert_close(got[f"y{i}"], want, f"Slice at opset {opset}: top y{i}", atol=0, rtol=0)


@pytest.mark.parametrize(
    ("tops", "param", "options", "message"),
    [
        (3, "slice_point: 2", {}, "1 slice_point value(s) [2] for 3 tops"),
        (3, "slice_point: 3 slice_point: 2", {}, "must be strictly increasing"),
        (2, "slice_point: 7", {}, "at most the axis length 6"),
        (4, "", {}, "Number of top blobs (4) should evenly divide input slice axis (6)"),
        (2, "axis: 1 slice_dim: 1", {}, "Either axis or slice_dim"),
        (2, "slice_dim: 3", {}, "slice_dim 3 is out of range"),
        (2, "axis: 0", {"opset": 17}, "needs opset >= 18"),
    ],
)
def test_slice_refuses_what_it_cannot_do(tops: int, param: str, options: dict, message: str) -> None:
    with pytest.raises(LayerError, match="layer 'slice' \\(Slice\\)") as err:
        convert_text(_net((2, 6, 3), tops, param), **options)
    assert message in str(err.value)


def test_slice_fixed_batch_splits_batch_evenly_at_any_opset() -> None:
    x = rng(7).standard_normal((4, 6, 3)).astype(np.float32)
    got = run(convert_text(_net((2, 6, 3), 2, "axis: 0"), opset=17, batch=4), {"x": x})
    for i, want in enumerate(caffe_slice(x, 0, [], 2)):
        assert_close(got[f"y{i}"], want, f"Slice axis 0 with --batch 4: top y{i}", atol=0, rtol=0)


def test_layer_zoo_slice_matches_caffe() -> None:
    text, feeds, want = reference_subnet("layer_zoo", ["slice"])
    got = run(convert_text(text), feeds)
    for top in ("s1", "s2", "s3"):
        assert_close(got[top], want[top], f"layer_zoo {top}", atol=0, rtol=0)
