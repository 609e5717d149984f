"""Crop: cut the first bottom down to the second bottom's shape (Caffe's CropLayer)."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


def _offsets(layer: caffe_pb2.LayerParameter, ctx: LayerContext, ndim: int, start: int) -> list[int]:
    """One offset per cropped axis: none given is 0, one is used for every axis, else one per axis."""
    given = list(layer.crop_param.offset)
    cropped = ndim - start
    if len(given) > 1 and len(given) != cropped:
        raise ctx.error(
            f"crop_param.offset {given!r} has {len(given)} values but axes {start}..{ndim - 1} are cropped; "
            f"give one offset for all of them or exactly {cropped}"
        )
    if len(given) <= 1:
        return [given[0] if given else 0] * cropped
    return given


@register_layer("Crop", bottoms=2, tops=1)
def convert_crop(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Crop: axes from `axis` on take the second bottom's sizes, starting at `offset` (one, or one per axis)."""
    data, ref = ctx.input_shapes
    ndim = len(data)
    if len(ref) != ndim:
        raise ctx.error(
            f"bottom {layer.bottom[1]!r} (the reference shape {list(ref)}) has {len(ref)} axes but "
            f"{layer.bottom[0]!r} {list(data)} has {ndim}; both bottoms need the same number of axes"
        )
    start = ctx.axis(layer.crop_param.axis, ndim, "crop_param.axis")
    offsets = _offsets(layer, ctx, ndim, start)
    for i, off in zip(range(start, ndim), offsets):
        if data[i] - off < ref[i]:
            raise ctx.error(
                f"the crop does not fit in axis {i}: offset {off} + size {ref[i]} (of {layer.bottom[1]!r}) "
                f"exceeds {data[i]} (of {layer.bottom[0]!r} {list(data)}); lower crop_param.offset or crop a "
                "larger blob"
            )
    top = (*data[:start], *ref[start:])
    dynamic_batch = start == 0 and ctx.options.batch is None
    if top == data and not dynamic_batch:
        ctx.node("Identity", [ctx.inputs[0]], [ctx.outputs[0]])
    else:
        starts = ctx.const(np.array(offsets, dtype=np.int64), "starts")
        if dynamic_batch:
            # Every axis is cropped, the batch too: the ends come from the reference blob at run time.
            ends = ctx.node("Add", [ctx.node("Shape", [ctx.inputs[1]]), starts])
        else:
            stops = [o + ref[i] for i, o in zip(range(start, ndim), offsets)]
            ends = ctx.const(np.array(stops, dtype=np.int64), "ends")
        axes = ctx.const(np.arange(start, ndim, dtype=np.int64), "axes")
        ctx.node("Slice", [ctx.inputs[0], starts, ends, axes], [ctx.outputs[0]])
    ctx.set_output_shape(0, top, ctx.builder.dtypes.get(ctx.inputs[0], TensorProto.FLOAT))
