"""Scale and Bias: multiply / add a blob that spans axes [axis, axis + num_axes) of the input.

The operand is a learned blob (one bottom) or the second bottom.  Caffe lines it up
with the input from `axis` on; ONNX broadcasting lines up trailing axes, so the
operand is reshaped to its own shape followed by ones (the batch is never baked in).
"""
from __future__ import annotations

from caffeonnx.converter.context import LayerContext, Shape
from caffeonnx.converter.fillers import constant_filler
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


def _learned_shape(ctx: LayerContext, x_shape: Shape, axis: int, num_axes: int) -> Shape:
    """Caffe's learned operand shape: x_shape[axis:axis+num_axes], num_axes -1 meaning to the end."""
    axis = ctx.axis(axis, len(x_shape))
    if num_axes < -1:
        raise ctx.error(f"num_axes {num_axes!r} is invalid; use a value >= 0, or -1 to extend to the last axis")
    if num_axes == -1:
        return x_shape[axis:]
    if axis + num_axes > len(x_shape):
        raise ctx.error(
            f"num_axes {num_axes!r} from axis {axis} extends past the input's {len(x_shape)} axes "
            f"(input shape {list(x_shape)!r}); lower num_axes or axis"
        )
    return x_shape[axis : axis + num_axes]


def _operand_axis(ctx: LayerContext, x_shape: Shape, axis: int, operand_shape: Shape, what: str) -> int:
    """The input axis where the operand starts, after Caffe's shape checks (0 for a scalar)."""
    if not operand_shape:
        return 0
    axis = ctx.axis(axis, len(x_shape))
    if tuple(x_shape[axis : axis + len(operand_shape)]) != tuple(operand_shape):
        raise ctx.error(
            f"{what} shape {list(operand_shape)!r} does not match input shape {list(x_shape)!r} from axis {axis}; "
            f"it must equal input shape[{axis}:{axis + len(operand_shape)}]"
        )
    return axis


def _aligned(ctx: LayerContext, value: str, operand_shape: Shape, x_rank: int, axis: int) -> str:
    """`value` reshaped to operand_shape + trailing ones so it broadcasts from `axis`."""
    trailing = x_rank - axis - len(operand_shape)
    if not operand_shape or trailing == 0:
        return value
    return ctx.reshape(value, operand_shape, (*operand_shape, *(1,) * trailing))


# With a second bottom as the operand, a Scale still learns its bias_term blob.
@register_layer("Scale", bottoms=(1, 2), tops=1,
                params=lambda layer: len(layer.bottom) == 1 or layer.scale_param.bias_term)
def convert_scale(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Scale: y = x ⊙ s (+ b) with s learned or the second bottom, spanning axes from `axis` on."""
    p = layer.scale_param
    x_shape = ctx.input_shapes[0]
    if len(ctx.inputs) > 1:
        operand_shape = ctx.input_shapes[1]
        scale = ctx.inputs[1]
    else:
        operand_shape = _learned_shape(ctx, x_shape, p.axis, p.num_axes)
        filler = p.filler if p.HasField("filler") else constant_filler(1.0)  # identity by default
        scale = ctx.param(0, operand_shape, "scale", filler)
    axis = _operand_axis(ctx, x_shape, p.axis, operand_shape, "scale")
    scaled_out = ctx.outputs[0] if not p.bias_term else None
    scaled = ctx.node("Mul", [ctx.inputs[0], _aligned(ctx, scale, operand_shape, len(x_shape), axis)],
                      [scaled_out] if scaled_out else None)
    if p.bias_term:
        # Caffe's inner Bias layer: same axes as the scale, filler bias_filler (default 0).
        bias = ctx.param(ctx.params_declared, operand_shape, "bias", p.bias_filler)
        ctx.node("Add", [scaled, _aligned(ctx, bias, operand_shape, len(x_shape), axis)], [ctx.outputs[0]])
    ctx.set_output_shape(0, x_shape)


@register_layer("Bias", bottoms=(1, 2), tops=1, params=lambda layer: len(layer.bottom) == 1)
def convert_bias(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Bias: y = x + b with b learned or the second bottom, spanning axes from `axis` on."""
    p = layer.bias_param
    x_shape = ctx.input_shapes[0]
    if len(ctx.inputs) > 1:
        operand_shape = ctx.input_shapes[1]
        bias = ctx.inputs[1]
    else:
        operand_shape = _learned_shape(ctx, x_shape, p.axis, p.num_axes)
        bias = ctx.param(0, operand_shape, "bias", p.filler)
    axis = _operand_axis(ctx, x_shape, p.axis, operand_shape, "bias")
    ctx.node("Add", [ctx.inputs[0], _aligned(ctx, bias, operand_shape, len(x_shape), axis)], [ctx.outputs[0]])
    ctx.set_output_shape(0, x_shape)
