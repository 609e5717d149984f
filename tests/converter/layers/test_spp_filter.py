"""SPP and Filter against numpy transcriptions of Caffe's SPPLayer / FilterLayer (atol 1e-5, rtol 1e-4)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from caffeonnx.errors import LayerError
from tests.converter.layers.caffe_ref_spatial import caffe_pool
from tests.converter.layers.graph_grad import forward_backward
from tests.helpers import assert_close, convert_text, rng, run


def spp_net(shape: tuple[int, ...], param: str) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return (f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}\n'
            f'layer {{ name: "spp" type: "SPP" bottom: "x" top: "y" spp_param {{ {param} }} }}\n')


def caffe_spp(x: np.ndarray, height: int, method: str) -> np.ndarray:
    """SPPLayer: per level l, 2^l bins: kernel ceil(H / 2^l), stride kernel, pad (kernel·2^l - H + 1) / 2."""
    levels = []
    for level in range(height):
        bins = 2**level
        kernel = tuple(math.ceil(n / bins) for n in x.shape[2:])
        pad = tuple((k * bins - n + 1) // 2 for k, n in zip(kernel, x.shape[2:]))
        pooled, _ = caffe_pool(x, method, kernel, kernel, pad)
        levels.append(pooled)
    if height == 1:
        return levels[0]
    return np.concatenate([p.reshape(p.shape[0], -1) for p in levels], axis=1)


@pytest.mark.parametrize(("shape", "height", "method"), [((2, 3, 13, 13), 3, "MAX"), ((2, 2, 7, 9), 2, "AVE"),
                                                         ((1, 4, 6, 5), 1, "MAX"), ((3, 2, 16, 11), 3, "AVE"),
                                                         ((2, 3, 10, 12), 2, "MAX")])
def test_spp(shape: tuple[int, ...], height: int, method: str) -> None:
    x = rng(15).normal(size=shape).astype(np.float32)
    converted = convert_text(spp_net(shape, f"pyramid_height: {height} pool: {method}"))
    want = caffe_spp(x, height, method)
    assert converted.shapes["y"] == want.shape
    assert_close(run(converted, {"x": x})["y"], want, "y")


def test_spp_refuses_what_caffes_pooling_refuses() -> None:
    """A 5-row input at level 2: kernel 2, pad 2 — Caffe's PoolingLayer CHECKs pad < kernel."""
    with pytest.raises(LayerError, match=r"'spp' \(SPP\): pyramid level 2 .*pad \[2, 2\] must be smaller than the "
                                         r"kernel \[2, 2\]"):
        convert_text(spp_net((1, 1, 5, 5), "pyramid_height: 3"))


def test_spp_needs_a_level() -> None:
    with pytest.raises(LayerError, match="pyramid_height is 0"):
        convert_text(spp_net((1, 1, 4, 4), "pool: MAX"))


FILTER = """
layer { name: "in" type: "Input" top: "a" top: "b" top: "sel"
  input_param { shape { dim: 6 dim: 3 dim: 2 } shape { dim: 6 dim: 4 } shape { dim: 6 dim: 1 } } }
layer { name: "f" type: "Filter" bottom: "a" bottom: "b" bottom: "sel" top: "fa" top: "fb" }
"""


@pytest.mark.parametrize("selector", [[1, 0, 0, 2.5, 0, -1], [0] * 6, [1] * 6, [0, 0, 0, 0, 0, 0.5]])
def test_filter_forward_and_gradient(selector: list[float]) -> None:
    g = rng(16)
    feeds = {"a": g.normal(size=(6, 3, 2)).astype(np.float32), "b": g.normal(size=(6, 4)).astype(np.float32),
             "sel": np.array(selector, dtype=np.float32).reshape(6, 1)}
    keep = np.array(selector) != 0
    out = run(convert_text(FILTER), feeds)
    assert_close(out["fa"], feeds["a"][keep], "fa")
    assert_close(out["fb"], feeds["b"][keep], "fb")
    dy = g.normal(size=(int(keep.sum()), 3, 2)).astype(np.float32)
    fa, grads = forward_backward(FILTER, feeds, "fa", dy, ["a"])
    assert_close(fa, feeds["a"][keep], "fa (trainer)")
    dx = np.zeros_like(feeds["a"])
    dx[keep] = dy  # Backward_cpu copies the kept rows' diffs back and zeroes the others
    assert_close(grads["a"], dx, "da")


def test_filter_needs_one_top_per_filtered_bottom() -> None:
    with pytest.raises(LayerError, match=r"Top.size\(\) should be equal to bottom.size\(\) - 1"):
        convert_text(FILTER.replace(' top: "fb"', ""))


def test_filter_selector_must_be_one_per_example() -> None:
    with pytest.raises(LayerError, match="Selector blob dimensions must be singletons"):
        convert_text(FILTER.replace("shape { dim: 6 dim: 1 }", "shape { dim: 6 dim: 2 }"))


def test_filter_needs_opset_11() -> None:
    with pytest.raises(LayerError, match="needs ONNX opset 11 or later"):
        convert_text(FILTER, opset=9)
