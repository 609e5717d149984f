"""Clip and Swish against numpy transcriptions of Caffe's ClipLayer / SwishLayer (atol 1e-5, rtol 1e-4),
forward through onnxruntime and the trainer, backward against Caffe's Backward_cpu."""
from __future__ import annotations

import numpy as np
import pytest

from caffeonnx.errors import LayerError
from tests.converter.layers.graph_grad import forward_backward
from tests.helpers import assert_close, convert_text, rng, run

SHAPE = (3, 4, 2, 5)


def net(layer: str, shape: tuple[int, ...] = SHAPE) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return (f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}\n'
            f'layer {{ name: "l" bottom: "x" top: "y" {layer} }}\n')


def clip_input(lo: float, hi: float) -> np.ndarray:
    """Seeded values spread around [lo, hi], some exactly on the bounds (where Caffe's gradient passes)."""
    x = rng(4).uniform(min(lo, hi) - 1, max(lo, hi) + 1, size=SHAPE).astype(np.float32)
    x.reshape(-1)[:6] = [lo, hi, lo, hi, lo, hi]
    return x


def caffe_clip(x: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """ClipLayer::Forward_cpu max(min, min(x, max)), and Backward_cpu's pass mask (min <= x <= max)."""
    lo32, hi32 = np.float32(lo), np.float32(hi)
    return np.maximum(lo32, np.minimum(x, hi32)), ((x >= lo32) & (x <= hi32)).astype(np.float32)


@pytest.mark.parametrize(("lo", "hi"), [(-0.5, 0.5), (0.0, 6.0), (-2.0, -1.0), (0.25, 0.25), (1.0, -1.0)])
@pytest.mark.parametrize("opset", [21, 9])
def test_clip_forward(lo: float, hi: float, opset: int) -> None:
    x = clip_input(lo, hi)
    out = run(convert_text(net(f"type: \"Clip\" clip_param {{ min: {lo} max: {hi} }}"), opset=opset), {"x": x})
    assert_close(out["y"], caffe_clip(x, lo, hi)[0], "y")


@pytest.mark.parametrize(("lo", "hi"), [(-0.5, 0.5), (0.0, 6.0), (1.0, -1.0)])
def test_clip_trains_with_caffes_gradient(lo: float, hi: float) -> None:
    x = clip_input(lo, hi)
    dy = rng(5).normal(size=SHAPE).astype(np.float32)
    y, grads = forward_backward(net(f"type: \"Clip\" clip_param {{ min: {lo} max: {hi} }}"), {"x": x}, "y", dy, ["x"])
    want, passes = caffe_clip(x, lo, hi)
    assert_close(y, want, "y")
    assert_close(grads["x"], dy * passes, "dx (bounds included)")


def test_clip_needs_both_bounds() -> None:
    with pytest.raises(LayerError, match=r"'l' \(Clip\): clip_param is missing required field\(s\) \['max'\]"):
        convert_text(net('type: "Clip" clip_param { min: 0 }'))


def caffe_swish(x: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """SwishLayer: y = x·sigmoid(βx) with Caffe's sigmoid 0.5·tanh(0.5z) + 0.5; dy/dx = βy + s(1 - βy)."""
    xd = x.astype(np.float64)
    s = 0.5 * np.tanh(0.5 * beta * xd) + 0.5
    y = xd * s
    return y, beta * y + s * (1 - beta * y)


@pytest.mark.parametrize("beta", [1.0, 2.5, 0.3, -1.0])
def test_swish_forward_and_gradient(beta: float) -> None:
    x = (rng(6).normal(size=SHAPE) * 4).astype(np.float32)
    layer = 'type: "Swish"' + (f" swish_param {{ beta: {beta} }}" if beta != 1 else "")
    want, slope = caffe_swish(x, beta)
    assert_close(run(convert_text(net(layer)), {"x": x})["y"], want, "y (onnxruntime)")
    dy = rng(7).normal(size=SHAPE).astype(np.float32)
    y, grads = forward_backward(net(layer), {"x": x}, "y", dy, ["x"])
    assert_close(y, want, "y (trainer)")
    assert_close(grads["x"], dy * slope, "dx")
