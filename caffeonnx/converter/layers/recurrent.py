"""LSTM and RNN: BVLC Caffe's RecurrentLayer family, unrolled over the net's fixed number of timesteps.

Caffe runs these layers as an internal net unrolled over T = bottom[0].shape(0) timesteps
(RecurrentLayer::LayerSetUp builds it once, Reshape refuses another T), built from
InnerProduct, Scale, Eltwise, Slice, Concat and LSTMUnit/TanH layers.  The ONNX graph is the
same unrolled net, node for node: ONNX's LSTM/RNN ops have no per-step reset by `cont`, order
the LSTM gates i, o, f, c where Caffe has i, f, o, g, and Scan/Loop would put the recurrence in
a subgraph the trainer cannot differentiate; MatMul/Add/Mul/Sigmoid/Tanh train with autograd
and give Caffe's gradient.  T is fixed by the converted shape: the time axis is cut by a Split
into T pieces of 1, which refuses a sequence of another length as Caffe does; the N streams
(axis 1) stay free.

Bottoms: x (T, N, ...) (the InnerProduct works from axis 2), cont (T, N), an optional static
input (N, ...) added to every step, and with `expose_hidden` the initial states (1, N,
num_output): h_0 (RNN) or h_0, c_0 (LSTM), in that order after the static input.  Tops: h
(LSTM) or o (RNN), (T, N, num_output); with `expose_hidden` also the final states h_T (and
c_T).  Params, in Caffe's blob order:
  LSTM: W_xc (4H, D), b_c (4H), [W_xc_static (4H, D_static)], W_hc (4H, H)
  RNN:  W_xh (H, D), b_h (H), [W_xh_static (H, D_static)], W_hh (H, H), W_ho (H, H), b_o (H)

Where the graph cannot be Caffe:
- Without expose_hidden, Caffe copies the final state of the previous forward pass into h_0
  (and c_0) before each pass (state carried across batches); an ONNX graph holds no state, so
  every pass starts from zero state.  That is Caffe's first pass, and any pass whose first
  step has cont = 0 for every stream (each sequence starts inside the batch).
- Caffe passes no gradient to cont, to the exposed h_0/c_0 bottoms (they share data only) or
  from the exposed h_T/c_T tops back into the recurrence; autograd does.  This matters only
  when a loss reaches h_T/c_T or h_0/c_0 are computed by learned layers.
- LSTMUnit's backward uses f·(1 − f), with f = cont·σ(f'), as the forget gate's derivative:
  autograd's cont·σ·(1 − σ) is the same for binary cont (Caffe's documented use) and differs
  for fractional cont.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@dataclass
class _Inputs:
    """The checked bottoms of a recurrent layer."""

    steps: int  # T
    streams: int  # N
    x: str  # (T, N, D)
    conts: list[str]  # cont_t as (1, N, 1), one per step
    static: str | None  # x_static as (N, D_static)
    static_width: int
    states: list[str]  # exposed initial states (1, N, H)


def _time_major(ctx: LayerContext, layer: caffe_pb2.LayerParameter, bottoms: list[int]) -> None:
    """Declare axis 1 (N) the batch of these bottoms where they are graph inputs.

    Axis 0 is the fixed T of x and cont (1 for exposed states): the unrolled graph needs exactly
    T steps but takes any N, so the ONNX input says (T, "N", ...).  --batch fixes axis 0 of every
    input, which here is not the batch, so it is refused for them.
    """
    graph_inputs = {name for name, _, _ in ctx.builder.inputs}
    for i in bottoms:
        if ctx.inputs[i] not in graph_inputs:
            continue
        if ctx.options.batch is not None and layer.bottom[i] not in ctx.options.input_shapes:
            raise ctx.error(f"--batch fixes axis 0 of input {layer.bottom[i]!r}, which {layer.type} does not read as "
                            "the batch (it is T, or 1 for a state); leave --batch out: the graph takes any number of "
                            "streams (axis 1)")
        ctx.builder.batch_axes[ctx.inputs[i]] = 1


def _check_counts(layer: caffe_pb2.LayerParameter, ctx: LayerContext, states: int) -> int:
    """The number of exposed states; refuses bottom/top counts that break RecurrentLayer's Min/MaxBottomBlobs."""
    p = layer.recurrent_param
    exposed = states if p.expose_hidden else 0
    low = 2 + exposed
    have = len(layer.bottom)
    hint = (f"with expose_hidden the bottoms are x, cont, [x_static], then {states} initial state(s)"
            if p.expose_hidden else "the bottoms are x, cont and optionally x_static")
    if have < low:
        raise ctx.error(f"{layer.type} Layer takes at least {low} bottom blob(s) as input; it has {have} ({hint})")
    if have > low + 1:
        raise ctx.error(f"{layer.type} Layer takes at most {low + 1} bottom blob(s) as input; it has {have} ({hint})")
    tops = 1 + exposed
    if len(layer.top) != tops:
        what = f"the output, then {states} final state(s), as expose_hidden is set" if p.expose_hidden else \
            "the output (set expose_hidden for the final states)"
        raise ctx.error(f"{layer.type} Layer produces {tops} top blob(s) as output; it has {len(layer.top)} ({what})")
    return exposed


