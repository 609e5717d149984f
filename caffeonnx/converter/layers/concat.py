"""Concat: join bottoms along one axis (Caffe's ConcatLayer)."""
from __future__ import annotations

from onnx import TensorProto

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@register_layer("Concat", bottoms=(1, None), tops=1)
def convert_concat(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Concat: stack the bottoms along `axis` (legacy `concat_dim`); other dims must match."""
    p = layer.concat_param
    if p.HasField("axis") and p.HasField("concat_dim"):
        raise ctx.error(
            f"concat_param sets both axis ({p.axis!r}) and concat_dim ({p.concat_dim!r}); "
            "Either axis or concat_dim should be specified; not both. Keep only axis"
        )
    first = ctx.input_shapes[0]
    ndim = len(first)
    if p.HasField("concat_dim"):
        if p.concat_dim >= ndim:
            raise ctx.error(
                f"concat_dim {p.concat_dim!r} is out of range for a {ndim}-D bottom (0 <= concat_dim < {ndim})"
            )
        axis = p.concat_dim
    else:
        axis = ctx.axis(p.axis, ndim)
    for name, shape in zip(layer.bottom[1:], ctx.input_shapes[1:]):
        if len(shape) != ndim:
            raise ctx.error(
                f"bottom {name!r} has {len(shape)} axes but {layer.bottom[0]!r} has {ndim}; "
                "All inputs must have the same #axes"
            )
        if any(a != b for j, (a, b) in enumerate(zip(first, shape)) if j != axis):
            raise ctx.error(
                f"bottom {name!r} has shape {list(shape)} but {layer.bottom[0]!r} has {list(first)}; All inputs "
                f"must have the same shape, except at concat axis {axis}"
            )
    dtype = ctx.builder.dtypes.get(ctx.inputs[0], TensorProto.FLOAT)
    if len(ctx.inputs) == 1:
        ctx.node("Identity", ctx.inputs, [ctx.outputs[0]])
    else:
        ctx.node("Concat", ctx.inputs, [ctx.outputs[0]], axis=axis)
    top = list(first)
    top[axis] = sum(s[axis] for s in ctx.input_shapes)
    ctx.set_output_shape(0, top, dtype)
