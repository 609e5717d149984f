"""Split: hand one bottom to several consumers (Caffe's SplitLayer)."""
from __future__ import annotations

from onnx import TensorProto

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@register_layer("Split", bottoms=1, tops=(1, None))
def convert_split(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Split: every top is a copy of the bottom (Caffe shares the data; gradients add up in backward)."""
    if not layer.top:
        raise ctx.error("Split needs at least one top blob")
    if layer.bottom[0] in layer.top:
        raise ctx.error(
            f"top {layer.bottom[0]!r} is also the bottom; Split Layer does not allow in-place computation: "
            "give the tops new names"
        )
    dtype = ctx.builder.dtypes.get(ctx.inputs[0], TensorProto.FLOAT)
    for i, out in enumerate(ctx.outputs):
        ctx.node("Identity", [ctx.inputs[0]], [out])
        ctx.set_output_shape(i, ctx.input_shapes[0], dtype)
