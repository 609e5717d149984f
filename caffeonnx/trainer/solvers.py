"""Caffe's solvers with their exact update rules (src/caffe/solvers/*.cpp).

One update (SGDSolver::ApplyUpdate): rate from the lr policy; clip the accumulated
gradient's global L2 norm to clip_gradients; then per param: Normalize (divide by
iter_size), Regularize (add weight_decay·decay_mult·w for L2, ·sign(w) for L1),
ComputeUpdateValue (solver specific, uses rate·lr_mult), and w ← w − update.

These differ from torch.optim on purpose: Caffe's SGD history holds lr-scaled steps
(h ← m·h + lr·g, w ← w − h), so when the rate changes the old velocity is kept as it
was; Caffe's Adam puts epsilon outside the bias correction
(w ← w − lr·√(1−β₂ᵗ)/(1−β₁ᵗ)·m/(√v + ε)); clipping sees the sum over iter_size passes.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from caffeonnx.errors import SolverError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.graph_module import ParamInfo
from caffeonnx.trainer.lr_policy import LearningRate

Tensor = torch.Tensor

# torch.optim.SGD(fused=True)'s kernel: one pass per blob instead of four elementwise ops.
_FUSED_SGD = getattr(torch, "_fused_sgd_", None)

# SolverParameter.solver_type (deprecated enum) -> the `type` string Caffe upgrades it to.
_LEGACY_TYPES = {
    caffe_pb2.SolverParameter.SGD: "SGD",
    caffe_pb2.SolverParameter.NESTEROV: "Nesterov",
    caffe_pb2.SolverParameter.ADAGRAD: "AdaGrad",
    caffe_pb2.SolverParameter.RMSPROP: "RMSProp",
    caffe_pb2.SolverParameter.ADADELTA: "AdaDelta",
    caffe_pb2.SolverParameter.ADAM: "Adam",
}


def solver_type(param: caffe_pb2.SolverParameter, source: str = "solver") -> str:
    """The solver type, with Caffe's upgrade of the deprecated `solver_type` enum."""
    if param.HasField("solver_type"):
        if param.HasField("type"):
            raise SolverError(
                f"{source}: Failed to upgrade solver: old solver_type field (enum) and new type field (string) "
                "cannot be both specified in solver proto text; keep only `type`"
            )
        return _LEGACY_TYPES[param.solver_type]
    return param.type


