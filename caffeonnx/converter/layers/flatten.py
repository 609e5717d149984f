"""Flatten: merge a range of axes into one (Caffe's FlattenLayer)."""
from __future__ import annotations

import math

from onnx import TensorProto

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@register_layer("Flatten", bottoms=1, tops=1)
def convert_flatten(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Flatten: merge axes `axis`..`end_axis` (inclusive, negatives count from the end) into one."""
    p = layer.flatten_param
    shape = ctx.input_shapes[0]
    start = ctx.axis(p.axis, len(shape), "flatten_param.axis")
    end = ctx.axis(p.end_axis, len(shape), "flatten_param.end_axis")
    if end < start - 1:  # end == start - 1 is Caffe's empty range: a new axis of length 1
        raise ctx.error(
            f"flatten_param.end_axis {p.end_axis!r} (axis {end}) comes before axis {p.axis!r} (axis {start}) "
            f"of the {len(shape)}-D bottom; set end_axis at or after axis"
        )
    top = (*shape[:start], math.prod(shape[start:end + 1]), *shape[end + 1:])
    ctx.reshape(ctx.inputs[0], shape, top, ctx.outputs[0])
    ctx.set_output_shape(0, top, ctx.builder.dtypes.get(ctx.inputs[0], TensorProto.FLOAT))
