"""Permute: reorder the axes of a blob (PermuteLayer of the SSD Caffe fork)."""
from __future__ import annotations

from onnx import TensorProto

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@register_layer("Permute", bottoms=1, tops=1, fork="ssd")
def convert_permute(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Permute: top axis i is bottom axis order[i]; axes not listed follow in their original order."""
    shape = ctx.input_shapes[0]
    ndim = len(shape)
    order = list(layer.permute_param.order)
    for o in order:
        if o >= ndim:
            raise ctx.error(
                f"permute_param.order {order!r} names axis {o} but the bottom {list(shape)} has {ndim} axes; "
                f"order should be less than the input dimension ({ndim})"
            )
    if len(set(order)) != len(order):
        raise ctx.error(f"permute_param.order {order!r} has duplicate axes; list each axis at most once")
    perm = order + [i for i in range(ndim) if i not in order]
    if perm == list(range(ndim)):
        ctx.node("Identity", [ctx.inputs[0]], [ctx.outputs[0]])
    else:
        ctx.node("Transpose", [ctx.inputs[0]], [ctx.outputs[0]], perm=perm)
    ctx.set_output_shape(0, [shape[i] for i in perm], ctx.builder.dtypes.get(ctx.inputs[0], TensorProto.FLOAT))
