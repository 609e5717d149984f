"""Pointwise activations as Caffe neuron layers; Clip and the hard sigmoids from ReLU and Power.

Stock Caffe 1.0 has no Clip layer: min(max(x, lo), hi) is written exactly as
hi - relu((hi - lo) - relu(x - lo)) with ReLU and Power layers (ReLU6 is the case
lo = 0, hi = 6).  With extensions enabled a single layer is written instead: the
MobileNet forks' ReLU6 for Clip(0, 6), Caffe master's Clip for other bounds, and the
forks' HardSigmoid / HardSwish layers for those ops, so MobileNet v2/v3 exports read as
the forks' own deploy nets do.
"""
from __future__ import annotations

import math

import numpy as np

from caffeonnx.converter.foreign.caffe_layers import power, relu, reshape
from caffeonnx.converter.foreign.context import NodeContext
from caffeonnx.converter.foreign.registry import register_op
from caffeonnx.proto import caffe_pb2

_SIMPLE = {"Relu": "ReLU", "Sigmoid": "Sigmoid", "Tanh": "TanH", "Abs": "AbsVal", "Exp": "Exp", "Log": "Log",
           "Softplus": "BNLL"}
_FLT_MAX = float(np.finfo(np.float32).max)


@register_op(*_SIMPLE)
def emit_simple(ctx: NodeContext) -> None:
    """Relu, Sigmoid, Tanh, Abs, Exp, Log, Softplus -> ReLU, Sigmoid, TanH, AbsVal, Exp, Log, BNLL."""
    ctx.layer(_SIMPLE[ctx.op], [ctx.blob(0)], [ctx.output()])


@register_op("LeakyRelu")
def emit_leaky_relu(ctx: NodeContext) -> None:
    """LeakyRelu -> ReLU with negative_slope = alpha."""
    layer = ctx.layer("ReLU", [ctx.blob(0)], [ctx.output()])
    layer.relu_param.negative_slope = float(ctx.attr("alpha", 0.01))


@register_op("Elu", "Selu")
def emit_elu(ctx: NodeContext) -> None:
    """Elu -> ELU (alpha); Selu -> ELU then Power (scale gamma)."""
    selu = ctx.op == "Selu"
    alpha = float(ctx.attr("alpha", 1.67326319217681884765625 if selu else 1.0))
    top = ctx.temp("elu") if selu else ctx.output()
    ctx.layer("ELU", [ctx.blob(0)], [top]).elu_param.alpha = alpha
    if selu:
        power(ctx, top, ctx.output(), scale=float(ctx.attr("gamma", 1.05070102214813232421875)))


@register_op("PRelu")
def emit_prelu(ctx: NodeContext) -> None:
    """PRelu with one slope per channel (or one for all) -> PReLU."""
    slope = ctx.const(1)
    if slope is None:
        raise ctx.unsupported("the slope is computed; Caffe's PReLU learns a constant slope")
    shape = ctx.shape(0)
    v = slope.value
    padded = (1,) * (len(shape) - v.ndim) + v.shape
    layer = ctx.layer("PReLU", [ctx.blob(0)], [ctx.output()])
    if v.size == 1:
        layer.prelu_param.channel_shared = True
        ctx.param(layer, v.reshape(()), "prelu", slope.source if slope.same_order() else None)
    elif len(shape) >= 2 and len(padded) == len(shape) and padded[1] == shape[1] and v.size == shape[1]:
        ctx.param(layer, v.reshape(-1), "prelu", slope.source if slope.same_order() else None)
    else:
        raise ctx.unsupported(f"slope of shape {list(v.shape)!r} on input {list(shape)!r} is not one per channel; "
                              "Caffe's PReLU has one slope per channel (axis 1)")


def _clip(ctx: NodeContext, bottom: str, lo: float, hi: float, top: str) -> None:
    """min(max(x, lo), hi) with ReLU + Power (or a Clip layer with extensions)."""
    if ctx.options.extensions:
        p = ctx.layer("Clip", [bottom], [top]).clip_param
        p.min, p.max = max(lo, -_FLT_MAX), min(hi, _FLT_MAX)
        return
    if lo == -math.inf:  # hi - relu(hi - x)
        inner = relu(ctx, power(ctx, bottom, ctx.temp("flip"), scale=-1.0, shift=hi), ctx.temp("relu"))
        power(ctx, inner, top, scale=-1.0, shift=hi)
        return
    shifted = bottom if lo == 0 else power(ctx, bottom, ctx.temp("shift"), shift=-lo)
    if hi == math.inf:  # lo + relu(x - lo)
        if lo == 0:
            relu(ctx, shifted, top)
        else:
            power(ctx, relu(ctx, shifted, ctx.temp("relu")), top, shift=lo)
        return
    low = relu(ctx, shifted, ctx.temp("relu_low"))
    high = relu(ctx, power(ctx, low, ctx.temp("flip"), scale=-1.0, shift=hi - lo), ctx.temp("relu_high"))
    power(ctx, high, top, scale=-1.0, shift=hi)


