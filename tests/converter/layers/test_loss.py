"""Loss layers against numpy transcriptions of Caffe's Forward_cpu (atol 1e-5, rtol 1e-4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from google.protobuf import text_format
from onnx import TensorProto

from caffeonnx.converter.layers.loss import effective_loss_weights, normalization_mode
from caffeonnx.errors import LayerError
from caffeonnx.proto import caffe_pb2
from tests.helpers import assert_close, convert_text, rng, run

FLT_MIN = np.finfo(np.float32).tiny
MODES = ["FULL", "VALID", "BATCH_SIZE", "NONE"]


def net(
    loss_type: str, x_shape: tuple[int, ...], label_shape: tuple[int, ...], extra: str = "", tops: str = 'top: "loss"'
) -> str:
    """An Input layer feeding predictions `x` and labels `label` to one loss layer."""

    def dims(s: tuple[int, ...]) -> str:
        return " ".join(f"dim: {d}" for d in s)

    return f"""
layer {{ name: "in" type: "Input" top: "x" top: "label"
        input_param {{ shape {{ {dims(x_shape)} }} shape {{ {dims(label_shape)} }} }} }}
layer {{ name: "loss" type: "{loss_type}" bottom: "x" bottom: "label" {tops} {extra} }}
"""


def loss_param(mode: str | None, ignore: int | None, legacy_normalize: bool | None = None) -> str:
    """A loss_param block: `normalization`, legacy `normalize` and/or `ignore_label` (empty when none)."""
    fields = []
    if mode is not None:
        fields.append(f"normalization: {mode}")
    if legacy_normalize is not None:
        fields.append(f"normalize: {str(legacy_normalize).lower()}")
    if ignore is not None:
        fields.append(f"ignore_label: {ignore}")
    return f"loss_param {{ {' '.join(fields)} }}" if fields else ""


def caffe_mode(mode: str | None, legacy_normalize: bool | None, default: str) -> str:
    """Which NormalizationMode Caffe's LayerSetUp settles on."""
    if mode is not None:
        return mode
    if legacy_normalize is not None:
        return "VALID" if legacy_normalize else "BATCH_SIZE"
    return default


def caffe_normalizer(mode: str, outer: int, inner: int, valid: int) -> float:
    """LossLayer get_normalizer, including the max(1, n) guard."""
    n = {"FULL": outer * inner, "VALID": valid, "BATCH_SIZE": outer, "NONE": 1}[mode]
    return float(max(1, n))


# --- EuclideanLoss ---------------------------------------------------------------


def euclidean_ref(a: np.ndarray, b: np.ndarray) -> float:
    """Caffe: dot(a - b, a - b) / num / 2 over the flat arrays."""
    d = a.reshape(-1).astype(np.float64) - b.reshape(-1).astype(np.float64)
    return float(d @ d / a.shape[0] / 2)


@pytest.mark.parametrize(
    ("x_shape", "label_shape"), [((4, 6), (4, 6)), ((3, 2, 5), (3, 10)), ((2, 3, 2, 2), (2, 12, 1, 1))]
)
@pytest.mark.parametrize("fed_batch", [None, 7])
def test_euclidean_loss(x_shape: tuple[int, ...], label_shape: tuple[int, ...], fed_batch: int | None) -> None:
    g = rng(1)
    n = fed_batch or x_shape[0]
    a = g.normal(size=(n, *x_shape[1:])).astype(np.float32)
    b = g.normal(size=(n, *label_shape[1:])).astype(np.float32)
    out = run(convert_text(net("EuclideanLoss", x_shape, label_shape)), {"x": a, "label": b})
    assert_close(out["loss"], np.array(euclidean_ref(a, b), dtype=np.float32), "loss")


def test_euclidean_loss_refuses_different_dimensions() -> None:
    with pytest.raises(
        LayerError, match=r"'loss' \(EuclideanLoss\): Inputs must have the same dimension.*\[4, 6\].*\[4, 5\]"
    ):
        convert_text(net("EuclideanLoss", (4, 6), (4, 5)))


