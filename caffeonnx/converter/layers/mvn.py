"""MVN: Caffe's MVNLayer, mean (and variance) normalisation per (num, channel) or per num.

Caffe reads the bottom with its legacy (num, channels, height, width) accessors, so the
bottom has at most 4 axes and the top is always 4-D (a (N, C) bottom gives (N, C, 1, 1)).
The variance is E((x - Ex)²) and eps is added to its square root, as MVNLayer::Forward_cpu does.
"""
from __future__ import annotations

import numpy as np

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.layers.loss import FLT_MIN
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


def legacy_shape(ctx: LayerContext, index: int) -> tuple[int, int, int, int]:
    """Bottom `index` as Caffe's legacy (num, channels, height, width): missing axes read 1, > 4 axes refused."""
    shape = ctx.input_shapes[index]
    if len(shape) > 4:
        raise ctx.error(f"Cannot use legacy accessors on Blobs with > 4 axes: bottom {ctx.layer.bottom[index]!r} has "
                        f"shape {list(shape)}; {ctx.type} needs at most (N, C, H, W)")
    n, c, h, w = (*shape, 1, 1, 1, 1)[:4]
    return n, c, h, w


@register_layer("MVN", bottoms=1, tops=1)
def convert_mvn(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """MVN: y = (x - mean) / (std + eps) over H·W per (n, c), or over C·H·W per n with across_channels."""
    p = layer.mvn_param
    shape = ctx.input_shapes[0]
    n, c, h, w = legacy_shape(ctx, 0)
    view = (n, c * h * w) if p.across_channels else (n, c, h * w)
    x = ctx.reshape(ctx.inputs[0], shape, view) if tuple(shape) != view else ctx.inputs[0]
    last = len(view) - 1
    mean = ctx.reduce("ReduceMean", x, [last], keepdims=1)
    y = ctx.node("Sub", [x, mean])
    if p.normalize_variance:
        var = ctx.reduce("ReduceMean", ctx.node("Mul", [y, y]), [last], keepdims=1)
        # sqrt(max(var, FLT_MIN)): the same value, and Caffe's finite gradient where a plane is constant
        # (a plain sqrt's derivative is infinite at 0, which autograd turns into NaN).
        std = ctx.node("Sqrt", [ctx.node("Max", [var, ctx.const(np.float32(FLT_MIN), "flt_min")])])
        denom = ctx.node("Add", [std, ctx.const(np.float32(p.eps), "eps")])
        y = ctx.node("Div", [y, denom])
    top = (n, c, h, w)
    ctx.reshape(y, view, top, ctx.outputs[0])
    ctx.set_output_shape(0, top)
