"""MVN against a numpy transcription of Caffe's MVNLayer (atol 1e-5, rtol 1e-4): forward through
onnxruntime and the trainer, backward against MVNLayer::Backward_cpu."""
from __future__ import annotations

import numpy as np
import pytest

from caffeonnx.errors import LayerError
from tests.converter.layers.graph_grad import forward_backward
from tests.helpers import assert_close, convert_text, rng, run


def net(shape: tuple[int, ...], param: str) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return (f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}\n'
            f'layer {{ name: "mvn" type: "MVN" bottom: "x" top: "y" mvn_param {{ {param} }} }}\n')


def rows(x: np.ndarray, across: bool) -> np.ndarray:
    """The (num, dim) matrix MVNLayer works on: num = N (across channels) or N·C."""
    n, c = (*x.shape, 1, 1)[:2]
    return x.reshape(n if across else n * c, -1).astype(np.float64)


def caffe_mvn(x: np.ndarray, across: bool, variance: bool, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Forward_cpu: x - Ex, then / (sqrt(E((x - Ex)²)) + eps); returns the rows and the per-row divisor."""
    r = rows(x, across)
    y = r - r.mean(axis=1, keepdims=True)
    denom = np.ones((r.shape[0], 1))
    if variance:
        denom = np.sqrt((y * y).mean(axis=1, keepdims=True)) + np.float32(eps)
        y = y / denom
    return y, denom


def caffe_mvn_backward(y: np.ndarray, denom: np.ndarray, dy: np.ndarray, variance: bool) -> np.ndarray:
    """Backward_cpu: (dy - mean(dy) - y·mean(y·dy)) / divisor, or dy - mean(dy) without variance."""
    if not variance:
        return dy - dy.mean(axis=1, keepdims=True)
    return (dy - dy.mean(axis=1, keepdims=True) - y * (y * dy).mean(axis=1, keepdims=True)) / denom


def legacy4(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape, 1, 1, 1, 1)[:4]


CASES = [((2, 3, 4, 5), ""), ((2, 3, 4, 5), "across_channels: true"), ((2, 3, 4, 5), "normalize_variance: false"),
         ((2, 3, 4, 5), "across_channels: true normalize_variance: false"), ((2, 3, 4, 5), "eps: 0.001"),
         ((4, 6), "across_channels: true"), ((3, 2, 7), ""), ((4, 6), "")]


@pytest.mark.parametrize(("shape", "param"), CASES)
def test_mvn_forward_and_gradient(shape: tuple[int, ...], param: str) -> None:
    across, variance = "across_channels: true" in param, "normalize_variance: false" not in param
    eps = 0.001 if "eps" in param else 1e-9
    x = (rng(8).normal(size=shape) * 3 + 1).astype(np.float32)
    y, denom = caffe_mvn(x, across, variance, eps)
    want = y.reshape(legacy4(shape))  # Caffe's top is always 4-D
    assert_close(run(convert_text(net(shape, param)), {"x": x})["y"], want, "y (onnxruntime)")
    dy = rng(9).normal(size=legacy4(shape)).astype(np.float32)
    got, grads = forward_backward(net(shape, param), {"x": x}, "y", dy, ["x"])
    assert_close(got, want, "y (trainer)")
    dx = caffe_mvn_backward(y, denom, rows(dy, across), variance).reshape(shape)
    # Caffe's backward leaves out a factor (std + eps) / std of the y·mean(y·dy) term: below 1e-8 relative at
    # the default eps 1e-9; with eps 1e-3 autograd's exact derivative differs from it by up to eps / std.
    rtol = 1e-4 if eps < 1e-6 else 1e-4 + 2 * eps / float(denom.min() - eps)
    assert_close(grads["x"], dx, "dx", rtol=rtol)


def test_constant_planes_give_caffes_finite_gradient() -> None:
    """A constant (n, c) plane has variance 0: Caffe's top is 0 and its diff (dy - mean dy) / eps, never NaN."""
    x = np.full((2, 3, 2, 2), 0.75, dtype=np.float32)
    dy = rng(10).normal(size=x.shape).astype(np.float32) * np.float32(1e-9)
    got, grads = forward_backward(net(x.shape, "eps: 0.001"), {"x": x}, "y", dy, ["x"])
    assert_close(got, np.zeros_like(x), "y")
    y, denom = caffe_mvn(x, False, True, 0.001)
    assert_close(grads["x"], caffe_mvn_backward(y, denom, rows(dy, False), True).reshape(x.shape), "dx")


def test_mvn_refuses_more_than_four_axes() -> None:
    with pytest.raises(LayerError, match=r"'mvn' \(MVN\): Cannot use legacy accessors on Blobs with > 4 axes"):
        convert_text(net((2, 2, 2, 2, 2), ""))
