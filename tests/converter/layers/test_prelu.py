"""PReLU against a numpy reference of Caffe's forward (slope per channel or shared)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from caffeonnx.converter.caffe_io import Blob, CaffeWeights, parse_prototxt
from caffeonnx.converter.caffe_to_onnx import convert_net
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.converter.upgrade import upgrade_net
from caffeonnx.errors import LayerError, WeightsError
from tests.helpers import assert_close, convert_text, rng, run


def _net(shape: tuple[int, ...], prelu_param: str = "") -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return (f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}\n'
            f'layer {{ name: "pr" type: "PReLU" bottom: "x" top: "y" {prelu_param} }}')


def caffe_prelu(x: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """Caffe's Forward_cpu: channel c = (i / dim) % channels, or slope[0] when shared."""
    a = np.broadcast_to(slope.reshape(-1), (x.shape[1],)).reshape((1, -1) + (1,) * (x.ndim - 2))
    return np.maximum(x, 0) + a * np.minimum(x, 0)


@pytest.mark.parametrize("shape", [(4, 3), (2, 5, 7), (2, 3, 4, 5), (1, 2, 3, 2, 2)])
@pytest.mark.parametrize("shared", [False, True])
def test_prelu_matches_caffe(shape: tuple[int, ...], shared: bool) -> None:
    g = rng(sum(shape) + shared)
    slope = g.normal(size=() if shared else (shape[1],)).astype(np.float32)
    m = convert_text(_net(shape, f"prelu_param {{ channel_shared: {str(shared).lower()} }}"), {"pr": [slope]})
    x = g.normal(size=shape).astype(np.float32)
    assert_close(run(m, {"x": x})["y"], caffe_prelu(x, slope), "y")
    # One initializer, Caffe's blob: [C], or 0 axes when the slope is shared.
    assert [w.shape for w in m.weights.values()] == [slope.shape]


def test_prelu_is_batch_agnostic() -> None:
    g = rng(8)
    slope = g.normal(size=3).astype(np.float32)
    m = convert_text(_net((2, 3, 4)), {"pr": [slope]})
    x = g.normal(size=(7, 3, 4)).astype(np.float32)
    assert_close(run(m, {"x": x})["y"], caffe_prelu(x, slope), "y (batch 7)")


@pytest.mark.parametrize(("prelu_param", "want"), [
    ("", [0.25] * 3),
    ("prelu_param { channel_shared: true }", 0.25),
    ('prelu_param { filler { type: "constant" value: -0.5 } }', [-0.5] * 3),
])
def test_prelu_fillers(prelu_param: str, want: object) -> None:
    """Without weights the slope is Caffe's default 0.25 or the given filler."""
    assert [w.tolist() for w in convert_text(_net((2, 3, 4), prelu_param), None).weights.values()] == [want]


@pytest.mark.parametrize("shared", [False, True])
def test_legacy_4d_slope_blob_is_accepted(shared: bool) -> None:
    """Old caffemodels give the slope as num/channels/height/width (1x1x1xC or 1x1x1x1)."""
    g = rng(9 + shared)
    text = _net((2, 3, 4), f"prelu_param {{ channel_shared: {str(shared).lower()} }}")
    net = upgrade_net(parse_prototxt(text, "<test>"), "<test>")
    slope = g.normal(size=(1, 1, 1, 1 if shared else 3)).astype(np.float32)
    weights = CaffeWeights(Path("<legacy>.caffemodel"), net, {"pr": [Blob(slope, legacy_shape=True)]})
    m = convert_net(net, weights, ConvertOptions(), "<test>")
    x = g.normal(size=(2, 3, 4)).astype(np.float32)
    assert_close(run(m, {"x": x})["y"], caffe_prelu(x, slope), "y")
    assert [w.shape for w in m.weights.values()] == [() if shared else (3,)]


def test_prelu_needs_two_axes() -> None:
    with pytest.raises(LayerError, match=r"'pr' \(PReLU\): input shape \[5\] has 1 axis"):
        convert_text(_net((5,)), None)


def test_slope_count_must_match_channels() -> None:
    with pytest.raises(WeightsError, match=r"param 0 .*'pr'.*Source param shape is 4 \(4\); target param shape is 3 \(3\)"):
        convert_text(_net((2, 3, 4)), {"pr": [np.zeros(4, np.float32)]})
