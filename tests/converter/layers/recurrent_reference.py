"""Numpy transcription of BVLC Caffe's unrolled LSTM and RNN nets, forward and backward, in float64.

Written from lstm_layer.cpp / rnn_layer.cpp (the unrolled nets: InnerProduct from axis 2, Scale
of h_{t-1} by cont_t, Eltwise SUM, Slice, Concat), lstm_unit_layer.cpp (LSTMUnit::Forward_cpu /
Backward_cpu, with its tanh(x) = 2·σ(2x) − 1) and recurrent_layer.cpp (what is shared with the
outer net: x and x_static share data and diff; cont, h_0/c_0 and h_T/c_T share data only).
Backward is the unrolled net's BackwardFrom, layer by layer in reverse: param diffs and the
diffs of x and x_static for a top diff on h (LSTM) or o (RNN).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Array = np.ndarray


def sigmoid(x: Array) -> Array:
    """LSTMUnit's sigmoid: 1 / (1 + exp(−x))."""
    return 1.0 / (1.0 + np.exp(-x))


def unit_tanh(x: Array) -> Array:
    """LSTMUnit's tanh: 2·σ(2x) − 1."""
    return 2.0 * sigmoid(2.0 * x) - 1.0


def _ip(x: Array, w: Array, b: Array | None = None) -> Array:
    """InnerProduct over the last axis: x·Wᵀ (+ b)."""
    y = x @ w.T
    return y + b if b is not None else y


@dataclass
class Trace:
    """Every blob of the unrolled net that backward needs, per step t = 1..T (index t − 1)."""

    x: Array  # (T, N, D)
    cont: Array  # (T, N)
    static: Array | None  # (N, Ds)
    h0: Array  # (1, N, H)
    c0: Array | None
    h: list[Array] = field(default_factory=list)  # h_t (1, N, H)
    c: list[Array] = field(default_factory=list)
    gate: list[Array] = field(default_factory=list)  # LSTM gate_input_t / RNN h_neuron_input_t
    out: list[Array] = field(default_factory=list)  # RNN o_t


def lstm_forward(params: list[Array], x: Array, cont: Array, static: Array | None = None,
                 h0: Array | None = None, c0: Array | None = None) -> tuple[Array, Array, Array, Trace]:
    """The unrolled LSTM: returns h (T, N, H), h_T, c_T and the trace; zero states unless given."""
    w_xc, b_c = params[0], params[1]
    w_static = params[2] if static is not None else None
    w_hc = params[-1]
    steps, streams = x.shape[:2]
    hidden = w_hc.shape[1]
    xf = x.reshape(steps, streams, -1).astype(np.float64)
    sf = static.reshape(streams, -1).astype(np.float64) if static is not None else None
    tr = Trace(xf, cont.astype(np.float64), sf, np.zeros((1, streams, hidden)) if h0 is None else h0.astype(np.float64),
               np.zeros((1, streams, hidden)) if c0 is None else c0.astype(np.float64))
    w_xc_x = _ip(xf, w_xc, b_c)  # x_transform
    static_term = _ip(sf, w_static)[None] if sf is not None else None  # W_xc_x_static, reshaped (1, N, 4H)
    h_prev, c_prev = tr.h0, tr.c0
    for t in range(steps):
        cont_t = tr.cont[t][None, :, None]
        h_conted = h_prev * cont_t  # Scale, axis 0
        gate = _ip(h_conted, w_hc) + w_xc_x[t:t + 1]  # Eltwise SUM: W_hc_h + W_xc_x_t (+ static)
        if static_term is not None:
            gate = gate + static_term
        i = sigmoid(gate[..., :hidden])
        f = np.where(cont_t == 0, 0.0, cont_t * sigmoid(gate[..., hidden:2 * hidden]))
        o = sigmoid(gate[..., 2 * hidden:3 * hidden])
        g = unit_tanh(gate[..., 3 * hidden:])
        c = f * c_prev + i * g
        h = o * unit_tanh(c)
        tr.gate.append(gate)
        tr.h.append(h)
        tr.c.append(c)
        h_prev, c_prev = h, c
    return np.concatenate(tr.h, axis=0), tr.h[-1], tr.c[-1], tr