class SGDSolver:
    """Caffe SGD: h ← momentum·h + local_rate·g;  w ← w − h."""

    name = "SGD"
    history_sets = 1  # how many history blobs per param Caffe keeps (and snapshots)

    def __init__(self, param: caffe_pb2.SolverParameter, blobs: Sequence[tuple[ParamInfo, nn.Parameter]],
                 source: str = "solver") -> None:
        self.param = param
        self.source = source
        self.blobs = list(blobs)
        self.lr = LearningRate(param, source)
        self.iter = 0
        self.check()
        if param.regularization_type not in ("L2", "L1"):
            raise SolverError(f"{source}: Unknown regularization type: {param.regularization_type!r}; use L2 or L1")
        self.history: list[list[Tensor]] = [[torch.zeros_like(p) for _, p in self.blobs] for _ in range(self.history_sets)]

    def check(self) -> None:
        """Caffe's constructor sanity checks for this solver type."""

    # --- one update -------------------------------------------------------------------
    @torch.no_grad()
    def apply_update(self) -> float:
        """Turn the accumulated gradients into one Caffe update; returns the rate used."""
        rate = self.lr.rate(self.iter)
        # The diffs are the solver's to change in place, as Caffe's are: the caller zeroes them per iteration.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in self.blobs]
        self.clip(grads)
        fused: dict[tuple[float, float, torch.device, torch.dtype], list[int]] = {}
        for i, ((info, p), g) in enumerate(zip(self.blobs, grads)):
            if info.lr_mult == 0:
                continue  # Caffe's update is exactly zero: every rule below scales by rate·lr_mult
            local_rate = float(np.float32(rate) * np.float32(info.lr_mult))
            if self.fusable(local_rate):
                fused.setdefault((local_rate, self.local_decay(info), p.device, p.dtype), []).append(i)
                continue
            g = self.regularize(info, p, self.normalize(g))
            p.sub_(self.update_value(i, g, local_rate))
        for (local_rate, decay, _, _), ks in fused.items():
            self.fused_sgd(ks, [grads[k] for k in ks], local_rate, decay)
        self.iter += 1
        return rate

    def fusable(self, local_rate: float) -> bool:
        """Whether this update may run as torch's fused SGD kernel: Caffe's own SGD rule with momentum and L2 decay.

        A subclass that redefines `update_value` (Nesterov, Adam...) keeps the per-param path, and so does
        momentum 0, where the kernel would keep no history for Caffe's snapshots.
        """
        return (_FUSED_SGD is not None and local_rate != 0.0 and self.param.momentum != 0.0
                and self.param.regularization_type == "L2" and type(self).update_value is SGDSolver.update_value)

    def local_decay(self, info: ParamInfo) -> float:
        """Caffe's local_decay = weight_decay · decay_mult, in float32."""
        return float(np.float32(self.param.weight_decay) * np.float32(info.decay_mult))

    def fused_sgd(self, ks: list[int], grads: list[Tensor], local_rate: float, decay: float) -> None:
        """Normalize, Regularize, ComputeUpdateValue and Update of params `ks` in one pass over each blob.

        torch's kernel computes buf ← m·buf + (g/s + λ·w), w ← w − lr·buf; with s = 1/local_rate,
        λ = local_rate·local_decay and lr = 1 its buf is Caffe's history h ← m·h + local_rate·(g + local_decay·w)
        (float32 rounding of the products aside), and the diffs end up scaled, as Caffe's solver leaves them changed.
        """
        assert _FUSED_SGD is not None
        params = [self.blobs[k][1] for k in ks]
        scale = self.param.iter_size / local_rate  # Normalize's 1/iter_size folded into the unscaling
        _FUSED_SGD(params, grads, [self.history[0][k] for k in ks], weight_decay=local_rate * decay,
                   momentum=self.param.momentum, lr=1.0, dampening=0.0, nesterov=False, maximize=False,
                   is_first_step=False, grad_scale=torch.tensor(scale, dtype=torch.float32, device=params[0].device))

    def clip(self, grads: list[Tensor]) -> None:
        """ClipGradients: scale all diffs by clip/‖g‖ when the global L2 norm exceeds clip_gradients."""
        clip = self.param.clip_gradients
        if clip < 0:
            return
        norm = math.sqrt(sum(float(torch.sum(g * g)) for g in grads))
        if norm > clip:
            for g in grads:
                g.mul_(clip / norm)

    def normalize(self, g: Tensor) -> Tensor:
        """Normalize: the diff accumulated over iter_size passes, times 1/iter_size (in place)."""
        size = self.param.iter_size
        return g if size == 1 else g.mul_(float(np.float32(1.0) / np.float32(size)))

    def regularize(self, info: ParamInfo, w: Tensor, g: Tensor) -> Tensor:
        """Regularize: g + local_decay·w (L2) or g + local_decay·sign(w) (L1), in place."""
        decay = self.local_decay(info)
        if not decay:
            return g
        return g.add_(w if self.param.regularization_type == "L2" else torch.sign(w), alpha=decay)

    def update_value(self, i: int, g: Tensor, local_rate: float) -> Tensor:
        """ComputeUpdateValue: what to subtract from param `i`."""
        h = self.history[0][i]
        h.mul_(self.param.momentum).add_(g, alpha=local_rate)
        return h

    # --- state ------------------------------------------------------------------------
    def history_arrays(self) -> list[np.ndarray]:
        """Every history blob in Caffe's SolverState order (all params' first set, then the second...)."""
        return [h.detach().cpu().numpy().astype(np.float32) for group in self.history for h in group]

    @torch.no_grad()
    def restore(self, iteration: int, current_step: int, history: Sequence[np.ndarray], source: str) -> None:
        """Continue from a snapshot: iteration count, lr-policy step and history (Caffe's Restore)."""
        flat = [h for group in self.history for h in group]
        if len(history) != len(flat):
            raise SolverError(
                f"{source}: the solver state has {len(history)} history blobs but a {self.name} solver on this net "
                f"needs {len(flat)}; was it written by another solver type or net?"
            )
        for k, (h, arr) in enumerate(zip(flat, history)):
            if arr.size != h.numel():
                raise SolverError(f"{source}: history blob {k} has {arr.size} values but its param has {h.numel()}")
            h.copy_(torch.from_numpy(np.asarray(arr, dtype=np.float32).reshape(tuple(h.shape))))
        self.iter = iteration
        self.lr.current_step = current_step


