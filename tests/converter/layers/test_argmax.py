"""ArgMax against a direct numpy port of Caffe's forward: (value, index) pairs sorted descending, so
equal values come highest index first.

Inputs are small integers (many ties) or normal noise; nets declare batch 4 and are fed batch 5
(batch-agnostic, including an ArgMax across the batch axis). Indices and values are exact (atol 0).
"""
from __future__ import annotations

import numpy as np
import pytest

from caffeonnx.errors import LayerError
from tests.helpers import assert_close, convert_text, rng, run


def _caffe_top_k(v: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Caffe's partial_sort with std::greater on (value, index) pairs: the first k (values, indices)."""
    pairs = sorted(((float(x), j) for j, x in enumerate(v)), reverse=True)[:k]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs], dtype=np.float64)


def caffe_argmax(x: np.ndarray, k: int, out_max_val: bool, axis: int | None) -> np.ndarray:
    """Caffe's ArgMax top for bottom `x`."""
    if axis is None:
        n = x.shape[0]
        flat = x.reshape(n, -1)
        shape = [1] * max(x.ndim, 3)
        shape[0], shape[1], shape[2] = n, 2 if out_max_val else 1, k
        top = np.zeros((n, 2 if out_max_val else 1, k))
        for i in range(n):
            values, index = _caffe_top_k(flat[i], k)
            top[i, 0] = index
            if out_max_val:
                top[i, 1] = values
        return top.reshape(shape)
    moved = np.moveaxis(x, axis, -1)
    top = np.zeros((*moved.shape[:-1], k))
    for idx in np.ndindex(*moved.shape[:-1]):
        values, index = _caffe_top_k(moved[idx], k)
        top[idx] = values if out_max_val else index
    return np.moveaxis(top, -1, axis)


def _net(shape: tuple[int, ...], params: str) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return (
        f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}\n'
        f'layer {{ name: "am" type: "ArgMax" bottom: "x" top: "y" argmax_param {{ {params} }} }}\n'
    )


def _input(shape: tuple[int, ...], ties: bool, seed: int) -> np.ndarray:
    g = rng(seed)
    if ties:
        return g.integers(0, 3, shape).astype(np.float32)
    return g.standard_normal(shape).astype(np.float32)


SHAPES = [(4, 7), (4, 3, 5), (4, 2, 3, 4)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("out_max_val", [False, True], ids=["index", "index_value"])
@pytest.mark.parametrize("ties", [False, True], ids=["normal", "ties"])
def test_flattened_per_item(shape: tuple[int, ...], top_k: int, out_max_val: bool, ties: bool) -> None:
    x = _input((5, *shape[1:]), ties, seed=top_k + len(shape))
    params = f"top_k: {top_k} out_max_val: {str(out_max_val).lower()}"
    got = run(convert_text(_net(shape, params)), {"x": x})["y"]
    want = caffe_argmax(x, top_k, out_max_val, None)
    assert_close(got, want, f"argmax {shape} {params} y", atol=0, rtol=0)


@pytest.mark.parametrize(("shape", "axis"), [((4, 3, 5), 1), ((4, 3, 5), 2), ((4, 3, 5), -1), ((4, 2, 3, 4), 2),
                                             ((4, 2, 3, 4), 0)])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("out_max_val", [False, True], ids=["index", "value"])
@pytest.mark.parametrize("ties", [False, True], ids=["normal", "ties"])
def test_along_axis(shape: tuple[int, ...], axis: int, top_k: int, out_max_val: bool, ties: bool) -> None:
    x = _input((5, *shape[1:]), ties, seed=top_k + axis)
    params = f"top_k: {top_k} out_max_val: {str(out_max_val).lower()} axis: {axis}"
    got = run(convert_text(_net(shape, params)), {"x": x})["y"]
    want = caffe_argmax(x, top_k, out_max_val, axis)
    assert_close(got, want, f"argmax {shape} {params} y", atol=0, rtol=0)


def test_one_dimensional_bottom() -> None:
    """A (N,) bottom gives Caffe's (N, 1, 1) top."""
    x = rng(2).standard_normal(5).astype(np.float32)
    got = run(convert_text(_net((4,), "")), {"x": x})["y"]
    assert_close(got, np.zeros((5, 1, 1)), "argmax (N,) y", atol=0, rtol=0)


def test_ties_come_highest_index_first() -> None:
    x = np.array([[1, 3, 3, 2, 3, 0]], dtype=np.float32)
    got = run(convert_text(_net((1, 6), "top_k: 4 out_max_val: true")), {"x": x})["y"]
    assert got.tolist() == [[[4, 2, 1, 3], [3, 3, 3, 2]]]


@pytest.mark.parametrize(
    ("shape", "params", "message"),
    [
        ((2, 3, 4), "top_k: 13", "argmax_param.top_k 13 exceeds the 12 values per item"),
        ((2, 3, 4), "top_k: 4 axis: 1", "argmax_param.top_k 4 exceeds the size 3 of axis 1"),
        ((2, 3, 4), "top_k: 0", "argmax_param.top_k must be at least 1, got 0"),
        ((2, 3, 4), "axis: 3", "argmax_param.axis 3 is out of range for a 3-D input"),
    ],
)
def test_invalid_argmax_is_a_layer_error(shape: tuple[int, ...], params: str, message: str) -> None:
    with pytest.raises(LayerError, match=r"layer 'am' \(ArgMax\): " + message):
        convert_text(_net(shape, params))


def test_reference_port_agrees_with_numpy_argmax_without_ties() -> None:
    """The numpy port itself: on tie-free data its top-1 index is np.argmax."""
    x = rng(9).standard_normal((6, 10)).astype(np.float32)
    assert np.array_equal(caffe_argmax(x, 1, False, None)[:, 0, 0], x.argmax(1))