def test_loss_refuses_different_num() -> None:
    with pytest.raises(
        LayerError, match=r"same number: bottom 'x' has shape \[4, 6\], bottom 'label' has shape \[3, 8\]"
    ):
        convert_text(net("EuclideanLoss", (4, 6), (3, 8)))


# --- SigmoidCrossEntropyLoss -----------------------------------------------------


def sigmoid_ce_ref(x: np.ndarray, t: np.ndarray, mode: str, ignore: int | None) -> float:
    """Caffe's loop: skip int(t) == ignore, accumulate the stable form, divide by the normalizer."""
    xf, tf = x.reshape(-1).astype(np.float64), t.reshape(-1).astype(np.float64)
    keep = np.ones(xf.shape, bool) if ignore is None else tf.astype(np.int64) != ignore
    pos = (xf >= 0).astype(np.float64)
    per = -(xf * (tf - pos) - np.log1p(np.exp(xf - 2 * xf * pos)))
    outer = x.shape[0]
    return float(per[keep].sum() / caffe_normalizer(mode, outer, x.size // outer, int(keep.sum())))


@pytest.mark.parametrize(
    ("mode", "legacy"), [(None, None), *((m, None) for m in MODES), (None, True), (None, False), ("NONE", True)]
)
@pytest.mark.parametrize("ignore", [None, -1, 1])
def test_sigmoid_cross_entropy_loss(mode: str | None, legacy: bool | None, ignore: int | None) -> None:
    g = rng(2)
    x = (g.normal(size=(5, 3, 4)) * 4).astype(np.float32)
    t = g.uniform(size=x.shape).astype(np.float32)  # soft targets, as an autoencoder uses
    if ignore is not None:
        t[g.uniform(size=x.shape) < 0.3] = ignore
    model = convert_text(net("SigmoidCrossEntropyLoss", (5, 3, 4), (5, 12), loss_param(mode, ignore, legacy)))
    out = run(model, {"x": x, "label": t.reshape(5, 12)})
    want = sigmoid_ce_ref(x, t, caffe_mode(mode, legacy, "BATCH_SIZE"), ignore)
    assert_close(out["loss"], np.array(want, dtype=np.float32), f"loss ({mode}, normalize={legacy}, ignore={ignore})")


def test_sigmoid_cross_entropy_is_stable_for_large_logits() -> None:
    x = np.array([[90.0, -90.0, 0.0, 30.0]], dtype=np.float32)
    t = np.array([[0.0, 1.0, 0.5, 1.0]], dtype=np.float32)
    out = run(convert_text(net("SigmoidCrossEntropyLoss", (1, 4), (1, 4))), {"x": x, "label": t})
    assert np.isfinite(out["loss"]), f"loss: {out['loss']!r} is not finite for logits {x.tolist()}"
    assert_close(out["loss"], np.array(sigmoid_ce_ref(x, t, "BATCH_SIZE", None), dtype=np.float32), "loss")


def test_sigmoid_cross_entropy_batch_is_dynamic() -> None:
    model = convert_text(net("SigmoidCrossEntropyLoss", (4, 6), (4, 6)))
    g = rng(3)
    x, t = g.normal(size=(9, 6)).astype(np.float32), g.uniform(size=(9, 6)).astype(np.float32)
    assert_close(
        run(model, {"x": x, "label": t})["loss"], np.array(sigmoid_ce_ref(x, t, "BATCH_SIZE", None), np.float32), "loss"
    )


def test_sigmoid_cross_entropy_refuses_count_mismatch() -> None:
    with pytest.raises(
        LayerError, match=r"SIGMOID_CROSS_ENTROPY_LOSS layer inputs must have the same count.*\[4, 6\].*\[4, 5\]"
    ):
        convert_text(net("SigmoidCrossEntropyLoss", (4, 6), (4, 5)))


# --- SoftmaxWithLoss -------------------------------------------------------------


def softmax32(x: np.ndarray, axis: int) -> np.ndarray:
    """Caffe's float32 softmax: subtract the max, exp, divide by the sum."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def softmax_loss_ref(x: np.ndarray, label: np.ndarray, axis: int, mode: str, ignore: int | None) -> float:
    """Caffe's outer/inner loop over labels with -log(max(p, FLT_MIN))."""
    prob = softmax32(x, axis)
    outer, inner = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1 :])
    p3 = prob.reshape(outer, x.shape[axis], inner)
    lab = label.reshape(-1)
    loss, count = 0.0, 0
    for i in range(outer):
        for j in range(inner):
            v = int(lab[i * inner + j])
            if ignore is not None and v == ignore:
                continue
            loss -= math.log(max(float(p3[i, v, j]), float(FLT_MIN)))
            count += 1
    return loss / caffe_normalizer(mode, outer, inner, count)