def _split_steps(ctx: LayerContext, value: str, steps: int, axis: int, size: int = 1) -> list[str]:
    """`value` cut into `steps` pieces of `size` along `axis` (a piece count the input must match at run time)."""
    sizes = [size] * steps
    if ctx.options.opset >= 13:
        return ctx.node_outputs("Split", [value, ctx.const(np.array(sizes, dtype=np.int64), "split")], steps,
                                axis=axis)
    return ctx.node_outputs("Split", [value], steps, axis=axis, split=sizes)


def _inputs(layer: caffe_pb2.LayerParameter, ctx: LayerContext, states: int) -> _Inputs:
    """Check x, cont, the static input and the exposed states against Caffe's RecurrentLayer checks."""
    p = layer.recurrent_param
    if p.num_output <= 0:
        raise ctx.error(f"recurrent_param.num_output is {p.num_output!r}; num_output must be positive "
                        "(the width of the hidden state)")
    exposed = _check_counts(layer, ctx, states)
    hidden = p.num_output
    shape = ctx.input_shapes[0]
    if len(shape) < 3:
        raise ctx.error(f"bottom {layer.bottom[0]!r} has shape {list(shape)}; x must have at least 3 axes -- "
                        "(#timesteps, #streams, features...): the input transform is an InnerProduct from axis 2")
    steps, streams = shape[0], shape[1]
    cont_shape = ctx.input_shapes[1]
    if tuple(cont_shape) != (steps, streams):
        raise ctx.error(f"bottom[1] {layer.bottom[1]!r} (cont) has shape {list(cont_shape)}; it must have exactly 2 "
                        f"axes -- (#timesteps, #streams) = {[steps, streams]}, as x {list(shape)}")
    _time_major(ctx, layer, [0, 1])
    x = ctx.inputs[0]
    width = math.prod(shape[2:])
    if len(shape) != 3:
        x = ctx.reshape(x, shape, (steps, streams, width))
    cont = ctx.reshape(ctx.inputs[1], cont_shape, (steps, streams, 1))
    conts = _split_steps(ctx, cont, steps, 0)

    static, static_width = None, 0
    first_state = 2
    if len(layer.bottom) == 2 + exposed + 1:
        first_state = 3
        s_shape = ctx.input_shapes[2]
        if len(s_shape) < 2 or s_shape[0] != streams:
            raise ctx.error(f"static input {layer.bottom[2]!r} has shape {list(s_shape)}; it must be (#streams = "
                            f"{streams}, features...), at least 2 axes, for its InnerProduct from axis 1")
        static_width = math.prod(s_shape[1:])
        static = ctx.inputs[2]
        if len(s_shape) != 2:
            static = ctx.reshape(static, s_shape, (streams, static_width))
    state_values = []
    for k in range(first_state, first_state + exposed):
        if tuple(ctx.input_shapes[k]) != (1, streams, hidden):
            raise ctx.error(f"bottom[{k}] {layer.bottom[k]!r} has shape {list(ctx.input_shapes[k])}; the hidden "
                            f"state input shape must be {[1, streams, hidden]} (1, #streams, num_output)")
        state_values.append(ctx.inputs[k])
    _time_major(ctx, layer, list(range(first_state, first_state + exposed)))
    return _Inputs(steps, streams, x, conts, static, static_width, state_values)


def _transposed(ctx: LayerContext, weight: str) -> str:
    """Wᵀ, so that MatMul(x, Wᵀ) is Caffe's InnerProduct x·Wᵀ."""
    return ctx.node("Transpose", [weight], perm=[1, 0])


def _params(layer: caffe_pb2.LayerParameter, ctx: LayerContext, inp: _Inputs, gates: int,
            names: tuple[str, str, str, str]) -> tuple[str, str, str | None, str]:
    """The input transform's W and b, the static transform's W and the recurrent W, in Caffe's blob order."""
    p = layer.recurrent_param
    rows, hidden = gates * p.num_output, p.num_output
    width = math.prod(ctx.input_shapes[0][2:])
    w_x = ctx.param(0, (rows, width), names[0], p.weight_filler)
    b_x = ctx.param(1, (rows,), names[1], p.bias_filler)
    w_static = ctx.param(2, (rows, inp.static_width), names[2], p.weight_filler) if inp.static else None
    w_h = ctx.param(3 if inp.static else 2, (rows, hidden), names[3], p.weight_filler)
    return w_x, b_x, w_static, w_h


def _step_inputs(ctx: LayerContext, inp: _Inputs, w_x: str, b_x: str,
                 w_static: str | None) -> tuple[list[str], str | None]:
    """W·x_t + b for every step (one MatMul over all T, cut per step) and W_static·x_static."""
    x_all = ctx.node("Add", [ctx.node("MatMul", [inp.x, _transposed(ctx, w_x)]), b_x])
    per_step = _split_steps(ctx, x_all, inp.steps, 0)
    static = ctx.node("MatMul", [inp.static, _transposed(ctx, w_static)]) if inp.static and w_static else None
    return per_step, static