def _bound(ctx: NodeContext, index: int, attr: str, default: float) -> float:
    """A Clip bound: input `index` (opset 11+) or attribute `attr`; infinite when absent."""
    if ctx.opset < 11:
        value = float(ctx.attr(attr, default))
    elif not ctx.has_input(index):
        return default
    else:
        c = ctx.const(index)
        if c is None:
            raise ctx.unsupported(f"the {attr} bound is computed; Caffe needs constant bounds")
        value = float(c.value.reshape(()))
    return default if abs(value) >= _FLT_MAX else value


@register_op("Clip")
def emit_clip(ctx: NodeContext) -> None:
    """Clip -> ReLU (0, inf) or ReLU + Power (ReLU6 and other bounds); ReLU6 (0, 6) or Clip with extensions."""
    lo, hi = _bound(ctx, 1, "min", -math.inf), _bound(ctx, 2, "max", math.inf)
    if lo > hi:
        raise ctx.error(f"min {lo!r} is above max {hi!r}")
    if lo == -math.inf and hi == math.inf:
        ctx.alias(0, ctx.blob(0))
        return
    if ctx.options.extensions and (lo, hi) == (0.0, 6.0):  # the forks' ReLU6 defaults: min(max(x, 0), 6)
        ctx.layer("ReLU6", [ctx.blob(0)], [ctx.output()])
        return
    _clip(ctx, ctx.blob(0), lo, hi, ctx.output())


@register_op("HardSigmoid", "HardSwish")
def emit_hard_sigmoid(ctx: NodeContext) -> None:
    """HardSigmoid -> Power + clip(0, 1); HardSwish -> that times x (Eltwise PROD); the forks' layers with extensions."""
    swish = ctx.op == "HardSwish"
    alpha = 1.0 / 6.0 if swish else float(ctx.attr("alpha", 0.2))
    beta = 0.5 if swish else float(ctx.attr("beta", 0.5))
    if ctx.options.extensions:
        # ONNX HardSwish, x·max(0, min(1, x/6 + 1/2)), is the forks' x·relu6(x + 3)/6 (no params)
        layer = ctx.layer(ctx.op, [ctx.blob(0)], [ctx.output()])
        if not swish:  # inisis/caffe's spelling of the field, which caffeonnx also reads
            layer.hardsigmoid_param.alpha, layer.hardsigmoid_param.beta = alpha, beta
        return
    lin = power(ctx, ctx.blob(0), ctx.temp("linear"), scale=alpha, shift=beta)
    gate = ctx.temp("gate") if swish else ctx.output()
    _clip(ctx, lin, 0.0, 1.0, gate)
    if swish:
        product = ctx.layer("Eltwise", [ctx.blob(0), gate], [ctx.output()])
        product.eltwise_param.operation = caffe_pb2.EltwiseParameter.PROD


@register_op("Softmax")
def emit_softmax(ctx: NodeContext) -> None:
    """Softmax -> Softmax on one axis (opset < 13 flattens the trailing axes first, via Reshape)."""
    shape = ctx.shape(0)
    axis = int(ctx.attr("axis", -1 if ctx.opset >= 13 else 1)) % len(shape)
    if ctx.opset >= 13 or all(d == 1 for d in shape[axis + 1:]):
        ctx.layer("Softmax", [ctx.blob(0)], [ctx.output()]).softmax_param.axis = axis
        return
    flat = (*shape[:axis], int(np.prod(shape[axis:])))
    x = reshape(ctx, ctx.blob(0), shape, flat, ctx.temp("flat"))
    soft = ctx.temp("softmax")
    ctx.layer("Softmax", [x], [soft]).softmax_param.axis = axis
    reshape(ctx, soft, flat, shape, ctx.output())
