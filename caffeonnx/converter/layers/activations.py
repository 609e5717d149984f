"""Element-wise neuron layers without parameters."""
from __future__ import annotations

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


def _unary(op: str, ctx: LayerContext, **attrs: object) -> None:
    ctx.node(op, [ctx.inputs[0]], [ctx.outputs[0]], **attrs)
    ctx.set_output_shape(0, ctx.input_shapes[0])


@register_layer("Sigmoid")
def convert_sigmoid(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Sigmoid: y = 1 / (1 + exp(-x))."""
    _unary("Sigmoid", ctx)


@register_layer("TanH")
def convert_tanh(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """TanH: y = tanh(x)."""
    _unary("Tanh", ctx)


@register_layer("ReLU")
def convert_relu(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """ReLU: y = max(x, 0) + negative_slope * min(x, 0) (leaky when the slope is non-zero)."""
    slope = layer.relu_param.negative_slope
    if slope:
        _unary("LeakyRelu", ctx, alpha=slope)
    else:
        _unary("Relu", ctx)
