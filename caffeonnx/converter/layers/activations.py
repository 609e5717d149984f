"""Element-wise neuron layers without parameters."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, numpy_helper

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


def _unary(op: str, ctx: LayerContext, **attrs: object) -> None:
    ctx.node(op, [ctx.inputs[0]], [ctx.outputs[0]], **attrs)
    ctx.set_output_shape(0, ctx.input_shapes[0])


@register_layer("Sigmoid", bottoms=1, tops=1)
def convert_sigmoid(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Sigmoid: y = 1 / (1 + exp(-x))."""
    _unary("Sigmoid", ctx)


@register_layer("TanH", bottoms=1, tops=1)
def convert_tanh(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """TanH: y = tanh(x)."""
    _unary("Tanh", ctx)


@register_layer("ReLU", bottoms=1, tops=1)
def convert_relu(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """ReLU: y = max(x, 0) + negative_slope * min(x, 0) (leaky when the slope is non-zero)."""
    slope = layer.relu_param.negative_slope
    if slope:
        _unary("LeakyRelu", ctx, alpha=slope)
    else:
        _unary("Relu", ctx)


@register_layer("AbsVal", bottoms=1, tops=1)
def convert_absval(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """AbsVal: y = |x|."""
    _unary("Abs", ctx)


@register_layer("BNLL", bottoms=1, tops=1)
def convert_bnll(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """BNLL: y = log(1 + exp(x)), evaluated without overflow (ONNX Softplus)."""
    _unary("Softplus", ctx)


@register_layer("ELU", bottoms=1, tops=1)
def convert_elu(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """ELU: y = x for x > 0, else alpha * (exp(x) - 1)."""
    _unary("Elu", ctx, alpha=layer.elu_param.alpha)


@register_layer("Threshold", bottoms=1, tops=1)
def convert_threshold(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Threshold: y = 1 where x > threshold, else 0."""
    t = ctx.const(np.array(layer.threshold_param.threshold, dtype=np.float32), "threshold")
    above = ctx.node("Greater", [ctx.inputs[0], t])
    ctx.node("Cast", [above], [ctx.outputs[0]], to=TensorProto.FLOAT)
    ctx.set_output_shape(0, ctx.input_shapes[0])


Step = tuple[str, np.float32 | None, str]  # (ONNX op, scalar second operand or None, constant name hint)


def _chain(ctx: LayerContext, steps: list[Step]) -> None:
    """Apply `steps` to the bottom in order, the last one writing the top (Identity when there are none)."""
    x = ctx.inputs[0]
    if not steps:
        steps = [("Identity", None, "")]
    for k, (op, operand, hint) in enumerate(steps):
        inputs = [x] if operand is None else [x, ctx.const(np.array(operand, dtype=np.float32), hint)]
        x = ctx.node(op, inputs, [ctx.outputs[0]] if k == len(steps) - 1 else None)
    ctx.set_output_shape(0, ctx.input_shapes[0])


def _scale_shift(scale: float, shift: float) -> list[Step]:
    """x * scale + shift as steps, leaving out the trivial ones (Caffe skips them too)."""
    steps: list[Step] = []
    if scale != 1:
        steps.append(("Mul", np.float32(scale), "scale"))
    if shift != 0:
        steps.append(("Add", np.float32(shift), "shift"))
    return steps


def _log_base(base: float, ctx: LayerContext, what: str) -> np.float32:
    """Caffe's log(base) in float32, base -1 standing for e; bases Caffe refuses are errors."""
    if base == -1:
        return np.float32(1)
    if not base > 0:
        raise ctx.error(f"{what}.base must be strictly positive or -1 (meaning e), got {base!r}")
    return np.float32(np.log(np.float32(base)))


@register_layer("Exp", bottoms=1, tops=1)
def convert_exp(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Exp: y = base^(shift + scale * x), base -1 meaning e."""
    p = layer.exp_param
    inner = np.float32(_log_base(p.base, ctx, "exp_param") * np.float32(p.scale))
    if p.shift == 0:
        outer = np.float32(1)
    elif p.base == -1:
        outer = np.float32(np.exp(np.float32(p.shift)))
    else:
        outer = np.float32(np.power(np.float32(p.base), np.float32(p.shift)))
    steps: list[Step] = [("Mul", inner, "inner_scale")] if inner != 1 else []
    steps.append(("Exp", None, ""))
    if outer != 1:
        steps.append(("Mul", outer, "outer_scale"))
    _chain(ctx, steps)


@register_layer("Log", bottoms=1, tops=1)
def convert_log(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Log: y = log_base(shift + scale * x), base -1 meaning e."""
    p = layer.log_param
    log_base = _log_base(p.base, ctx, "log_param")
    if log_base == 0:
        raise ctx.error(f"log_param.base {p.base!r} has log(base) = 0; use another positive base, or -1 for e")
    base_scale = np.float32(np.float32(1) / log_base)
    steps = [*_scale_shift(p.scale, p.shift), ("Log", None, "")]
    if base_scale != 1:
        steps.append(("Mul", base_scale, "base_scale"))
    _chain(ctx, steps)


@register_layer("Power", bottoms=1, tops=1)
def convert_power(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Power: y = (shift + scale * x)^power."""
    p = layer.power_param
    if p.power * p.scale == 0:
        # Caffe ignores the input here: every element is 1 (power 0) or shift^power.
        value = np.float32(1) if p.power == 0 else np.float32(np.power(np.float32(p.shift), np.float32(p.power)))
        fill = numpy_helper.from_array(np.array([value], dtype=np.float32), "value")
        ctx.node("ConstantOfShape", [ctx.node("Shape", [ctx.inputs[0]])], [ctx.outputs[0]], value=fill)
        ctx.set_output_shape(0, ctx.input_shapes[0])
        return
    steps = _scale_shift(p.scale, p.shift)
    if p.power != 1:
        steps.append(("Pow", np.float32(p.power), "power"))
    _chain(ctx, steps)
