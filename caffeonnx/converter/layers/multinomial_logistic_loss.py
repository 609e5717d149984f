"""MultinomialLogisticLoss: Caffe's MultinomialLogisticLossLayer (the log loss of given probabilities)."""
from __future__ import annotations

import math

import numpy as np

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.layers.loss import check_same_num, float_count, int_labels, reduce_sum
from caffeonnx.converter.layers.mvn import legacy_shape
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2

LOG_THRESHOLD = 1e-20  # Caffe's kLOG_THRESHOLD (loss_layer.hpp)


@register_layer("MultinomialLogisticLoss", bottoms=2, tops=1, auto_top=True)
def convert_multinomial_logistic_loss(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """MultinomialLogisticLoss: Σ -log(max(p[i, label_i], 1e-20)) / num, p the given probabilities."""
    if ctx.options.opset < 11:  # GatherElements
        raise ctx.error(f"needs ONNX opset 11 or later (got --opset {ctx.options.opset}); use --opset 11 or higher")
    check_same_num(ctx)
    (prob, label), (p_shape, label_shape) = ctx.inputs[:2], ctx.input_shapes[:2]
    if legacy_shape(ctx, 1)[1:] != (1, 1, 1):
        raise ctx.error(f"labels {layer.bottom[1]!r} must have channels, height and width 1 (shape (N) or "
                        f"(N, 1, 1, 1)); they have shape {list(label_shape)}")
    dim = math.prod(p_shape[1:])
    rows = ctx.reshape(prob, p_shape, (p_shape[0], dim)) if len(p_shape) != 2 else prob
    labels = ctx.node("Reshape", [int_labels(ctx, label), ctx.const(np.array([-1, 1], dtype=np.int64), "shape")])
    picked = ctx.node("GatherElements", [rows, labels], axis=1)
    floor = ctx.const(np.float32(LOG_THRESHOLD), "log_threshold")
    nll = ctx.node("Neg", [ctx.node("Log", [ctx.node("Max", [picked, floor])])])
    ctx.node("Div", [reduce_sum(ctx, nll), float_count(ctx, labels)], [ctx.outputs[0]])
    ctx.set_output_shape(0, ())
