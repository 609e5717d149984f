"""Axpy: SENet's fused squeeze-excite scale and residual sum."""
from __future__ import annotations

import numpy as np

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@register_layer("Axpy", bottoms=3, tops=1, fork="senet")
def convert_axpy(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Axpy: top = a·x + y, a (N x C, or N x C x 1 x 1) scaling each channel of x; y has x's shape."""
    a_shape, x_shape, y_shape = ctx.input_shapes
    if not 2 <= len(x_shape) <= 4:
        raise ctx.error(f"x (bottom 1) is {list(x_shape)}; Axpy takes x of 2 to 4 axes (N, C, ...)")
    if len(a_shape) < 2 or tuple(a_shape[:2]) != tuple(x_shape[:2]) or any(d != 1 for d in a_shape[2:]):
        raise ctx.error(f"the scale a (bottom 0) is {list(a_shape)} but x is {list(x_shape)}; a must be N x C or "
                        f"N x C x 1 x 1 with x's N and C ({list(x_shape[:2])}), one factor per channel")
    if tuple(y_shape) != tuple(x_shape):
        raise ctx.error(f"y (bottom 2) is {list(y_shape)} but x (bottom 1) is {list(x_shape)}; they must match")
    a, x, y = ctx.inputs
    per_channel = (*x_shape[:2], *(1,) * (len(x_shape) - 2))
    if tuple(a_shape) != per_channel:
        a = ctx.node("Reshape", [a, ctx.const(np.array([0, 0, *per_channel[2:]], dtype=np.int64), "shape")])
    ctx.node("Add", [ctx.node("Mul", [a, x]), y], [ctx.outputs[0]])
    ctx.set_output_shape(0, x_shape)
