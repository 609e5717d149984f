"""InfogainLoss: Caffe's InfogainLossLayer (BVLC master: softmax inside, infogain matrix H).

loss = Σ_{kept i} Σ_l -H[label_i, l] · log(max(softmax(x)_i[l], 1e-20)) / normaliser, over the
classes on infogain_loss_param.axis, with loss_param ignore_label and normalization (VALID by
default; the legacy `normalize` is refused, as Caffe refuses it for this layer).  H comes from a
third bottom or from infogain_loss_param.source, a binaryproto BlobProto read at conversion time
(relative to the current directory, as Caffe reads it) and stored as a constant.  Top 1 is the
softmax.  Autograd differs from Caffe's backward only where a probability is below 1e-20.
"""
from __future__ import annotations

import math

import numpy as np

from caffeonnx.converter.caffe_io import read_blob_file
from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.layers.loss import (
    check_label_count,
    check_opset,
    check_same_num,
    class_view,
    label_loss,
    labels_view,
    reduce_sum,
)
from caffeonnx.converter.layers.multinomial_logistic_loss import LOG_THRESHOLD
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@register_layer("InfogainLoss", bottoms=(2, 3), tops=(1, 2), auto_top=True)
def convert_infogain_loss(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """InfogainLoss: Σ -H[label, l]·log(max(softmax(x)_l, 1e-20)) over kept labels / normaliser (VALID); top 1: prob."""
    check_opset(ctx)
    check_same_num(ctx)
    p, ip = layer.loss_param, layer.infogain_loss_param
    if p.HasField("normalize"):
        raise ctx.error('normalize is deprecated. use "normalization" (loss_param { normalization: VALID })')
    shape = ctx.input_shapes[0]
    axis = ctx.axis(ip.axis, len(shape), "infogain_loss_param.axis")
    check_label_count(ctx, shape, axis)
    classes = shape[axis]
    if len(ctx.inputs) > 2:
        h_count = math.prod(ctx.input_shapes[2])
        h = ctx.node("Reshape", [ctx.inputs[2], ctx.const(np.array([classes, classes], dtype=np.int64), "shape")])
    else:
        if not ip.HasField("source"):
            raise ctx.error("Infogain matrix source must be specified: give infogain_loss_param { source: "
                            '"H.binaryproto" } or the matrix as a third bottom')
        values = read_blob_file(ip.source, f"layer {ctx.name!r} (InfogainLoss): infogain_loss_param.source")
        values = values.ravel()
        h_count = values.size
        h = ctx.const(values.reshape(classes, classes) if h_count == classes * classes else values, "infogain")
    if h_count != classes * classes:
        raise ctx.error(f"H must be {classes}x{classes}: the infogain matrix holds {h_count} values but the "
                        f"predictions have {classes} classes on axis {axis}")
    prob = ctx.node("Softmax", [ctx.inputs[0]], ctx.outputs[1:] or None, axis=axis)
    if len(ctx.outputs) > 1:
        ctx.set_output_shape(1, shape)
    prob3, _, inner = class_view(ctx, prob, shape, axis)
    labels, mask = labels_view(ctx, ctx.inputs[1], inner, p.ignore_label if p.HasField("ignore_label") else None)
    rows = ctx.node("Gather", [h, ctx.node("Reshape", [labels, ctx.const(np.array([-1, inner], dtype=np.int64),
                                                                          "shape")])], axis=0)  # (outer, inner, C)
    rows = ctx.node("Transpose", [rows], perm=[0, 2, 1])  # (outer, C, inner), like prob3
    log_p = ctx.node("Log", [ctx.node("Max", [prob3, ctx.const(np.float32(LOG_THRESHOLD), "log_threshold")])])
    per = ctx.node("Neg", [reduce_sum(ctx, ctx.node("Mul", [rows, log_p]), [1], keepdims=1)])  # (outer, 1, inner)
    label_loss(ctx, per, labels, mask, inner, p)
