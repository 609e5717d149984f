"""Caffe's training loop (Solver::Step): forward/backward iter_size times, smooth, update, repeat.

Per iteration, as Caffe does it: the param diffs start at zero; iter_size forward/backward
passes each read the next batch and add their gradients; the reported loss is their mean;
the smoothed loss averages the last `average_loss` iterations; then the solver applies
one update and the iteration count goes up.  A NaN/inf loss stops before its update, so
the weights (and any snapshot) stay the last good ones.

SIGINT/SIGTERM while training (`StopSignals`) never cut an iteration in half: the first one
lets the iteration in progress finish and asks the caller to stop at the next boundary; a
second one during the forward/backward passes discards that iteration (its gradients and
the random numbers its Dropout layers drew), so what is left is the state between two
iterations and a snapshot of it resumes bitwise as if never interrupted.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType

import numpy as np
import torch
from torch import nn

from caffeonnx.errors import SolverError, TrainingDiverged
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.data import DataSource
from caffeonnx.trainer.distributed import Synchronizer
from caffeonnx.trainer.graph_module import GraphModule, ParamInfo
from caffeonnx.trainer.solvers import SGDSolver, make_solver

INT_MAX = 2**31 - 1  # Caffe counts samples and iterations in C++ int


@dataclass
class Iteration:
    """What one iteration did: its loss before the update, the smoothed loss and the rate used."""

    iter: int
    loss: float
    smoothed_loss: float
    lr: float
    outputs: dict[str, float] = field(default_factory=dict)  # each loss top's (unweighted) value


@dataclass
class SmoothedLoss:
    """Caffe's UpdateSmoothedLoss: the mean of the last `window` iteration losses (a ring buffer)."""

    window: int
    losses: list[float] = field(default_factory=list)
    value: float = 0.0
    start_iter: int = 0

    def update(self, loss: float, iteration: int) -> float:
        """Add the loss of `iteration`; returns the smoothed loss."""
        if len(self.losses) < self.window:
            self.losses.append(loss)
            n = len(self.losses)
            self.value = (self.value * (n - 1) + loss) / n
        else:
            k = (iteration - self.start_iter) % self.window
            self.value += (loss - self.losses[k]) / self.window
            self.losses[k] = loss
        return self.value


