"""HingeLoss and MultinomialLogisticLoss against numpy transcriptions of Caffe's Forward_cpu and
Backward_cpu (atol 1e-5, rtol 1e-4), through onnxruntime and the trainer."""
from __future__ import annotations

import numpy as np
import pytest

from caffeonnx.converter.layers.loss import effective_loss_weights
from caffeonnx.errors import LayerError
from caffeonnx.proto import caffe_pb2
from tests.converter.layers.graph_grad import forward_backward
from tests.helpers import assert_close, convert_text, rng, run


def net(loss_type: str, x_shape: tuple[int, ...], label_shape: tuple[int, ...], extra: str = "") -> str:
    def dims(s: tuple[int, ...]) -> str:
        return " ".join(f"dim: {d}" for d in s)

    return (f'layer {{ name: "in" type: "Input" top: "x" top: "label" input_param {{ shape {{ {dims(x_shape)} }} '
            f'shape {{ {dims(label_shape)} }} }} }}\n'
            f'layer {{ name: "loss" type: "{loss_type}" bottom: "x" bottom: "label" top: "loss" {extra} }}\n')


def caffe_hinge(x: np.ndarray, label: np.ndarray, norm: str) -> tuple[float, np.ndarray]:
    """HingeLossLayer: diff = x with diff[i, label_i] negated, max(0, 1 + diff); loss Σ|·| or Σ(·)² over num."""
    num = x.shape[0]
    d = x.reshape(num, -1).astype(np.float64).copy()
    sign = np.ones_like(d)
    sign[np.arange(num), label.reshape(-1).astype(np.int64)] = -1
    h = np.maximum(0, 1 + d * sign)
    if norm == "L1":
        return float(h.sum() / num), (sign * np.sign(h) / num).reshape(x.shape)  # Backward_cpu: sign, scal 1/num
    return float((h * h).sum() / num), (2 * sign * h / num).reshape(x.shape)


@pytest.mark.parametrize("norm", ["L1", "L2"])
@pytest.mark.parametrize(("x_shape", "label_shape"), [((6, 5), (6,)), ((4, 3, 2, 1), (4, 1, 1, 1))])
def test_hinge_loss(norm: str, x_shape: tuple[int, ...], label_shape: tuple[int, ...]) -> None:
    g = rng(20)
    x = g.normal(size=x_shape).astype(np.float32)
    dim = int(np.prod(x_shape[1:]))
    label = g.integers(0, dim, size=label_shape).astype(np.float32)
    extra = f"hinge_loss_param {{ norm: {norm} }}" if norm == "L2" else ""
    text = net("HingeLoss", x_shape, label_shape, extra)
    want, dx = caffe_hinge(x, label, norm)
    assert_close(run(convert_text(text), {"x": x, "label": label})["loss"], np.float32(want), "loss")
    loss, grads = forward_backward(text, {"x": x, "label": label}, "loss", 1.0, ["x"])
    assert_close(loss, np.float32(want), "loss (trainer)")
    assert_close(grads["x"], dx, "dx")


def test_hinge_loss_is_a_loss_layer() -> None:
    layer = caffe_pb2.LayerParameter(name="l", type="HingeLoss", top=["loss"])
    assert effective_loss_weights(layer) == [1.0]


def test_hinge_loss_refuses_several_labels_per_example() -> None:
    with pytest.raises(LayerError, match="one class index per example"):
        convert_text(net("HingeLoss", (4, 3), (4, 2)))


def caffe_multinomial(p: np.ndarray, label: np.ndarray) -> tuple[float, np.ndarray]:
    """MultinomialLogisticLossLayer: Σ -log(max(p[i, label_i], 1e-20)) / num; diff -1/(num·max(p, 1e-20)) at the label."""
    num = p.shape[0]
    rows = p.reshape(num, -1).astype(np.float64)
    idx = label.reshape(-1).astype(np.int64)
    picked = np.maximum(rows[np.arange(num), idx], np.float32(1e-20))
    dx = np.zeros_like(rows)
    dx[np.arange(num), idx] = -1 / (num * picked)
    return float(-np.log(picked).sum() / num), dx.reshape(p.shape)


@pytest.mark.parametrize(("x_shape", "label_shape"), [((5, 4), (5,)), ((3, 2, 2, 2), (3, 1, 1, 1))])
def test_multinomial_logistic_loss(x_shape: tuple[int, ...], label_shape: tuple[int, ...]) -> None:
    g = rng(21)
    e = np.exp(g.normal(size=(x_shape[0], int(np.prod(x_shape[1:])))))
    p = (e / e.sum(axis=1, keepdims=True)).reshape(x_shape).astype(np.float32)
    p.reshape(x_shape[0], -1)[0, :] = 0  # a zero probability: Caffe clamps it to 1e-20
    label = g.integers(0, p.size // x_shape[0], size=label_shape).astype(np.float32)
    label.reshape(-1)[0] = 1
    p.reshape(x_shape[0], -1)[0, 1] = 1e-3
    text = net("MultinomialLogisticLoss", x_shape, label_shape)
    want, dx = caffe_multinomial(p, label)
    assert_close(run(convert_text(text), {"x": p, "label": label})["loss"], np.float32(want), "loss")
    loss, grads = forward_backward(text, {"x": p, "label": label}, "loss", 1.0, ["x"])
    assert_close(loss, np.float32(want), "loss (trainer)")
    assert_close(grads["x"], dx, "dx")


def test_multinomial_clamps_a_zero_probability() -> None:
    p = np.array([[0.0, 1.0], [0.5, 0.5]], dtype=np.float32)
    out = run(convert_text(net("MultinomialLogisticLoss", (2, 2), (2,))), {"x": p, "label": np.zeros(2, np.float32)})
    assert_close(out["loss"], np.float32((-np.log(np.float32(1e-20)) - np.log(0.5)) / 2), "loss")


def test_multinomial_labels_must_be_one_per_example() -> None:
    with pytest.raises(LayerError, match="must have channels, height and width 1"):
        convert_text(net("MultinomialLogisticLoss", (4, 3), (4, 3)))


def test_multinomial_needs_opset_11() -> None:
    with pytest.raises(LayerError, match="needs ONNX opset 11 or later"):
        convert_text(net("MultinomialLogisticLoss", (4, 3), (4,)), opset=9)
