"""Tile: repeat a blob along one axis (Caffe's TileLayer)."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@register_layer("Tile", bottoms=1, tops=1)
def convert_tile(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Tile: the block of axes from `axis` on is written `tiles` times in a row (axis grows tiles-fold)."""
    p = layer.tile_param
    shape = ctx.input_shapes[0]
    axis = ctx.axis(p.axis, len(shape), "tile_param.axis")
    if not p.HasField("tiles"):
        raise ctx.error("tile_param.tiles is not set; Number of tiles must be specified")
    if p.tiles <= 0:
        raise ctx.error(f"tile_param.tiles {p.tiles!r} must be positive")
    repeats = np.ones(len(shape), dtype=np.int64)
    repeats[axis] = p.tiles
    ctx.node("Tile", [ctx.inputs[0], ctx.const(repeats, "repeats")], [ctx.outputs[0]])
    top = list(shape)
    top[axis] *= p.tiles
    ctx.set_output_shape(0, top, ctx.builder.dtypes.get(ctx.inputs[0], TensorProto.FLOAT))