Objective = Callable[[dict[str, np.ndarray]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class Trainer:
    """A GraphModule, a Caffe solver and a batch source, stepped as Caffe's Solver::Step.

    By default the objective is the net's own (Σ loss_weight·loss) and every learnable blob
    is updated; stacked training passes its phase objective and the blobs it trains.  Under
    torchrun `sync` joins the ranks between the passes and the update (distributed.py).
    """

    def __init__(self, module: GraphModule, param: caffe_pb2.SolverParameter, data: DataSource,
                 source: str = "solver", objective: Objective | None = None,
                 blobs: Sequence[tuple[ParamInfo, nn.Parameter]] | None = None,
                 sync: Synchronizer | None = None) -> None:
        self.module = module.train()
        self.param = param
        self.data = data
        self.sync = sync
        self.solver: SGDSolver = make_solver(param, module.named_blobs() if blobs is None else blobs, source)
        self.outputs = module.loss_outputs()
        self.objective = objective or self.net_objective
        self.smoothed = SmoothedLoss(max(1, param.average_loss))
        self.in_passes = False  # inside an iteration's forward/backward passes: it can still be discarded
        batch = max((shape[0] for shape in data.shapes.values()), default=1)
        if param.iter_size * batch > INT_MAX:
            raise SolverError(f"{source}: iter_size {param.iter_size} × batch {batch} = {param.iter_size * batch} "
                              f"samples per iteration is more than Caffe's int holds ({INT_MAX}) and would not "
                              "finish; lower iter_size")

    def net_objective(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Caffe's objective on one batch, and each loss top."""
        values = self.module(batch, self.outputs)
        return self.module.loss(values), {t.blob: values[t.value] for t in self.module.loss_terms}

    @property
    def iter(self) -> int:
        """Updates applied so far (Caffe's iter_)."""
        return self.solver.iter

    def forward_backward(self, batch_index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One pass on batch `batch_index`: the objective (gradients added to the params) and the loss tops."""
        loss, tops = self.objective(self.data.batch(batch_index))
        loss.backward()
        return loss.detach(), {k: v.detach() for k, v in tops.items()}

    def rng_states(self) -> list[torch.Tensor]:
        """What an iteration's random draws change: the Dropout generator's state and torch's global CPU one."""
        return [self.module.generator_for(self.module.device).get_state(), torch.get_rng_state()]

    def set_rng_states(self, states: Sequence[torch.Tensor]) -> None:
        """Put back states taken by `rng_states`."""
        self.module.generator_for(self.module.device).set_state(states[0])
        torch.set_rng_state(states[1])

    def passes(self, size: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The iteration's iter_size forward/backward passes; interrupted, it is discarded: no gradients and the
        random generators as they were, so the state is again the one between the last two iterations."""
        before = self.rng_states()
        try:
            self.in_passes = True
            total = torch.zeros(())
            tops: dict[str, float] = {}
            for k in range(size):
                loss, values = self.forward_backward(self.iter * size + k)
                total = total + loss.cpu()
                for name, v in values.items():
                    tops[name] = tops.get(name, 0.0) + float(v.sum()) / size
            self.in_passes = False  # inside the try: a signal handled up to here is caught below
            return total, tops
        except BaseException as exc:
            self.in_passes = False
            if isinstance(exc, KeyboardInterrupt):
                for _, p in self.solver.blobs:
                    p.grad = None
                self.set_rng_states(before)
            raise

    def step(self, iters: int, on_iteration: Callable[[Iteration], None] | None = None) -> list[Iteration]:
        """Run `iters` iterations (Caffe's Solver::Step); raises TrainingDiverged on a NaN/inf loss."""
        done = []
        size = self.param.iter_size
        for _ in range(iters):
            for _, p in self.solver.blobs:
                p.grad = None
            total, tops = self.passes(size)
            ranks = 1
            if self.sync is not None:  # every rank logs and checks the loss of all ranks' passes
                self.sync.iteration = self.iter
                total, tops = self.sync.agree(total, tops)
                ranks = self.sync.ranks.world
            loss_value = float(total) / (size * ranks)
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f"the loss is {loss_value} at iteration {self.iter} (tops: {tops}); stopped before updating, so "
                    "the weights and snapshots are the last finite ones. Lower base_lr or set clip_gradients"
                )
            smoothed = self.smoothed.update(loss_value, self.iter)
            if self.sync is not None:
                self.sync.reduce_gradients(self.solver.blobs)
            rate = self.solver.apply_update()
            record = Iteration(self.iter - 1, loss_value, smoothed, rate, tops)
            done.append(record)
            if on_iteration is not None:
                on_iteration(record)
        return done


class StopSignals:
    """SIGINT and SIGTERM while training: stop at the next iteration boundary instead of at once.

    The first signal sets `signum` (the caller stops after the iteration in progress); a second one
    raises KeyboardInterrupt, but only while `interruptible()` says the work in progress can be
    discarded.  Handlers are installed only in the main thread (Python delivers signals there).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, interruptible: Callable[[], bool] = lambda: False) -> None:
        self.signum: int | None = None
        self.interruptible = interruptible

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler: remember the first signal; a repeated one interrupts discardable work."""
        if self.signum is None:
            self.signum = signum
        elif self.interruptible():
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Install the handlers for the block; the previous ones come back after it."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                if signal.getsignal(s) == self.handle:  # a failed collective may have set SIG_IGN: keep it
                    signal.signal(s, handler)

    @property
    def name(self) -> str:
        """The signal's name, e.g. SIGTERM."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + (self.signum or signal.SIGINT)