# (prediction shape, softmax axis, label shape): labels number outer*inner and share the first axis.
SOFTMAX_SHAPES = [
    ((6, 5), 1, (6,)),
    ((3, 4, 2, 3), 1, (3, 1, 2, 3)),
    ((3, 4, 2, 3), 2, (3, 12)),
    ((2, 3, 5), -1, (2, 3)),
    ((2, 4), 0, (2, 2)),
]


@pytest.mark.parametrize(("shape", "axis", "label_shape"), SOFTMAX_SHAPES)
@pytest.mark.parametrize(("mode", "legacy"), [(None, None), *((m, None) for m in MODES), (None, True), (None, False)])
@pytest.mark.parametrize("ignore", [None, 2])
def test_softmax_with_loss(
    shape: tuple[int, ...],
    axis: int,
    label_shape: tuple[int, ...],
    mode: str | None,
    legacy: bool | None,
    ignore: int | None,
) -> None:
    g = rng(4)
    ax = axis % len(shape)
    x = (g.normal(size=shape) * 3).astype(np.float32)
    label = g.integers(0, shape[ax], size=label_shape).astype(np.float32)
    extra = f"softmax_param {{ axis: {axis} }} {loss_param(mode, ignore, legacy)}"
    out = run(convert_text(net("SoftmaxWithLoss", shape, label_shape, extra)), {"x": x, "label": label})
    want = softmax_loss_ref(x, label, ax, caffe_mode(mode, legacy, "VALID"), ignore)
    assert_close(
        out["loss"], np.array(want, dtype=np.float32), f"loss (shape {shape}, axis {axis}, {mode}, ignore={ignore})"
    )


@pytest.mark.parametrize("fed_batch", [2, 11])
def test_softmax_with_loss_prob_top_and_dynamic_batch(fed_batch: int) -> None:
    g = rng(5)
    x = g.normal(size=(fed_batch, 4, 3)).astype(np.float32)
    label = g.integers(0, 4, size=(fed_batch, 1, 3)).astype(np.float32)
    model = convert_text(
        net("SoftmaxWithLoss", (5, 4, 3), (5, 1, 3), "loss_weight: 1 loss_weight: 0", tops='top: "loss" top: "prob"')
    )
    out = run(model, {"x": x, "label": label})
    assert_close(out["prob"], softmax32(x, 1), "prob")
    assert_close(out["loss"], np.array(softmax_loss_ref(x, label, 1, "VALID", None), dtype=np.float32), "loss")


def test_softmax_with_loss_clamps_at_flt_min() -> None:
    # The true class is 200 below the winner: its float32 probability underflows to 0, Caffe reads FLT_MIN.
    x = np.array([[200.0, 0.0, 0.0]], dtype=np.float32)
    out = run(convert_text(net("SoftmaxWithLoss", (1, 3), (1,))), {"x": x, "label": np.array([1.0], np.float32)})
    assert_close(out["loss"], np.array(-np.log(FLT_MIN), dtype=np.float32), "loss")