class NesterovSolver(SGDSolver):
    """Caffe Nesterov: h ← m·h + lr·g; update = (1 + m)·h − m·h_prev."""

    name = "Nesterov"

    def update_value(self, i: int, g: Tensor, local_rate: float) -> Tensor:
        h = self.history[0][i]
        previous = h.clone()
        m = self.param.momentum
        h.mul_(m).add_(g, alpha=local_rate)
        return h * (1.0 + m) - previous * m


class AdaGradSolver(SGDSolver):
    """Caffe AdaGrad: h ← h + g²; update = lr·g / (√h + delta)."""

    name = "AdaGrad"

    def check(self) -> None:
        if self.param.momentum != 0:
            raise SolverError(f"{self.source}: Momentum cannot be used with AdaGrad (momentum is "
                              f"{self.param.momentum:g}); remove `momentum` or pick SGD/Nesterov")

    def update_value(self, i: int, g: Tensor, local_rate: float) -> Tensor:
        h = self.history[0][i]
        h.add_(g * g)
        return g / (torch.sqrt(h) + self.param.delta) * local_rate


class RMSPropSolver(SGDSolver):
    """Caffe RMSProp: h ← (1 − d)·g² + d·h; update = lr·g / (√h + delta)."""

    name = "RMSProp"

    def check(self) -> None:
        if self.param.momentum != 0:
            raise SolverError(f"{self.source}: Momentum cannot be used with RMSProp (momentum is "
                              f"{self.param.momentum:g}); remove `momentum` and set rms_decay instead")
        if not 0 <= self.param.rms_decay < 1:
            raise SolverError(f"{self.source}: rms_decay should lie between 0 and 1, got {self.param.rms_decay:g}")

    def update_value(self, i: int, g: Tensor, local_rate: float) -> Tensor:
        h, d = self.history[0][i], self.param.rms_decay
        h.mul_(d).add_(g * g, alpha=1.0 - d)
        return g / (torch.sqrt(h) + self.param.delta) * local_rate


class AdaDeltaSolver(SGDSolver):
    """Caffe AdaDelta: hg ← (1−m)·g² + m·hg; u = g·√((hu + δ)/(hg + δ)); hu ← (1−m)·u² + m·hu; update = lr·u."""

    name = "AdaDelta"
    history_sets = 2

    def update_value(self, i: int, g: Tensor, local_rate: float) -> Tensor:
        hg, hu = self.history[0][i], self.history[1][i]
        m, delta = self.param.momentum, self.param.delta
        hg.mul_(m).add_(g * g, alpha=1.0 - m)
        u = g * torch.sqrt((hu + delta) / (hg + delta))
        hu.mul_(m).add_(u * u, alpha=1.0 - m)
        return u * local_rate


class AdamSolver(SGDSolver):
    """Caffe Adam: m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²; update = lr·√(1−β₂ᵗ)/(1−β₁ᵗ)·m/(√v + δ)."""

    name = "Adam"
    history_sets = 2

    def update_value(self, i: int, g: Tensor, local_rate: float) -> Tensor:
        m, v = self.history[0][i], self.history[1][i]
        b1, b2 = self.param.momentum, self.param.momentum2
        t = self.iter + 1
        correction = math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
        m.mul_(b1).add_(g, alpha=1.0 - b1)
        v.mul_(b2).add_(g * g, alpha=1.0 - b2)
        return m / (torch.sqrt(v) + self.param.delta) * (local_rate * correction)


SOLVERS: dict[str, type[SGDSolver]] = {
    cls.name: cls for cls in (SGDSolver, NesterovSolver, AdaGradSolver, RMSPropSolver, AdaDeltaSolver, AdamSolver)
}


