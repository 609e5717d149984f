"""Accuracy: the share of labels ranked within the top k, computed in the graph as Caffe does."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.layers.loss import (
    check_label_count,
    check_opset,
    class_view,
    float_count,
    labels_view,
    reduce_sum,
)
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@register_layer("Accuracy", bottoms=2, tops=(1, 2))
def convert_accuracy(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Accuracy: share of kept labels with at most top_k scores >= their own; top 1 is the per-class accuracy."""
    check_opset(ctx)
    p = layer.accuracy_param
    shape = ctx.input_shapes[0]
    axis = ctx.axis(p.axis, len(shape), "accuracy_param.axis")
    check_label_count(ctx, shape, axis)
    if p.top_k > shape[axis]:
        raise ctx.error(
            f"top_k must be less than or equal to the number of classes: accuracy_param.top_k is {p.top_k!r} but "
            f"bottom {layer.bottom[0]!r} has {shape[axis]} classes on axis {axis}"
        )
    scores, classes, inner = class_view(ctx, ctx.inputs[0], shape, axis)
    labels, mask = labels_view(ctx, ctx.inputs[1], inner, p.ignore_label if p.HasField("ignore_label") else None)
    truth = ctx.node("GatherElements", [scores, labels], axis=1)
    # The true class counts itself as "better", so a hit has at most top_k scores >= its own.
    better = reduce_sum(
        ctx, ctx.node("Cast", [ctx.node("GreaterOrEqual", [scores, truth])], to=TensorProto.FLOAT), axes=[1], keepdims=1
    )
    top_k = ctx.const(np.array(float(p.top_k), dtype=np.float32), "top_k")
    hit = ctx.node("LessOrEqual", [better, top_k])
    if mask is not None:
        hit = ctx.node("And", [hit, mask])
    hits = ctx.node("Cast", [hit], to=TensorProto.FLOAT)
    one = ctx.const(np.array(1.0, dtype=np.float32), "one")
    # Caffe reports 0 when every label is ignored; max(count, 1) gives the same 0 / 1.
    count = (
        float_count(ctx, labels) if mask is None else reduce_sum(ctx, ctx.node("Cast", [mask], to=TensorProto.FLOAT))
    )
    ctx.node("Div", [reduce_sum(ctx, hits), ctx.node("Max", [count, one])], [ctx.outputs[0]])
    ctx.set_output_shape(0, ())
    if len(ctx.outputs) < 2:
        return
    # Per class c: hits among the labels equal to c over how many there are (0 when none).
    flat = [-1, 1]
    class_ids = ctx.const(np.arange(classes, dtype=np.int64).reshape(1, classes), "class_ids")
    is_class = ctx.node(
        "Equal", [ctx.node("Reshape", [labels, ctx.const(np.array(flat, dtype=np.int64), "shape")]), class_ids]
    )
    if mask is not None:
        flat_mask = ctx.node("Reshape", [mask, ctx.const(np.array(flat, dtype=np.int64), "shape")])
        is_class = ctx.node("And", [is_class, flat_mask])
    members = ctx.node("Cast", [is_class], to=TensorProto.FLOAT)
    flat_hits = ctx.node("Reshape", [hits, ctx.const(np.array(flat, dtype=np.int64), "shape")])
    per_class_hits = reduce_sum(ctx, ctx.node("Mul", [members, flat_hits]), axes=[0])
    per_class_count = ctx.node("Max", [reduce_sum(ctx, members, axes=[0]), one])
    ctx.node("Div", [per_class_hits, per_class_count], [ctx.outputs[1]])
    ctx.set_output_shape(1, (classes,))
