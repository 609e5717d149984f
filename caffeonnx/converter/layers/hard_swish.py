"""HardSwish: MobileNet v3's h-swish as the Caffe forks implement it."""
from __future__ import annotations

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@register_layer("HardSwish", bottoms=1, tops=1, fork="mobilenet")
def convert_hard_swish(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """HardSwish: y = x · relu6(x + 3) / 6."""
    x, out = ctx.inputs[0], ctx.outputs[0]
    if ctx.options.opset >= 14:
        ctx.node("HardSwish", [x], [out])
    else:  # HardSwish is opset 14: x · HardSigmoid(x) with alpha 1/6, beta 1/2 is the same function
        ctx.node("Mul", [x, ctx.node("HardSigmoid", [x], alpha=1.0 / 6.0, beta=0.5)], [out])
    ctx.set_output_shape(0, ctx.input_shapes[0])