_FLOAT_FIELDS = ("base_lr", "gamma", "power", "momentum", "momentum2", "weight_decay", "clip_gradients", "delta",
                 "rms_decay")
_MOMENTUM_MEANS = {"SGD": "momentum", "Nesterov": "momentum", "AdaDelta": "momentum (AdaDelta's decay)",
                   "Adam": "momentum (Adam's beta1)"}


def check_solver(param: caffe_pb2.SolverParameter, source: str = "solver") -> list[str]:
    """Caffe's SolverParameter checks (Solver::Init and the solvers' constructors) and more.

    Raises SolverError (one line) for what Caffe refuses or what would hang, crash or diverge from the first
    update; returns warnings for what Caffe would run but silently differently from what was asked.
    """
    for name in _FLOAT_FIELDS:
        value = getattr(param, name)
        if not math.isfinite(value):
            raise SolverError(f"{source}: {name} is {value}; give a finite number")
    if param.average_loss < 1:
        raise SolverError(f"{source}: average_loss should be non-negative. (Caffe needs average_loss >= 1, the number "
                          f"of iterations the displayed loss averages; got {param.average_loss})")
    if param.iter_size < 1:
        raise SolverError(f"{source}: iter_size must be >= 1, got {param.iter_size!r}")
    if param.base_lr < 0:
        raise SolverError(f"{source}: base_lr must be >= 0 (a negative rate climbs the loss), got {param.base_lr:g}")
    for name in ("snapshot", "display", "max_iter"):
        if getattr(param, name) < 0:
            raise SolverError(f"{source}: {name} must be >= 0, got {getattr(param, name)}")
    kind = solver_type(param, source)
    if kind in _MOMENTUM_MEANS and not 0 <= param.momentum < 1:
        raise SolverError(f"{source}: {_MOMENTUM_MEANS[kind]} must lie in [0, 1) (at 1 or more the {kind} history "
                          f"never decays and the steps grow without bound), got {param.momentum:g}")
    if kind == "Adam" and not 0 <= param.momentum2 < 1:
        raise SolverError(f"{source}: momentum2 (Adam's beta2) must lie in [0, 1), got {param.momentum2:g}")
    if kind in ("AdaGrad", "RMSProp", "AdaDelta", "Adam") and param.delta <= 0:
        raise SolverError(f"{source}: delta must be > 0 for {kind} (it keeps the update's divisor above zero), got "
                          f"{param.delta:g}")
    warnings = []
    if param.snapshot_format == caffe_pb2.SolverParameter.HDF5:
        warnings.append(f"{source}: snapshot_format HDF5 is not written by caffeonnx: snapshots are BINARYPROTO "
                        "(.caffemodel, .solverstate), which Caffe reads too")
    if param.weight_decay < 0:
        warnings.append(f"{source}: weight_decay {param.weight_decay:g} is negative: it pushes the weights away from "
                        "zero (Caffe runs it as given)")
    if param.clip_gradients == 0:
        warnings.append(f"{source}: clip_gradients 0 scales every gradient to zero: no weight will change (a negative "
                        "value, the default -1, turns clipping off)")
    if param.snapshot and not param.HasField("snapshot_prefix"):
        warnings.append(f"{source}: In solver params, snapshot is specified but snapshot_prefix is not (Caffe refuses "
                        "this); snapshots go beside the solver")
    steps = list(param.stepvalue)
    if param.lr_policy == "multistep" and any(b <= a for a, b in zip(steps, steps[1:])):
        warnings.append(f"{source}: stepvalue {steps} is not increasing: Caffe steps once per iteration past each "
                        "value in order, so later values act early")
    return warnings


def make_solver(param: caffe_pb2.SolverParameter, blobs: Sequence[tuple[ParamInfo, nn.Parameter]],
                source: str = "solver") -> SGDSolver:
    """The Caffe solver `param` asks for, over the net's learnable blobs (checked as `check_solver` does)."""
    check_solver(param, source)
    kind = solver_type(param, source)
    if kind not in SOLVERS:
        raise SolverError(
            f"{source}: Unknown solver type: {kind!r} (known types: {', '.join(sorted(SOLVERS))})"
        )
    return SOLVERS[kind](param, blobs, source)
