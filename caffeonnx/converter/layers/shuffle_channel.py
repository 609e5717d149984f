"""ShuffleChannel: ShuffleNet's channel shuffle between grouped convolutions."""
from __future__ import annotations

import math

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@register_layer("ShuffleChannel", bottoms=1, tops=1, fork="shufflenet")
def convert_shuffle_channel(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """ShuffleChannel: the C channels as a group × C/group grid, transposed: top channel j·group + i is bottom i·C/group + j."""
    shape = ctx.input_shapes[0]
    group = layer.shuffle_channel_param.group
    if len(shape) < 2:
        raise ctx.error(f"the bottom {list(shape)} has no channel axis; ShuffleChannel needs at least 2 axes (N, C, ...)")
    if group == 0:
        raise ctx.error("shuffle_channel_param.group is 0; group must be greater than 0")
    channels = shape[1]
    if channels % group:
        raise ctx.error(f"shuffle_channel_param.group {group!r} does not divide the bottom's {channels} channels "
                        "(Wrong group size); use a group that divides the channel count")
    x, out = ctx.inputs[0], ctx.outputs[0]
    if group in (1, channels):  # a 1 × C or C × 1 grid reads the same transposed
        ctx.node("Identity", [x], [out])
    else:
        grid = (shape[0], group, channels // group, math.prod(shape[2:]))
        moved = ctx.node("Transpose", [ctx.reshape(x, shape, grid)], perm=[0, 2, 1, 3])
        ctx.reshape(moved, (grid[0], grid[2], grid[1], grid[3]), shape, out)
    ctx.set_output_shape(0, shape)
