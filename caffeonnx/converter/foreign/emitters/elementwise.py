"""Arithmetic ops as Caffe Eltwise, Scale, Bias and Power layers.

Two computed operands of one shape: Eltwise (SUM with coefficients for Sub, PROD, MAX).
A computed operand broadcast onto the other: Caffe's two-bottom Scale/Bias over the axes
it covers.  A constant operand: Power for a single value, otherwise a Scale/Bias layer
holding the constant as its param (broadcast constants are expanded over the axes they
span).  Division is multiplication by the reciprocal (Power with power -1, or 1/c),
which can differ from ONNX's division in the last bit.
"""
from __future__ import annotations

import numpy as np

from caffeonnx.converter.foreign.caffe_layers import broadcast_span, power, relu, reshape
from caffeonnx.converter.foreign.context import NodeContext
from caffeonnx.converter.foreign.prepare import Const, Shape
from caffeonnx.converter.foreign.registry import register_op
from caffeonnx.proto import caffe_pb2

E = caffe_pb2.EltwiseParameter


def _eltwise(ctx: NodeContext, bottoms: list[str], top: str, operation: int, coeff: list[float] | None = None) -> None:
    p = ctx.layer("Eltwise", bottoms, [top]).eltwise_param
    p.operation = operation
    if coeff:
        p.coeff.extend(coeff)


def _axis_layer(ctx: NodeContext, kind: str, bottoms: list[str], top: str, axis: int, num_axes: int | None) -> object:
    """A Scale or Bias layer over axes [axis, axis + num_axes); returns the layer."""
    layer = ctx.layer(kind, bottoms, [top])
    p = layer.scale_param if kind == "Scale" else layer.bias_param
    if axis != 1:
        p.axis = axis
    if num_axes is not None and num_axes != 1:
        p.num_axes = num_axes
    return layer


def _const_operand(ctx: NodeContext, kind: str, x: str, x_shape: Shape, value: np.ndarray, source: str | None,
                   top: str) -> None:
    """x (*|+) a constant tensor: a one-bottom Scale/Bias whose param is the constant over the axes it spans."""
    span = broadcast_span(x_shape, value.shape)
    if span is None:  # the constant also broadcasts inside its span: expand it there
        padded = value.reshape((1,) * (len(x_shape) - value.ndim) + value.shape)
        lo = next(i for i, d in enumerate(padded.shape) if d != 1)
        span = (lo, tuple(x_shape[lo:]))
        value, source = np.broadcast_to(padded[(0,) * lo], span[1]), None
    axis, core = span
    layer = _axis_layer(ctx, kind, [x], top, axis, len(core))
    ctx.param(layer, value.reshape(core), kind.lower(), source)


def _with_const(ctx: NodeContext, x: str, x_shape: Shape, c: Const, const_first: bool) -> None:
    """Add/Sub/Mul/Div of a computed blob and a constant."""
    if ctx.out_shape() != x_shape:
        raise ctx.unsupported(f"the constant broadcasts the computed input from {list(x_shape)!r} to "
                              f"{list(ctx.out_shape())!r}; Caffe layers keep their input's shape")
    op, v, top = ctx.op, c.value.astype(np.float32), ctx.output()
    if v.size == 1:
        s = float(v.reshape(()))
        if op == "Add":
            power(ctx, x, top, shift=s)
        elif op == "Sub" and const_first:
            power(ctx, x, top, scale=-1.0, shift=s)
        elif op == "Sub":
            power(ctx, x, top, shift=-s)
        elif op == "Mul":
            power(ctx, x, top, scale=s)
        elif const_first:  # c / x
            power(ctx, power(ctx, x, ctx.temp("reciprocal"), power=-1.0), top, scale=s)
        else:
            power(ctx, x, top, scale=float(np.float32(1.0) / np.float32(s)))
        return
    source = c.source if c.same_order() else None
    if op == "Add":
        _const_operand(ctx, "Bias", x, x_shape, v, source, top)
    elif op == "Sub" and const_first:
        _const_operand(ctx, "Bias", power(ctx, x, ctx.temp("negated"), scale=-1.0), x_shape, v, source, top)
    elif op == "Sub":
        _const_operand(ctx, "Bias", x, x_shape, -v, None, top)
    elif op == "Mul":
        _const_operand(ctx, "Scale", x, x_shape, v, source, top)
    elif const_first:
        _const_operand(ctx, "Scale", power(ctx, x, ctx.temp("reciprocal"), power=-1.0), x_shape, v, source, top)
    else:
        _const_operand(ctx, "Scale", x, x_shape, np.float32(1.0) / v, None, top)


