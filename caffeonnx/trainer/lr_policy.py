"""Caffe's learning-rate policies (SGDSolver::GetLearningRate), with its checks and state.

`current_step` is state, not a function of the iteration: `multistep` advances it by at
most one per call, exactly as Caffe does, and it is saved in snapshots (SolverState).
"""
from __future__ import annotations

import math

from caffeonnx.errors import SolverError
from caffeonnx.proto import caffe_pb2

POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


class LearningRate:
    """The rate of one solver at each iteration: base_lr shaped by `lr_policy`."""

    def __init__(self, param: caffe_pb2.SolverParameter, source: str = "solver") -> None:
        self.param = param
        self.policy = param.lr_policy
        self.current_step = 0
        where = f"{source}: lr_policy {self.policy!r}"
        if not param.HasField("lr_policy"):
            raise SolverError(f"{source}: lr_policy is not set; give one of {', '.join(POLICIES)}")
        if self.policy not in POLICIES:
            raise SolverError(f"{source}: Unknown learning rate policy: {self.policy!r}; use one of {', '.join(POLICIES)}")
        if self.policy in ("step", "sigmoid") and param.stepsize <= 0:
            raise SolverError(f"{where} needs stepsize > 0, got {param.stepsize!r}")
        if self.policy in ("step", "exp", "inv", "multistep", "sigmoid") and param.gamma < 0:
            raise SolverError(f"{where} needs gamma >= 0, got {param.gamma:g}")
        if self.policy == "poly" and param.max_iter <= 0:
            raise SolverError(f"{where} needs max_iter > 0 (the rate reaches 0 there), got {param.max_iter!r}")

    def past_end(self, stop: int) -> str:
        """Why training to iteration `stop` does not fit the poly schedule."""
        return (f"lr_policy 'poly' reaches 0 at max_iter {self.param.max_iter}; training to iteration {stop} "
                "would go past it (Caffe computes a NaN or growing rate there): raise max_iter in the solver or "
                "lower --max-iter")

    def check_until(self, stop: int) -> None:
        """Refuse, before training, a run to iteration `stop` that the schedule cannot give a rate for."""
        if self.policy == "poly" and stop - 1 > self.param.max_iter:
            raise SolverError(self.past_end(stop))

    def rate(self, iteration: int) -> float:
        """The learning rate for update number `iteration` (0-based), as Caffe computes it."""
        p = self.param
        base = p.base_lr
        if self.policy == "fixed":
            return base
        if self.policy == "step":
            self.current_step = iteration // p.stepsize
            return base * p.gamma ** self.current_step
        if self.policy == "exp":
            return base * p.gamma ** iteration
        if self.policy == "inv":
            return base * (1.0 + p.gamma * iteration) ** (-p.power)
        if self.policy == "multistep":
            if self.current_step < len(p.stepvalue) and iteration >= p.stepvalue[self.current_step]:
                self.current_step += 1
            return base * p.gamma ** self.current_step
        if self.policy == "poly":
            if iteration > p.max_iter:
                raise SolverError(self.past_end(iteration + 1))
            return base * (1.0 - iteration / p.max_iter) ** p.power
        return base / (1.0 + math.exp(-p.gamma * (iteration - p.stepsize)))  # sigmoid
