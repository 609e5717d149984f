"""PReLU: the leaky ReLU whose negative slope is learned per channel (or shared)."""
from __future__ import annotations

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.fillers import constant_filler
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@register_layer("PReLU", bottoms=1, tops=1, params=True)
def convert_prelu(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """PReLU: y = max(x, 0) + a·min(x, 0), a learned per channel (axis 1) or one scalar if channel_shared."""
    p = layer.prelu_param
    shape = ctx.input_shapes[0]
    if len(shape) < 2:
        raise ctx.error(f"input shape {list(shape)!r} has {len(shape)} axis; PReLU needs at least 2 (N, C, ...)")
    filler = p.filler if p.HasField("filler") else constant_filler(0.25)
    # Caffe stores a shared slope as a 0-axis blob (one value), a per-channel one as [C].
    slope_shape = () if p.channel_shared else (shape[1],)
    slope = ctx.param(0, slope_shape, "slope", filler)
    trailing = len(shape) - 2
    if slope_shape and trailing:
        slope = ctx.reshape(slope, slope_shape, (*slope_shape, *(1,) * trailing))
    ctx.node("PRelu", [ctx.inputs[0], slope], [ctx.outputs[0]])
    ctx.set_output_shape(0, shape)