def test_softmax_with_loss_all_ignored_is_zero_not_nan() -> None:
    x = rng(6).normal(size=(3, 4)).astype(np.float32)
    model = convert_text(net("SoftmaxWithLoss", (3, 4), (3,), loss_param(None, 7)))
    out = run(model, {"x": x, "label": np.full((3,), 7.0, np.float32)})
    assert out["loss"] == 0.0, f"loss: {out['loss']!r} for all labels ignored (Caffe: 0 / max(1, 0) = 0)"


def test_softmax_with_loss_refuses_label_count_mismatch() -> None:
    with pytest.raises(
        LayerError, match=r"Number of labels must match number of predictions.*\[4, 5, 3\].*12 labels.*\[4, 5\] \(20\)"
    ):
        convert_text(net("SoftmaxWithLoss", (4, 5, 3), (4, 5)))


def test_loss_output_is_a_scalar_named_as_caffe_top() -> None:
    model = convert_text(net("SoftmaxWithLoss", (4, 5), (4,))).to_proto()
    out = {o.name: o for o in model.graph.output}
    assert list(out) == ["loss"], f"graph outputs {list(out)}"
    t = out["loss"].type.tensor_type
    assert t.elem_type == TensorProto.FLOAT and len(t.shape.dim) == 0, f"loss: type {t} is not a float scalar"
    casts = [n for n in model.graph.node if n.op_type == "Cast" and n.input == ["label"]]
    assert [a.i for n in casts for a in n.attribute] == [TensorProto.INT64], "label must be cast to int64 once in-graph"


def test_loss_refuses_wrong_blob_counts() -> None:
    text = net("EuclideanLoss", (4, 6), (4, 6), tops='top: "loss" top: "extra"')
    with pytest.raises(LayerError, match=r"EuclideanLoss Layer produces 1 top blob\(s\) as output; it has 2"):
        convert_text(text)


def test_softmax_with_loss_prob_top_needs_explicit_loss_weights() -> None:
    # Caffe's LossLayer adds loss_weight 1 for top 0 only, then SetLossWeights aborts on 1 weight for 2 tops.
    with pytest.raises(
        LayerError,
        match=r"once per top blob: 1 weight\(s\) \[1.0\] \(loss layers weigh their first top 1 by "
        r"default\) for 2 tops \['loss', 'prob'\].*loss_weight: 1 loss_weight: 0",
    ):
        convert_text(net("SoftmaxWithLoss", (4, 5), (4,), tops='top: "loss" top: "prob"'))


@pytest.mark.parametrize(
    ("layer_text", "want"),
    [
        ('type: "SoftmaxWithLoss" top: "loss"', [1.0]),
        ('type: "EuclideanLoss" top: "loss" loss_weight: 0.25', [0.25]),
        ('type: "SoftmaxWithLoss" top: "loss" top: "prob" loss_weight: 2 loss_weight: 0', [2.0, 0.0]),
        ('type: "Accuracy" top: "acc" top: "per_class"', [0.0, 0.0]),
        ('type: "InnerProduct" top: "ip" loss_weight: 0.5', [0.5]),
    ],
)
def test_effective_loss_weights(layer_text: str, want: list[float]) -> None:
    layer = caffe_pb2.LayerParameter()
    text_format.Parse(f'name: "l" {layer_text}', layer)
    assert effective_loss_weights(layer) == want, (
        f"{layer_text}: loss weights {effective_loss_weights(layer)} != {want}"
    )


def test_softmax_with_loss_needs_opset_13() -> None:
    with pytest.raises(LayerError, match=r"opset 13 or later \(got --opset 12\)"):
        convert_text(net("SoftmaxWithLoss", (4, 5), (4,)), opset=12)


def test_legacy_normalize_only_applies_without_normalization() -> None:
    layer = caffe_pb2.LayerParameter()
    layer.loss_param.normalize = False
    assert normalization_mode(layer.loss_param, caffe_pb2.LossParameter.VALID) == caffe_pb2.LossParameter.BATCH_SIZE
    layer.loss_param.normalization = caffe_pb2.LossParameter.FULL
    assert normalization_mode(layer.loss_param, caffe_pb2.LossParameter.VALID) == caffe_pb2.LossParameter.FULL
