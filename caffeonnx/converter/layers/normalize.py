"""Normalize: the SSD fork's L2 normalisation with a learned scale (NormalizeLayer of weiliu89/caffe).

Forward_cpu: norm = sqrt(Σx² + eps), eps added once inside the root, the Σ over the channels at
each spatial position (across_spatial false, SSD's conv4_3_norm) or over all of C·H·W per num
(across_spatial true, the default); top = x / norm · scale.  The scale is the layer's one param
blob: a 0-axis blob (one value) with channel_shared (the default), else one value per channel;
without a caffemodel scale_filler fills it (constant 1 when absent).  Caffe reads the bottom with
its legacy accessors, so it has 2 to 4 axes and the top has the bottom's shape.

Training: autograd differentiates these nodes exactly.  Caffe's Backward_cpu agrees with that
for a shared scale; with a per-channel scale it multiplies the whole normalisation diff by each
channel's own scale (scale_c·Σx·dy where the derivative has Σx·scale·dy), so the two differ by
the spread of the scales, and coincide while they are equal (as SSD's constant fillers start them).
"""
from __future__ import annotations

import numpy as np

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.fillers import constant_filler
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@register_layer("Normalize", bottoms=1, tops=1, fork="ssd", params=True)
def convert_normalize(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Normalize: x / sqrt(Σx² + eps) over the channels per position (or over C·H·W), times a learned scale."""
    p = layer.norm_param
    shape = ctx.input_shapes[0]
    if len(shape) < 2:
        raise ctx.error(f"Number of axes of bottom blob must be >=2.: bottom {layer.bottom[0]!r} has shape "
                        f"{list(shape)}; Normalize needs (N, C, ...)")
    if len(shape) > 4:
        raise ctx.error(f"Cannot use legacy accessors on Blobs with > 4 axes: bottom {layer.bottom[0]!r} has shape "
                        f"{list(shape)}; Normalize needs at most (N, C, H, W)")
    channels = shape[1]
    filler = p.scale_filler if p.HasField("scale_filler") else constant_filler(1.0)
    scale_shape: tuple[int, ...] = () if p.channel_shared else (channels,)
    scale = ctx.param(0, scale_shape, "scale", filler)
    trailing = len(shape) - 2
    if scale_shape and trailing:  # one value per channel, broadcast over the positions
        scale = ctx.reshape(scale, scale_shape, (channels, *(1,) * trailing))
    axes = list(range(1, len(shape))) if p.across_spatial else [1]
    squares = ctx.reduce("ReduceSumSquare", ctx.inputs[0], axes, keepdims=1)
    norm = ctx.node("Sqrt", [ctx.node("Add", [squares, ctx.const(np.float32(p.eps), "eps")])])
    ctx.node("Mul", [ctx.node("Div", [ctx.inputs[0], norm]), scale], [ctx.outputs[0]])
    ctx.set_output_shape(0, shape)
