"""HingeLoss: Caffe's HingeLossLayer (one-vs-all hinge, L1 or L2 norm)."""
from __future__ import annotations

import math

import numpy as np

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.layers.loss import check_same_num, float_count, int_labels, reduce_sum
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2

H = caffe_pb2.HingeLossParameter


@register_layer("HingeLoss", bottoms=2, tops=1, auto_top=True)
def convert_hinge_loss(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """HingeLoss: Σ max(0, 1 - δ(label = k)·x_k + δ(label ≠ k)·x_k) over num×classes / num (L1), or squared (L2)."""
    check_same_num(ctx)
    (x, label), (x_shape, label_shape) = ctx.inputs[:2], ctx.input_shapes[:2]
    norm = layer.hinge_loss_param.norm
    if norm not in (H.L1, H.L2):
        raise ctx.error(f"Unknown Norm {norm!r}; use hinge_loss_param {{ norm: L1 }} or L2")
    if math.prod(label_shape[1:]) != 1:
        raise ctx.error(f"labels {layer.bottom[1]!r} must hold one class index per example, shape (N) or "
                        f"(N, 1, 1, 1); they have shape {list(label_shape)}")
    dim = math.prod(x_shape[1:])
    scores = ctx.reshape(x, x_shape, (x_shape[0], dim)) if len(x_shape) != 2 else x
    labels = ctx.node("Reshape", [int_labels(ctx, label), ctx.const(np.array([-1, 1], dtype=np.int64), "shape")])
    is_label = ctx.node("Equal", [labels, ctx.const(np.arange(dim, dtype=np.int64).reshape(1, dim), "classes")])
    signed = ctx.node("Where", [is_label, ctx.node("Neg", [scores]), scores])  # Caffe: diff[label] *= -1
    hinge = ctx.node("Relu", [ctx.node("Add", [signed, ctx.const(np.float32(1), "one")])])
    if norm == H.L2:
        hinge = ctx.node("Mul", [hinge, hinge])
    total = reduce_sum(ctx, hinge)
    ctx.node("Div", [total, float_count(ctx, scores, dim)], [ctx.outputs[0]])
    ctx.set_output_shape(0, ())