def _two_blobs(ctx: NodeContext) -> None:
    """Add/Sub/Mul/Div of two computed blobs: Eltwise, or a two-bottom Scale/Bias when one broadcasts."""
    a, b = ctx.blob(0), ctx.blob(1)
    sa, sb, out, op, top = ctx.shape(0), ctx.shape(1), ctx.out_shape(), ctx.op, ctx.output()
    if sa == sb:
        if op == "Div":
            b = power(ctx, b, ctx.temp("reciprocal"), power=-1.0)
        operation = E.SUM if op in ("Add", "Sub") else E.PROD
        _eltwise(ctx, [a, b], top, operation, [1.0, -1.0] if op == "Sub" else None)
        return
    if sa == out:
        big, small, small_shape, swapped = a, b, sb, False
    elif sb == out:
        big, small, small_shape, swapped = b, a, sa, True
    else:
        raise ctx.unsupported(f"both inputs ({list(sa)!r}, {list(sb)!r}) broadcast; Caffe's Scale/Bias broadcast "
                              "one blob onto another of the output's shape")
    span = broadcast_span(out, small_shape)
    if span is None or not span[1]:
        raise ctx.unsupported(f"{list(small_shape)!r} broadcasts onto {list(out)!r} in a way Caffe's Scale/Bias "
                              "cannot (they need the smaller blob to match a run of the larger one's axes)")
    axis, core = span
    if tuple(small_shape) != core:
        small = reshape(ctx, small, small_shape, core, ctx.temp("operand"))
    if op in ("Sub", "Div"):
        inverse = {"scale": -1.0} if op == "Sub" else {"power": -1.0}
        if swapped:  # a - b = (-b) + a ; a / b = (1/b) · a
            big = power(ctx, big, ctx.temp("inverse"), **inverse)
        else:  # a - b = a + (-b) ; a / b = a · (1/b)
            small = power(ctx, small, ctx.temp("inverse"), **inverse)
    _axis_layer(ctx, "Bias" if op in ("Add", "Sub") else "Scale", [big, small], top, axis, None)


@register_op("Add", "Sub", "Mul", "Div")
def emit_arithmetic(ctx: NodeContext) -> None:
    """Add/Sub/Mul/Div -> Eltwise (SUM, coeff 1 -1, PROD), two-bottom Scale/Bias, or Power/Scale/Bias for constants."""
    a, b = ctx.const(0), ctx.const(1)
    if a is None and b is None:
        _two_blobs(ctx)
    elif b is not None:
        _with_const(ctx, ctx.blob(0), ctx.shape(0), b, const_first=False)
    else:
        assert a is not None
        _with_const(ctx, ctx.blob(1), ctx.shape(1), a, const_first=True)


@register_op("Sum", "Mean", "Max", "Min")
def emit_variadic(ctx: NodeContext) -> None:
    """Sum/Mean/Max -> Eltwise SUM (coeff 1/n for Mean) / MAX; Min via negation; Max/Min with a constant via ReLU."""
    inputs = [i for i in range(len(ctx.node.input)) if ctx.has_input(i)]
    consts = [ctx.const(i) for i in inputs if ctx.const(i) is not None]
    blobs = [i for i in inputs if ctx.const(i) is None]
    out, top = ctx.out_shape(), ctx.output()
    if len(blobs) == 1 and not consts:
        ctx.alias(0, ctx.blob(blobs[0]))
        return
    if ctx.op in ("Max", "Min") and len(blobs) == 1 and len(consts) == 1 and consts[0] is not None \
            and consts[0].value.size == 1 and ctx.shape(blobs[0]) == out:
        c, x = float(consts[0].value.reshape(())), ctx.blob(blobs[0])
        if ctx.op == "Max" and c == 0.0:
            relu(ctx, x, top)
        elif ctx.op == "Max":  # c + relu(x - c)
            power(ctx, relu(ctx, power(ctx, x, ctx.temp("shift"), shift=-c), ctx.temp("relu")), top, shift=c)
        else:  # c - relu(c - x)
            power(ctx, relu(ctx, power(ctx, x, ctx.temp("flip"), scale=-1.0, shift=c), ctx.temp("relu")), top,
                  scale=-1.0, shift=c)
        return
    if consts or any(ctx.shape(i) != out for i in blobs):
        raise ctx.unsupported("the inputs are constants or broadcast; Caffe's Eltwise combines computed blobs of "
                              "one shape")
    bottoms = [ctx.blob(i) for i in blobs]
    if ctx.op == "Sum":
        _eltwise(ctx, bottoms, top, E.SUM)
    elif ctx.op == "Mean":
        _eltwise(ctx, bottoms, top, E.SUM, [1.0 / len(bottoms)] * len(bottoms))
    elif ctx.op == "Max":
        _eltwise(ctx, bottoms, top, E.MAX)
    else:  # min(a, b, ...) = -max(-a, -b, ...)
        negated = [power(ctx, x, ctx.temp(f"negated{i}"), scale=-1.0) for i, x in enumerate(bottoms)]
        biggest = ctx.temp("max")
        _eltwise(ctx, negated, biggest, E.MAX)
        power(ctx, biggest, top, scale=-1.0)


def _power_of(ctx: NodeContext, **fields: float) -> None:
    power(ctx, ctx.blob(0), ctx.output(), **fields)


@register_op("Pow")
def emit_pow(ctx: NodeContext) -> None:
    """Pow with a constant scalar exponent -> Power."""
    e = ctx.const(1)
    if e is None or e.value.size != 1 or ctx.const(0) is not None:
        raise ctx.unsupported("Caffe's Power raises a computed blob to a constant scalar exponent only")
    _power_of(ctx, power=float(e.value.reshape(())))


@register_op("Sqrt", "Reciprocal", "Neg")
def emit_power_family(ctx: NodeContext) -> None:
    """Sqrt, Reciprocal, Neg -> Power (power 0.5, power -1, scale -1)."""
    fields = {"Sqrt": {"power": 0.5}, "Reciprocal": {"power": -1.0}, "Neg": {"scale": -1.0}}[ctx.op]
    _power_of(ctx, **fields)
