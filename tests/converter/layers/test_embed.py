"""Embed against a numpy reference of Caffe's forward (row lookup + bias)."""
from __future__ import annotations

import numpy as np
import pytest

from caffeonnx.errors import LayerError
from tests.helpers import assert_close, convert_text, rng, run


def _net(shape: tuple[int, ...], embed_param: str) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return (f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}\n'
            f'layer {{ name: "emb" type: "Embed" bottom: "x" top: "y" embed_param {{ {embed_param} }} }}')


def caffe_embed(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Caffe's Forward_cpu: top[n, :] = W[static_cast<int>(x[n]), :] (+ b) for every element n of x."""
    index = x.reshape(-1).astype(np.int64)
    top = weight[index] + (0 if bias is None else bias)
    return top.reshape((*x.shape, weight.shape[1]))


@pytest.mark.parametrize("shape", [(6,), (3, 4), (2, 3, 5)])
@pytest.mark.parametrize("bias_term", [True, False])
def test_embed_matches_caffe(shape: tuple[int, ...], bias_term: bool) -> None:
    g = rng(len(shape) * 2 + bias_term)
    k, n = 11, 4
    blobs = [g.normal(size=(k, n)).astype(np.float32)] + ([g.normal(size=n).astype(np.float32)] if bias_term else [])
    m = convert_text(_net(shape, f"num_output: {n} input_dim: {k} bias_term: {str(bias_term).lower()}"), {"emb": blobs})
    x = g.integers(0, k, size=shape).astype(np.float32)
    x.flat[0], x.flat[-1] = 0, k - 1  # both ends of the table
    got = run(m, {"x": x})["y"]
    assert_close(got, caffe_embed(x, blobs[0], blobs[1] if bias_term else None), "y", atol=0, rtol=0)
    assert [w.shape for w in m.weights.values()] == [(k, n), (n,)][: len(blobs)]


def test_fractional_indices_truncate_like_caffe() -> None:
    """Caffe's static_cast<int> drops the fraction: 2.7 reads row 2."""
    g = rng(5)
    weight = g.normal(size=(4, 3)).astype(np.float32)
    m = convert_text(_net((2, 3), "num_output: 3 input_dim: 4 bias_term: false"), {"emb": [weight]})
    x = np.array([[0.2, 1.9, 2.7], [3.5, 0.0, 1.0]], np.float32)
    assert_close(run(m, {"x": x})["y"], weight[[[0, 1, 2], [3, 0, 1]]], "y", atol=0, rtol=0)


def test_embed_is_batch_agnostic() -> None:
    g = rng(6)
    blobs = [g.normal(size=(5, 2)).astype(np.float32), g.normal(size=2).astype(np.float32)]
    m = convert_text(_net((2, 3), "num_output: 2 input_dim: 5"), {"emb": blobs})
    x = g.integers(0, 5, size=(7, 3)).astype(np.float32)
    assert_close(run(m, {"x": x})["y"], caffe_embed(x, *blobs), "y (batch 7)")


def test_embed_fillers() -> None:
    text = _net((2,), 'num_output: 2 input_dim: 3 weight_filler { type: "constant" value: 0.5 } '
                      'bias_filler { type: "constant" value: 2 }')
    assert [w.tolist() for w in convert_text(text, None).weights.values()] == [[[0.5] * 2] * 3, [2.0] * 2]


@pytest.mark.parametrize(("param", "match"), [
    ("input_dim: 3", r"'emb' \(Embed\): embed_param.num_output is 0"),
    ("num_output: 3", r"'emb' \(Embed\): embed_param.input_dim is 0"),
])
def test_embed_needs_sizes(param: str, match: str) -> None:
    with pytest.raises(LayerError, match=match):
        convert_text(_net((2,), param), None)