def lstm_backward(params: list[Array], tr: Trace, dh: Array) -> tuple[list[Array], Array, Array | None]:
    """Param diffs (Caffe's blob order) and the diffs of x and x_static for top diff `dh` on h."""
    w_xc = params[0]
    w_static = params[2] if tr.static is not None else None
    w_hc = params[-1]
    hidden = w_hc.shape[1]
    steps = tr.x.shape[0]
    d_w_hc = np.zeros_like(w_hc, dtype=np.float64)
    d_gates = np.zeros((steps, *tr.gate[0].shape[1:]))
    h_diff_next = np.zeros_like(tr.h0)  # the diff reaching h_t from step t + 1's h_conted
    c_diff_next = np.zeros_like(tr.h0)  # c_T's diff is 0: recurrent outputs get no diff
    for t in reversed(range(steps)):
        cont_t = tr.cont[t][None, :, None]
        h_prev = tr.h[t - 1] if t else tr.h0
        c_prev = tr.c[t - 1] if t else tr.c0
        gate = tr.gate[t]
        h_diff = dh[t:t + 1] + h_diff_next
        # LSTMUnit::Backward_cpu
        i = sigmoid(gate[..., :hidden])
        f = np.where(cont_t == 0, 0.0, cont_t * sigmoid(gate[..., hidden:2 * hidden]))
        o = sigmoid(gate[..., 2 * hidden:3 * hidden])
        g = unit_tanh(gate[..., 3 * hidden:])
        tanh_c = unit_tanh(tr.c[t])
        c_term = c_diff_next + h_diff * o * (1 - tanh_c * tanh_c)
        c_diff_next = c_term * f
        d_gate = np.concatenate([c_term * g * i * (1 - i), c_term * c_prev * f * (1 - f),
                                 h_diff * tanh_c * o * (1 - o), c_term * i * (1 - g * g)], axis=-1)
        d_gates[t] = d_gate[0]
        # transform_t (InnerProduct of h_conted_{t-1}) and the Scale by cont_t
        h_conted = h_prev * cont_t
        d_w_hc += d_gate[0].T @ h_conted[0]
        h_diff_next = (d_gate @ w_hc) * cont_t
    d_w_xc = np.einsum("tng,tnd->gd", d_gates, tr.x)
    d_b_c = d_gates.sum(axis=(0, 1))
    dx = d_gates @ w_xc
    grads = [d_w_xc, d_b_c]
    dstatic = None
    if tr.static is not None:
        total = d_gates.sum(axis=0)  # the static term feeds every step's sum
        grads.append(total.T @ tr.static)
        dstatic = total @ w_static
    grads.append(d_w_hc)
    return grads, dx, dstatic


def rnn_forward(params: list[Array], x: Array, cont: Array, static: Array | None = None,
                h0: Array | None = None) -> tuple[Array, Array, Trace]:
    """The unrolled RNN: returns o (T, N, H), h_T and the trace; zero h_0 unless given."""
    w_xh, b_h = params[0], params[1]
    w_static = params[2] if static is not None else None
    w_hh, w_ho, b_o = params[-3], params[-2], params[-1]
    steps, streams = x.shape[:2]
    hidden = w_hh.shape[0]
    xf = x.reshape(steps, streams, -1).astype(np.float64)
    sf = static.reshape(streams, -1).astype(np.float64) if static is not None else None
    tr = Trace(xf, cont.astype(np.float64), sf, np.zeros((1, streams, hidden)) if h0 is None else h0.astype(np.float64),
               None)
    w_xh_x = _ip(xf, w_xh, b_h)
    static_term = _ip(sf, w_static)[None] if sf is not None else None
    h_prev = tr.h0
    for t in range(steps):
        h_conted = h_prev * tr.cont[t][None, :, None]
        pre = _ip(h_conted, w_hh) + w_xh_x[t:t + 1]
        if static_term is not None:
            pre = pre + static_term
        h = np.tanh(pre)  # TanH layer
        o = np.tanh(_ip(h, w_ho, b_o))
        tr.gate.append(pre)
        tr.h.append(h)
        tr.out.append(o)
        h_prev = h
    return np.concatenate(tr.out, axis=0), tr.h[-1], tr


def rnn_backward(params: list[Array], tr: Trace, do: Array) -> tuple[list[Array], Array, Array | None]:
    """Param diffs (Caffe's blob order) and the diffs of x and x_static for top diff `do` on o."""
    w_xh = params[0]
    w_static = params[2] if tr.static is not None else None
    w_hh, w_ho = params[-3], params[-2]
    steps = tr.x.shape[0]
    d_w_hh, d_w_ho = np.zeros(w_hh.shape), np.zeros(w_ho.shape)
    d_b_o = np.zeros(w_ho.shape[0])
    d_pres = np.zeros((steps, *tr.gate[0].shape[1:]))
    h_diff_next = np.zeros_like(tr.h0)
    for t in reversed(range(steps)):
        cont_t = tr.cont[t][None, :, None]
        h_prev = tr.h[t - 1] if t else tr.h0
        d_o_in = do[t:t + 1] * (1 - tr.out[t] ** 2)  # o_neuron (TanH)
        d_w_ho += d_o_in[0].T @ tr.h[t][0]
        d_b_o += d_o_in[0].sum(axis=0)
        h_diff = d_o_in @ w_ho + h_diff_next
        d_pre = h_diff * (1 - tr.h[t] ** 2)  # h_neuron (TanH)
        d_pres[t] = d_pre[0]
        d_w_hh += d_pre[0].T @ (h_prev * cont_t)[0]
        h_diff_next = (d_pre @ w_hh) * cont_t
    grads = [np.einsum("tng,tnd->gd", d_pres, tr.x), d_pres.sum(axis=(0, 1))]
    dstatic = None
    if tr.static is not None:
        total = d_pres.sum(axis=0)
        grads.append(total.T @ tr.static)
        dstatic = total @ w_static
    grads += [d_w_hh, d_w_ho, d_b_o]
    return grads, d_pres @ w_xh, dstatic
