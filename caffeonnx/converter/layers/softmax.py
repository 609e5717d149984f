"""Softmax over one axis."""
from __future__ import annotations

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@register_layer("Softmax", bottoms=1, tops=1)
def convert_softmax(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Softmax: y = exp(x) / Σ exp(x) along `axis` alone (default 1), every other axis independent."""
    shape = ctx.input_shapes[0]
    axis = ctx.axis(layer.softmax_param.axis, len(shape), "softmax_param.axis")
    if ctx.options.opset < 13 and axis != len(shape) - 1:
        # Before opset 13 ONNX Softmax normalises over all axes from `axis` on, not over `axis` alone.
        raise ctx.error(
            f"softmax over axis {axis} of a {len(shape)}-D blob needs opset >= 13 (got --opset {ctx.options.opset}); "
            "convert with --opset 13 or later"
        )
    ctx.node("Softmax", [ctx.inputs[0]], [ctx.outputs[0]], axis=axis)
    ctx.set_output_shape(0, shape)
