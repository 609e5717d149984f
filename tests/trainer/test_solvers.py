"""Each Caffe solver against closed-form / recurrence formulas in float64 (rtol 1e-5, atol 1e-6), plus Caffe's checks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from caffeonnx.errors import SolverError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer import solvers
from caffeonnx.trainer.graph_module import ParamInfo
from caffeonnx.trainer.solvers import make_solver, solver_type
from tests.helpers import assert_close, rng

W0 = rng(0).normal(size=6).astype(np.float32)
G = rng(1).normal(size=6).astype(np.float32)  # a constant gradient, so the formulas have closed forms


def param(**fields: object) -> caffe_pb2.SolverParameter:
    fields.setdefault("lr_policy", "fixed")
    return caffe_pb2.SolverParameter(base_lr=0.1, **fields)


def run(sp: caffe_pb2.SolverParameter, steps: int, grad: np.ndarray = G, lr_mult: float = 1.0,
        decay_mult: float = 1.0, w0: np.ndarray = W0) -> list[np.ndarray]:
    """Weights after each of `steps` updates, the gradient being `grad` every time."""
    p = nn.Parameter(torch.from_numpy(w0.copy()))
    solver = make_solver(sp, [(ParamInfo("w", lr_mult, decay_mult, [("ip", 0)], np.dtype(np.float32)), p)])
    out = []
    for _ in range(steps):
        p.grad = torch.from_numpy(grad.copy())
        solver.apply_update()
        out.append(p.detach().numpy().astype(np.float64).copy())
    return out


def close(got: list[np.ndarray], want: list[np.ndarray], what: str) -> None:
    for t, (a, b) in enumerate(zip(got, want, strict=True), start=1):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{what} after update {t}")


LR, M, T = 0.1, 0.9, 6
w0, g = W0.astype(np.float64), G.astype(np.float64)


def test_sgd_momentum_closed_form() -> None:
    # h_t = lr·g·(1 − mᵗ)/(1 − m);  w_t = w0 − Σ_k h_k
    want = [w0 - LR * g * sum((1 - M ** k) / (1 - M) for k in range(1, t + 1)) for t in range(1, T + 1)]
    close(run(param(momentum=M), T), want, "SGD")


def test_sgd_history_keeps_lr_scaled_steps_when_the_rate_changes() -> None:
    # step policy halves the rate at iteration 3: Caffe keeps h (already lr-scaled), torch.optim would rescale it.
    sp = param(momentum=M, lr_policy="step", gamma=0.5, stepsize=3)
    h, w, want = np.zeros(6), w0.copy(), []
    for it in range(T):
        h = M * h + LR * 0.5 ** (it // 3) * g
        w = w - h
        want.append(w.copy())
    close(run(sp, T), want, "SGD step policy")


def test_nesterov_recurrence() -> None:
    h, w, want = np.zeros(6), w0.copy(), []
    for _ in range(T):
        prev, h = h, M * h + LR * g
        w = w - ((1 + M) * h - M * prev)
        want.append(w.copy())
    close(run(param(type="Nesterov", momentum=M), T), want, "Nesterov")


def test_adagrad_closed_form() -> None:
    d = 1e-3
    want = [w0 - LR * g * sum(1 / (np.sqrt(k) * np.abs(g) + d) for k in range(1, t + 1)) for t in range(1, T + 1)]
    close(run(param(type="AdaGrad", delta=d), T), want, "AdaGrad")


def test_rmsprop_closed_form() -> None:
    d, r = 1e-3, 0.9
    want = [w0 - LR * g * sum(1 / (np.abs(g) * np.sqrt(1 - r ** k) + d) for k in range(1, t + 1)) for t in range(1, T + 1)]
    close(run(param(type="RMSProp", delta=d, rms_decay=r), T), want, "RMSProp")


def test_adadelta_recurrence() -> None:
    d, m = 1e-2, 0.95
    hg, hu, w, want = np.zeros(6), np.zeros(6), w0.copy(), []
    for _ in range(T):
        hg = m * hg + (1 - m) * g * g
        u = g * np.sqrt((hu + d) / (hg + d))
        hu = m * hu + (1 - m) * u * u
        w = w - LR * u
        want.append(w.copy())
    close(run(param(type="AdaDelta", momentum=m, delta=d), T), want, "AdaDelta")


def test_adam_puts_epsilon_outside_the_bias_correction() -> None:
    # Constant g: m_t = (1 − β₁ᵗ)g, v_t = (1 − β₂ᵗ)g², so Caffe's step is lr·g/(|g| + ε/√(1 − β₂ᵗ)).
    b1, b2, eps = 0.9, 0.999, 0.05  # a large ε makes the placement visible
    steps = [LR * g / (np.abs(g) + eps / np.sqrt(1 - b2 ** t)) for t in range(1, T + 1)]
    want = [w0 - sum(steps[:t]) for t in range(1, T + 1)]
    got = run(param(type="Adam", momentum=b1, momentum2=b2, delta=eps), T)
    close(got, want, "Adam")
    torch_style = w0 - LR * g / (np.abs(g) + eps)  # torch.optim.Adam's first step
    assert not np.allclose(got[0], torch_style, rtol=1e-4), "Caffe's Adam differs from torch.optim.Adam here"


@pytest.mark.parametrize("kind", ["L2", "L1"])
@pytest.mark.parametrize("decay_mult", [0.0, 2.0])
def test_weight_decay_with_decay_mult(kind: str, decay_mult: float) -> None:
    wd = 0.01
    reg = (w0 if kind == "L2" else np.sign(w0)) * wd * decay_mult
    got = run(param(weight_decay=wd, regularization_type=kind), 1, decay_mult=decay_mult)
    close(got, [w0 - LR * (g + reg)], f"{kind} decay_mult {decay_mult}")


def test_lr_mult_scales_the_rate_and_zero_freezes() -> None:
    close(run(param(momentum=M), 2, lr_mult=2.5), [w0 - 2.5 * LR * g, w0 - 2.5 * LR * g * (2 + M)], "lr_mult 2.5")
    close(run(param(momentum=M, weight_decay=0.1), 3, lr_mult=0.0), [w0] * 3, "lr_mult 0")


def test_clipping_sees_the_accumulated_gradient_before_iter_size_division() -> None:
    # The diff holds the sum of 4 passes; clipping compares ITS norm with clip_gradients, then divides by 4.
    summed = 4 * g
    clip = 0.5 * float(np.linalg.norm(summed))  # above ‖g‖ (the mean), below ‖Σg‖
    got = run(param(iter_size=4, clip_gradients=clip), 1, grad=summed.astype(np.float32))
    close(got, [w0 - LR * summed * (clip / np.linalg.norm(summed)) / 4], "clip then normalise")
    assert clip > np.linalg.norm(g), "clipping the mean gradient instead would change nothing"


def test_legacy_solver_type_enum_is_upgraded() -> None:
    assert solver_type(caffe_pb2.SolverParameter(solver_type=caffe_pb2.SolverParameter.ADAM)) == "Adam"
    assert solver_type(caffe_pb2.SolverParameter()) == "SGD"


@pytest.mark.parametrize(("fields", "message"), [
    ({"type": "AdaGrad", "momentum": 0.9}, r"s\.prototxt: Momentum cannot be used with AdaGrad \(momentum is 0\.9\)"),
    ({"type": "RMSProp", "momentum": 0.5}, r"Momentum cannot be used with RMSProp"),
    ({"type": "RMSProp", "rms_decay": 1.0}, r"rms_decay should lie between 0 and 1, got 1"),
    ({"type": "Adamax"}, r"Unknown solver type: 'Adamax' \(known types: AdaDelta, AdaGrad, Adam, Nesterov, RMSProp, SGD\)"),
    ({"regularization_type": "L3"}, r"Unknown regularization type: 'L3'"),
    ({"iter_size": 0}, r"iter_size must be >= 1, got 0"),
    ({"type": "SGD", "solver_type": caffe_pb2.SolverParameter.ADAM}, r"cannot be both specified"),
])
def test_caffes_solver_checks(fields: dict, message: str) -> None:
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(SolverError, match=message):
        make_solver(param(**fields), [(ParamInfo("w", 1.0, 1.0, [], np.dtype(np.float32)), p)], "s.prototxt")


def test_state_round_trip_continues_identically() -> None:
    sp = param(type="Adam", momentum=0.9, momentum2=0.99, lr_policy="multistep", gamma=0.5, stepvalue=[2, 4])
    info = ParamInfo("w", 1.0, 1.0, [], np.dtype(np.float32))
    a = nn.Parameter(torch.from_numpy(W0.copy()))
    first = make_solver(sp, [(info, a)])
    for _ in range(3):
        a.grad = torch.from_numpy(G.copy())
        first.apply_update()
    b = nn.Parameter(a.detach().clone())
    second = make_solver(sp, [(info, b)])
    second.restore(first.iter, first.lr.current_step, first.history_arrays(), "state")
    for _ in range(3):
        for p, s in ((a, first), (b, second)):
            p.grad = torch.from_numpy(G.copy())
            s.apply_update()
    assert torch.equal(a, b)
    assert math.isclose(first.lr.rate(first.iter), second.lr.rate(second.iter))


@pytest.mark.parametrize("iter_size", [1, 2])
def test_fused_sgd_matches_the_per_param_update(iter_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's fused kernel and Caffe's four-op update agree on weights and history (float32, rtol 1e-6, atol 1e-7).

    Blobs with different lr_mult/decay_mult (so several kernel groups), a frozen blob, and a step policy
    whose rate changes mid-run (Caffe keeps the lr-scaled history across the change).
    """
    sp = param(momentum=0.9, weight_decay=0.01, lr_policy="step", gamma=0.5, stepsize=2, iter_size=iter_size)
    mults = [(1.0, 1.0), (1.0, 0.0), (2.0, 1.0), (0.0, 1.0), (2.0, 0.5)]
    shapes = [(7, 5), (7,), (3, 7), (3,), (4, 4)]

    def train(fused: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
        calls = []
        kernel = solvers._FUSED_SGD
        monkeypatch.setattr(solvers, "_FUSED_SGD", (lambda *a, **k: calls.append(1) or kernel(*a, **k)) if fused else None)
        params = [nn.Parameter(torch.from_numpy(rng(10 + i).normal(size=s).astype(np.float32))) for i, s in enumerate(shapes)]
        infos = [ParamInfo(f"p{i}", lr, dm, [("ip", i)], np.dtype(np.float32)) for i, (lr, dm) in enumerate(mults)]
        solver = make_solver(sp, list(zip(infos, params)))
        for step in range(5):
            for i, p in enumerate(params):
                p.grad = torch.from_numpy(rng(100 * step + i).normal(size=shapes[i]).astype(np.float32))
            solver.apply_update()
        assert bool(calls) == fused, f"fused kernel calls: {len(calls)} (fused={fused})"
        return [p.detach().numpy().copy() for p in params], solver.history_arrays()

    (w_fused, h_fused), (w_loop, h_loop) = train(True), train(False)
    for i, (a, b) in enumerate(zip(w_fused, w_loop)):
        assert_close(a, b, f"param {i} {shapes[i]} lr_mult/decay_mult {mults[i]}", atol=1e-7, rtol=1e-6)
    for i, (a, b) in enumerate(zip(h_fused, h_loop)):
        assert_close(a, b, f"history {i} {shapes[i]}", atol=1e-7, rtol=1e-6)