def _preactivation(ctx: LayerContext, x_t: str, h_prev: str | None, cont_t: str, w_hT: str,
                   static: str | None) -> str:
    """W_h·(cont_t·h_{t-1}) + W_x·x_t + b (+ W_static·x_static), summed in Caffe's Eltwise order.

    With a zero h_{t-1} (the first step without exposed states) the recurrent term is exactly 0
    and is left out.
    """
    value = x_t
    if h_prev is not None:
        h_conted = ctx.node("Mul", [h_prev, cont_t])
        value = ctx.node("Add", [ctx.node("MatMul", [h_conted, w_hT]), x_t])
    if static is not None:
        value = ctx.node("Add", [value, static])
    return value


@register_layer("LSTM", bottoms=(2, 5), tops=(1, 3), params=True)
def convert_lstm(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """LSTM: per step, gates W_hc·(cont·h) + W_xc·x + b_c as i, f, o, g; c = cont·σ(f)·c + σ(i)·tanh(g); h = σ(o)·tanh(c)."""
    inp = _inputs(layer, ctx, 2)
    hidden = layer.recurrent_param.num_output
    w_x, b_x, w_static, w_h = _params(layer, ctx, inp, 4, ("W_xc", "b_c", "W_xc_static", "W_hc"))
    x_steps, static = _step_inputs(ctx, inp, w_x, b_x, w_static)
    w_hT = _transposed(ctx, w_h)
    exposed = bool(inp.states)
    h_prev, c_prev = (inp.states[0], inp.states[1]) if exposed else (None, None)
    hs = []
    for t in range(inp.steps):
        last = t == inp.steps - 1
        gates = _preactivation(ctx, x_steps[t], h_prev, inp.conts[t], w_hT, static)
        i_in, f_in, o_in, g_in = _split_steps(ctx, gates, 4, 2, hidden)
        i = ctx.node("Sigmoid", [i_in])
        f = ctx.node("Mul", [inp.conts[t], ctx.node("Sigmoid", [f_in])])
        o = ctx.node("Sigmoid", [o_in])
        g = ctx.node("Tanh", [g_in])
        c_out = [ctx.outputs[2]] if last and exposed else None
        h_out = [ctx.outputs[1]] if last and exposed else None
        ig = ctx.node("Mul", [i, g])
        # c_0 = 0 (no exposed states, so never an output): f·c_0 is exactly 0 and is left out
        c = ig if c_prev is None else ctx.node("Add", [ctx.node("Mul", [f, c_prev]), ig], c_out)
        h = ctx.node("Mul", [o, ctx.node("Tanh", [c])], h_out)
        hs.append(h)
        h_prev, c_prev = h, c
    _concat(ctx, hs)
    state = (1, inp.streams, hidden)
    ctx.set_output_shape(0, (inp.steps, inp.streams, hidden))
    if exposed:
        ctx.set_output_shape(1, state)
        ctx.set_output_shape(2, state)


@register_layer("RNN", bottoms=(2, 4), tops=(1, 2), params=True)
def convert_rnn(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """RNN: per step h = tanh(W_hh·(cont·h) + W_xh·x + b_h), output o = tanh(W_ho·h + b_o)."""
    inp = _inputs(layer, ctx, 1)
    p = layer.recurrent_param
    hidden = p.num_output
    w_x, b_x, w_static, w_h = _params(layer, ctx, inp, 1, ("W_xh", "b_h", "W_xh_static", "W_hh"))
    index = 4 if inp.static else 3
    w_o = ctx.param(index, (hidden, hidden), "W_ho", p.weight_filler)
    b_o = ctx.param(index + 1, (hidden,), "b_o", p.bias_filler)
    x_steps, static = _step_inputs(ctx, inp, w_x, b_x, w_static)
    w_hT, w_oT = _transposed(ctx, w_h), _transposed(ctx, w_o)
    exposed = bool(inp.states)
    h_prev = inp.states[0] if exposed else None
    outs = []
    for t in range(inp.steps):
        h_out = [ctx.outputs[1]] if exposed and t == inp.steps - 1 else None
        h = ctx.node("Tanh", [_preactivation(ctx, x_steps[t], h_prev, inp.conts[t], w_hT, static)], h_out)
        outs.append(ctx.node("Tanh", [ctx.node("Add", [ctx.node("MatMul", [h, w_oT]), b_o])]))
        h_prev = h
    _concat(ctx, outs)
    ctx.set_output_shape(0, (inp.steps, inp.streams, hidden))
    if exposed:
        ctx.set_output_shape(1, (1, inp.streams, hidden))


def _concat(ctx: LayerContext, steps: list[str]) -> None:
    """The per-step outputs joined along time into top 0 (Caffe's h_concat / o_concat)."""
    ctx.node("Concat", steps, [ctx.outputs[0]], axis=0)

