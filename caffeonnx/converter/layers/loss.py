"""Loss layers: each loss top is a scalar graph output computed with Caffe's normalisation.

A Caffe loss blob holds the unweighted loss (loss_weight only scales the gradients), so
the ONNX output is that raw value under Caffe's top name.  Label bottoms arrive as float
blobs, as in Caffe, and are cast to int64 in the graph where Caffe does static_cast<int>.
Counts that depend on the batch come from Size at run time, never from the converted shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from onnx import TensorProto

from caffeonnx.converter.context import LayerContext, Shape
from caffeonnx.converter.registry import register_layer
from caffeonnx.errors import LayerError
from caffeonnx.proto import caffe_pb2

Mode = caffe_pb2.LossParameter
Count = Callable[[], str]  # emits a float scalar count, returns its value name
FLT_MIN = float(np.finfo(np.float32).tiny)  # Caffe clamps probabilities to FLT_MIN before the log


# Caffe's LossLayer subclasses: their top 0 weighs 1 in the objective unless loss_weight says otherwise.
LOSS_LAYER_TYPES = frozenset(
    {
        "ContrastiveLoss",
        "EuclideanLoss",
        "HingeLoss",
        "InfogainLoss",
        "MultinomialLogisticLoss",
        "SigmoidCrossEntropyLoss",
        "SoftmaxWithLoss",
    }
)


def effective_loss_weights(layer: caffe_pb2.LayerParameter) -> list[float]:
    """Each top's weight in the training objective, as Caffe's Layer::SetLossWeights applies it.

    A LossLayer with no loss_weight gets 1 for its first top only, so a second top
    (SoftmaxWithLoss's prob) needs explicit weights, as in Caffe, which aborts otherwise.
    """
    weights = list(layer.loss_weight)
    if not weights and layer.type in LOSS_LAYER_TYPES:
        weights = [1.0]
    if not weights:
        return [0.0] * len(layer.top)
    if len(weights) != len(layer.top):
        hint = " (loss layers weigh their first top 1 by default)" if not layer.loss_weight else ""
        raise LayerError(
            layer.name,
            layer.type,
            f"loss_weight must be unspecified or specified once per top blob: {len(weights)} weight(s) "
            f"{weights!r}{hint} for {len(layer.top)} tops {list(layer.top)!r}; give one loss_weight per top, "
            "e.g. loss_weight: 1 loss_weight: 0",
        )
    return weights


def check_same_num(ctx: LayerContext) -> None:
    """LossLayer::Reshape: the data and label must have the same num (first axis)."""
    a, b = ctx.input_shapes[0], ctx.input_shapes[1]
    if a[:1] != b[:1]:
        raise ctx.error(
            f"The data and label should have the same number: bottom {ctx.layer.bottom[0]!r} has shape {list(a)}, "
            f"bottom {ctx.layer.bottom[1]!r} has shape {list(b)}"
        )


def check_opset(ctx: LayerContext) -> None:
    """Softmax over one axis and ReduceSum with an axes input need opset 13 or later."""
    if ctx.options.opset < 13:
        raise ctx.error(f"needs ONNX opset 13 or later (got --opset {ctx.options.opset}); use --opset 13 or higher")


def normalization_mode(loss_param: caffe_pb2.LossParameter, default: int) -> int:
    """The NormalizationMode Caffe's LayerSetUp picks: `normalization`, else legacy `normalize`, else `default`."""
    if loss_param.HasField("normalization"):
        return loss_param.normalization
    if loss_param.HasField("normalize"):
        return Mode.VALID if loss_param.normalize else Mode.BATCH_SIZE
    return default


def reduce_sum(ctx: LayerContext, x: str, axes: Sequence[int] | None = None, keepdims: int = 0) -> str:
    """ReduceSum over `axes` (all axes when None)."""
    return ctx.reduce("ReduceSum", x, axes, keepdims=keepdims)


def int_labels(ctx: LayerContext, label: str) -> str:
    """The label blob as int64 (Caffe's static_cast<int>: truncation toward zero)."""
    if ctx.builder.dtypes.get(label, TensorProto.FLOAT) == TensorProto.INT64:
        return label
    return ctx.node("Cast", [label], to=TensorProto.INT64)


def float_count(ctx: LayerContext, x: str, divisor: int = 1) -> str:
    """Size(x) / divisor as a float scalar: a count that may include the dynamic batch."""
    n = ctx.node("Size", [x])
    if divisor != 1:
        n = ctx.node("Div", [n, ctx.const(np.array(divisor, dtype=np.int64), "divisor")])
    return ctx.node("Cast", [n], to=TensorProto.FLOAT)


def count_true(ctx: LayerContext, mask: str) -> str:
    """How many entries of a boolean mask are set, as a float scalar."""
    return reduce_sum(ctx, ctx.node("Cast", [mask], to=TensorProto.FLOAT))


def valid_mask(ctx: LayerContext, labels: str, ignore_label: int) -> str:
    """Boolean mask of the labels that are not `ignore_label`."""
    same = ctx.node("Equal", [labels, ctx.const(np.array(ignore_label, dtype=np.int64), "ignore_label")])
    return ctx.node("Not", [same])


def normalized(ctx: LayerContext, total: str, mode: int, full: Count, valid: Count, batch: Count) -> None:
    """Write total / max(1, normalizer) to top 0, the normalizer chosen as Caffe's get_normalizer.

    `full`, `valid` and `batch` emit their count only when the mode asks for it.
    """
    if mode == Mode.FULL:
        normalizer = full()
    elif mode == Mode.VALID:
        normalizer = valid()
    elif mode == Mode.BATCH_SIZE:
        normalizer = batch()
    elif mode == Mode.NONE:
        ctx.node("Identity", [total], [ctx.outputs[0]])
        ctx.set_output_shape(0, ())
        return
    else:
        raise ctx.error(f"unknown loss_param.normalization {mode!r}; use FULL, VALID, BATCH_SIZE or NONE")
    # Some examples may have no valid label at all: Caffe's max(1, n) keeps the loss finite.
    normalizer = ctx.node("Max", [normalizer, ctx.const(np.array(1.0, dtype=np.float32), "one")])
    ctx.node("Div", [total, normalizer], [ctx.outputs[0]])
    ctx.set_output_shape(0, ())


def label_loss(ctx: LayerContext, per_label: str, labels: str, mask: str | None, inner: int,
               p: caffe_pb2.LossParameter, default: int = Mode.VALID) -> None:
    """Top 0 of a loss over labels: ignored labels' terms zeroed, summed, normalised (`default` when unset).

    `labels` has one entry per term (its size is FULL's count), `inner` entries per num (BATCH_SIZE's).
    """
    if mask is not None:
        per_label = ctx.node("Where", [mask, per_label, ctx.const(np.array(0.0, dtype=np.float32), "zero")])
    normalized(
        ctx,
        reduce_sum(ctx, per_label),
        normalization_mode(p, default),
        full=lambda: float_count(ctx, labels),
        valid=lambda: float_count(ctx, labels) if mask is None else count_true(ctx, mask),
        batch=lambda: float_count(ctx, labels, inner),
    )


def batch_reshape(ctx: LayerContext, x: str, dims: Sequence[int]) -> str:
    """Reshape to `dims`, where -1 stands for the one dimension that carries the batch."""
    return ctx.node("Reshape", [x, ctx.const(np.array(list(dims), dtype=np.int64), "shape")])


def like_first_bottom(ctx: LayerContext, b: str, b_shape: Shape, a_shape: Shape) -> str:
    """Bottom 1 viewed with bottom 0's shape (Caffe reads both as flat arrays of equal count)."""
    return b if b_shape == a_shape else ctx.reshape(b, b_shape, a_shape)


@register_layer("EuclideanLoss", bottoms=2, tops=1, auto_top=True)
def convert_euclidean_loss(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """EuclideanLoss: sum((a - b)²) / num / 2, num being the first axis of bottom 0."""
    check_same_num(ctx)
    (a, b), (a_shape, b_shape) = ctx.inputs[:2], ctx.input_shapes[:2]
    if math.prod(a_shape[1:]) != math.prod(b_shape[1:]):
        raise ctx.error(
            f"Inputs must have the same dimension: bottoms {list(layer.bottom)!r} have shapes {list(a_shape)} and "
            f"{list(b_shape)} (count from axis 1: {math.prod(a_shape[1:])} vs {math.prod(b_shape[1:])})"
        )
    diff = ctx.node("Sub", [a, like_first_bottom(ctx, b, b_shape, a_shape)])
    total = reduce_sum(ctx, ctx.node("Mul", [diff, diff]))
    per_num = ctx.node("Div", [total, float_count(ctx, a, math.prod(a_shape[1:]))])
    ctx.node("Mul", [per_num, ctx.const(np.array(0.5, dtype=np.float32), "half")], [ctx.outputs[0]])
    ctx.set_output_shape(0, ())


@register_layer("SigmoidCrossEntropyLoss", bottoms=2, tops=1, auto_top=True)
def convert_sigmoid_cross_entropy_loss(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """SigmoidCrossEntropyLoss: Σ max(x,0) - x·t + log(1 + e^-|x|) over kept targets / normaliser (BATCH_SIZE)."""
    check_same_num(ctx)
    (x, t), (x_shape, t_shape) = ctx.inputs[:2], ctx.input_shapes[:2]
    if math.prod(x_shape) != math.prod(t_shape):
        raise ctx.error(
            f"SIGMOID_CROSS_ENTROPY_LOSS layer inputs must have the same count: bottoms {list(layer.bottom)!r} have "
            f"shapes {list(x_shape)} and {list(t_shape)}"
        )
    t = like_first_bottom(ctx, t, t_shape, x_shape)
    # Caffe's stable form: x·(t - [x >= 0]) - log(1 + exp(x - 2x·[x >= 0])), negated.
    exp_neg_abs = ctx.node("Exp", [ctx.node("Neg", [ctx.node("Abs", [x])])])
    soft = ctx.node("Log", [ctx.node("Add", [ctx.const(np.array(1.0, dtype=np.float32), "one"), exp_neg_abs])])
    per = ctx.node("Add", [ctx.node("Sub", [ctx.node("Relu", [x]), ctx.node("Mul", [x, t])]), soft])
    p = layer.loss_param
    mask = valid_mask(ctx, int_labels(ctx, t), p.ignore_label) if p.HasField("ignore_label") else None
    label_loss(ctx, per, x, mask, math.prod(x_shape[1:]), p, Mode.BATCH_SIZE)


def class_view(ctx: LayerContext, x: str, shape: Shape, axis: int) -> tuple[str, int, int]:
    """`x` as (outer, classes, inner) around `axis`, with its class count and inner count."""
    classes, inner = shape[axis], math.prod(shape[axis + 1 :])
    dims = [1, -1, inner] if axis == 0 else [-1, classes, inner]
    return batch_reshape(ctx, x, dims), classes, inner


def check_label_count(ctx: LayerContext, shape: Shape, axis: int) -> None:
    """Caffe: outer_num * inner_num must equal the label count."""
    outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1 :])
    labels = math.prod(ctx.input_shapes[1])
    if outer * inner != labels:
        raise ctx.error(
            f"Number of labels must match number of predictions: predictions {ctx.layer.bottom[0]!r} have shape "
            f"{list(shape)} with the class axis {axis}, so {outer * inner} labels are needed, but labels "
            f"{ctx.layer.bottom[1]!r} have shape {list(ctx.input_shapes[1])} ({labels}); e.g. for (N, C, H, W) "
            "and axis 1 the label count must be N*H*W, with integer values in {0, ..., C-1}"
        )


def labels_view(ctx: LayerContext, label: str, inner: int, ignore: int | None) -> tuple[str, str | None]:
    """Int labels as (outer, 1, inner) safe to gather with (ignored ones read class 0), and the valid mask."""
    labels = batch_reshape(ctx, int_labels(ctx, label), [-1, 1, inner])
    if ignore is None:
        return labels, None
    mask = valid_mask(ctx, labels, ignore)
    safe = ctx.node("Where", [mask, labels, ctx.const(np.array(0, dtype=np.int64), "class0")])
    return safe, mask


@register_layer("SoftmaxWithLoss", bottoms=2, tops=(1, 2), auto_top=True)
def convert_softmax_with_loss(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """SoftmaxWithLoss: Σ -log(max(softmax(x)[label], FLT_MIN)) over kept labels / normaliser (VALID); top 1: prob."""
    check_opset(ctx)
    check_same_num(ctx)
    shape = ctx.input_shapes[0]
    axis = ctx.axis(layer.softmax_param.axis, len(shape), "softmax_param.axis")
    check_label_count(ctx, shape, axis)
    prob = ctx.node("Softmax", [ctx.inputs[0]], ctx.outputs[1:] or None, axis=axis)
    if len(ctx.outputs) > 1:
        ctx.set_output_shape(1, shape)
    prob3, _, inner = class_view(ctx, prob, shape, axis)
    p = layer.loss_param
    labels, mask = labels_view(ctx, ctx.inputs[1], inner, p.ignore_label if p.HasField("ignore_label") else None)
    picked = ctx.node("GatherElements", [prob3, labels], axis=1)
    floor = ctx.const(np.array(FLT_MIN, dtype=np.float32), "flt_min")
    nll = ctx.node("Neg", [ctx.node("Log", [ctx.node("Max", [picked, floor])])])
    label_loss(ctx, nll, labels, mask, inner, p)
