"""Swish: Caffe's SwishLayer, y = x · sigmoid(beta · x)."""
from __future__ import annotations

import numpy as np

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@register_layer("Swish", bottoms=1, tops=1)
def convert_swish(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Swish: y = x · sigmoid(beta · x) (swish_param.beta, default 1)."""
    x = ctx.inputs[0]
    beta = np.float32(layer.swish_param.beta)
    scaled = x if beta == 1 else ctx.node("Mul", [x, ctx.const(beta, "beta")])
    ctx.node("Mul", [x, ctx.node("Sigmoid", [scaled])], [ctx.outputs[0]])
    ctx.set_output_shape(0, ctx.input_shapes[0])
