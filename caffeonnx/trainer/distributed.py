"""`caffeonnx train` under torchrun: Caffe's multi-GPU training (tools/caffe.cpp, src/caffe/parallel.cpp).

What Caffe 1.0 does, and this module with it:
- every rank builds the same net; rank 0's weights are broadcast once before the first iteration;
- each rank runs the iteration's iter_size forward/backward passes on its own data, then the summed
  diffs of every learnable blob are all-reduced (summed over ranks) and scaled by 1/N
  (NCCL::on_gradients_ready); a blob shared by several layers is one Parameter, reduced once;
- then ClipGradients → Normalize → Regularize → update run identically on every rank, so the
  learning rate is not rescaled and the effective batch is N × batch × iter_size;
- Solver::Init seeds rank r with random_seed + r (Dropout draws differ per rank);
- only rank 0 tests, logs, snapshots and writes outputs.

One more collective per iteration, of a few numbers, makes every rank agree on what it logs
(the loss of all N × iter_size passes, summed in rank order) and on when to stop: a NaN loss
or a SIGINT/SIGTERM on any rank stops all of them at the same iteration boundary.  Every
collective has a timeout (--dist-timeout): a rank that dies or hangs makes the others stop with
one message instead of hanging.

`caffeonnx train --procs N` and `--gpu all` start the ranks themselves through torch's elastic
launcher (`launch`, the API torchrun runs on): one node, a c10d rendezvous on 127.0.0.1, no
restarts.  Ranks started that way write a user error to torch elastic's per-rank error file
instead of printing it, and the launcher prints one message for all of them (`explain`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from caffeonnx.errors import CaffeOnnxError
from caffeonnx.trainer.graph_module import ParamInfo

SHARD_MODES = ("skip", "contiguous")
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
T = TypeVar("T")


class DistributedError(CaffeOnnxError):
    """A collective failed (a rank died, hung past the timeout or lost its connection) or ranks disagree."""


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the torchrun workers."""

    rank: int
    world: int
    local_rank: int
    timeout: float  # seconds any collective may wait before the ranks give up
    shard: str = "skip"  # how TRAIN data is split: Caffe's DataLayer::Skip, or contiguous sub-batches

    @property
    def root(self) -> bool:
        """Rank 0: the one that tests, logs and writes files (Caffe's root_solver)."""
        return self.rank == 0


def environment(timeout: float = 300.0, shard: str = "skip") -> Ranks | None:
    """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or None outside one.

    A world of one process is no distributed run: it trains exactly as without torchrun.
    """
    if shard not in SHARD_MODES:
        raise CaffeOnnxError(f"--shard must be one of {', '.join(SHARD_MODES)}, got {shard!r}")
    if not timeout > 0:
        raise CaffeOnnxError(f"--dist-timeout must be a positive number of seconds, got {timeout!r}")
    given = {name: os.environ.get(name) for name in _ENV}
    if given["WORLD_SIZE"] is None and given["RANK"] is None:
        return None
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise CaffeOnnxError(f"RANK/WORLD_SIZE are set but {', '.join(missing)} are not: start the ranks with "
                             "`torchrun --nproc_per_node N -m caffeonnx train ...`, which sets them all")
    try:
        rank, world, local = (int(str(given[n])) for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise CaffeOnnxError(f"RANK={given['RANK']!r}, WORLD_SIZE={given['WORLD_SIZE']!r}, LOCAL_RANK="
                             f"{given['LOCAL_RANK']!r} should be integers (torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise CaffeOnnxError(f"RANK={rank} is not within WORLD_SIZE={world}")
    return Ranks(rank, world, local, timeout, shard) if world > 1 else None


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """CUDA ranks use cuda:LOCAL_RANK (one GPU per process, as torchrun lays them out); CPU stays CPU."""
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise CaffeOnnxError(f"--gpu {device.index} under torchrun: each rank trains on cuda:LOCAL_RANK; leave out "
                             "--gpu (or give --device cuda)")
    if ranks.local_rank >= torch.cuda.device_count():
        raise CaffeOnnxError(f"LOCAL_RANK {ranks.local_rank} but torch sees {torch.cuda.device_count()} CUDA "
                             "device(s): start at most one rank per GPU on each node")
    return torch.device("cuda", ranks.local_rank)


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """The default process group for the block: NCCL for CUDA ranks, gloo for CPU ones, with the timeout.

    Connections go where torchrun's MASTER_ADDR and GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME say.
    """
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _guard("joining the process group", ranks, lambda: dist.init_process_group(
        backend, rank=ranks.rank, world_size=ranks.world, timeout=timedelta(seconds=ranks.timeout)))
    try:
        yield
    except DistributedError:
        raise  # the group is broken: leave it to the process exit
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()


def _guard(what: str, ranks: Ranks, call: Callable[[], T]) -> T:
    """Run one collective; a failure becomes one line saying which rank saw it and what to do.

    From then on this process ignores SIGINT/SIGTERM: torchrun sends them to the surviving ranks as soon as
    one dies, and the message must get out before the process ends (it is on its way out anyway).
    """
    try:
        return call()
    except RuntimeError as exc:  # DistBackendError, DistNetworkError and DistStoreError derive from it
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, signal.SIG_IGN)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        first = re.sub(r"\[[^\]]*:\d+\]\s*", "", first)[:300].replace("[", "(").replace("]", ")")  # gloo's file:line
        raise DistributedError(
            f"rank {ranks.rank} of {ranks.world}: {what} failed: another rank died, hung for more than "
            f"--dist-timeout {ranks.timeout:g}s or lost its connection ({first}); every rank stops. See the other "
            "ranks' output for the cause, then resume all ranks from the last snapshot with --snapshot") from None


def _unique(params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    """Each Parameter once (a blob shared by several layers is one Parameter)."""
    return list({id(p): p for p in params}.values())


class Synchronizer:
    """The collectives of one distributed run: the start broadcast, per-iteration agreement and gradient all-reduce."""

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        self.iteration = 0  # for messages
        self.stop_signal = 0  # a signal number some rank got (0: none), agreed by every rank
        self.local_signal: Callable[[], int] = lambda: 0

    def broadcast(self, params: Sequence[nn.Parameter]) -> None:
        """Caffe's NCCL::Broadcast: every rank starts from rank 0's weights."""
        with torch.no_grad():
            for p in _unique(params):
                _guard("broadcasting rank 0's weights", self.ranks, lambda p=p: dist.broadcast(p.data, src=0))

    def agree(self, total: torch.Tensor, tops: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
        """All ranks' iteration results: the loss sum in rank order (float32, as one process sums its passes),
        each loss top's mean over ranks, and the first stop signal any rank got."""
        mine = self._on_device(torch.tensor([float(total), *tops.values(), float(self.local_signal())],
                                            dtype=torch.float64))
        gathered = [torch.empty_like(mine) for _ in range(self.ranks.world)]
        _guard(f"agreeing on the loss of iteration {self.iteration}", self.ranks, lambda: dist.all_gather(gathered, mine))
        rows = np.stack([g.cpu().numpy() for g in gathered])
        loss = np.float32(0.0)
        for value in rows[:, 0]:
            loss = np.float32(loss + np.float32(value))
        means = rows[:, 1:-1].sum(axis=0) / self.ranks.world
        signals = [int(s) for s in rows[:, -1] if s]
        if signals and not self.stop_signal:
            self.stop_signal = signals[0]
        return torch.tensor(loss), dict(zip(tops, (float(m) for m in means)))

    def reduce_gradients(self, blobs: Sequence[tuple[ParamInfo, nn.Parameter]]) -> None:
        """Sum each learnable blob's diff over ranks and scale by 1/N, in one flat buffer (Caffe's diff_)."""
        params = [p for p in _unique([p for _, p in blobs]) if p.grad is not None]
        if not params:
            return
        with torch.no_grad():
            flat = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
            _guard(f"the gradient all-reduce of iteration {self.iteration}", self.ranks,
                   lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM))
            flat.mul_(float(np.float32(1.0) / np.float32(self.ranks.world)))  # (Dtype)1.0 / solver_count
            offset = 0
            for p in params:
                g = p.grad
                assert g is not None
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def gather_objects(self, value: object, what: str) -> list[object]:
        """Every rank's `value` (small picklable things: RNG states, checksums), in rank order."""
        out: list[object] = [None] * self.ranks.world
        _guard(what, self.ranks, lambda: dist.all_gather_object(out, value))
        return out

    def check_replicas(self, blobs: Sequence[tuple[ParamInfo, nn.Parameter]], history: Sequence[np.ndarray]) -> str:
        """The learned weights and solver history must be bit-identical on every rank; returns their digest.

        Blobs with lr_mult 0 are left out: BatchNorm's moving averages are per rank, as in Caffe.
        """
        digest = hashlib.blake2b(digest_size=16)
        for info, p in blobs:
            if info.lr_mult != 0:
                digest.update(p.detach().cpu().numpy().tobytes())
        for h in history:
            digest.update(np.ascontiguousarray(h).tobytes())
        digests = [str(d) for d in self.gather_objects(digest.hexdigest(), "comparing the ranks' final weights")]
        if len(set(digests)) != 1:
            raise DistributedError(f"the ranks end with different weights (checksums by rank: {digests}); this is a "
                                   "caffeonnx bug: please report it with the solver")
        return digests[0]

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        """NCCL collectives need CUDA tensors; gloo takes CPU ones."""
        return t.cuda() if dist.get_backend() == "nccl" else t


# ---- the launcher: `caffeonnx train --procs N` / `--gpu all` -------------------------------------------------------

LAUNCHED = "CAFFEONNX_LAUNCHED"  # set for ranks that launch() started: their errors go to the launcher
_ERROR_FILE = "TORCHELASTIC_ERROR_FILE"  # where torch's elastic agent tells each rank to leave its error
_STOPPED = {128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM}  # a stop, not a failure


def record_error(exc: CaffeOnnxError) -> bool:
    """Under launch(): leave the error in this rank's error file for the launcher (True), rather than print it.

    The file is torch elastic's (TORCHELASTIC_ERROR_FILE, its {"message", "timestamp"} form), so torchrun's own
    failure report would show the message too; `caffeonnx` adds when it happened to the sub-second and whether it
    is a consequence of another rank's failure (a collective that failed).
    """
    path = os.environ.get(_ERROR_FILE)
    if os.environ.get(LAUNCHED) != "1" or not path:
        return False
    now = time.time()
    record = {"message": str(exc), "timestamp": int(now),
              "caffeonnx": {"time": now, "consequence": isinstance(exc, DistributedError)}}
    try:
        with open(path, "w") as fh:
            json.dump(record, fh)
    except OSError:
        return False  # print it after all
    return True


@dataclass(frozen=True)
class RankExit:
    """How one launched rank ended (the launcher's view of torch elastic's ProcessFailure)."""

    rank: int
    pid: int
    exitcode: int  # negative: killed by that signal
    message: str | None = None  # the caffeonnx error it recorded, if any
    consequence: bool = False  # the message is a failed collective: another rank failed first
    time: float = 0.0  # when it recorded the message, else when the launcher saw it end (whole seconds)


def _signal_name(number: int) -> str:
    """SIGKILL for 9 (what a negative exit code means to the launcher)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def explain(exits: Sequence[RankExit], world: int) -> tuple[str | None, int]:
    """One message and exit code for the launcher from the failed ranks (None: the ranks were stopped by a signal).

    The cause comes first: a user error a rank recorded (the same text from several ranks is said once, as one
    process would say it), else a rank that was killed or crashed, else a failed collective; ranks that were merely
    stopped (SIGINT/SIGTERM, what the agent sends the others once one fails) are the cause only if nothing else is.
    """
    errors = sorted((e for e in exits if e.message is not None and not e.consequence), key=lambda e: (e.time, e.rank))
    if errors:
        texts = list(dict.fromkeys(e.message for e in errors))
        first = errors[0]
        return (texts[0] if len(texts) == 1 else f"rank {first.rank} of {world}: {first.message}"), 2
    resume = "; every rank stopped: resume all ranks from the last snapshot with --snapshot"
    consequences = sorted((e for e in exits if e.consequence), key=lambda e: (e.time, e.rank))
    # A hung rank ignores the launcher's SIGTERM and is killed 30 s after the others gave up on it: then the
    # survivors' --dist-timeout message, recorded well before, is the cause.
    given_up = consequences[0].time + 2 if consequences else math.inf
    crashed = sorted((e for e in exits if e.message is None and e.exitcode not in _STOPPED and e.time <= given_up),
                     key=lambda e: e.rank)
    if crashed:
        e = crashed[0]
        how = (f"was killed by {_signal_name(-e.exitcode)}" if e.exitcode < 0 else
               "stopped with an error (printed above)" if e.exitcode == 2 else
               f"exited with code {e.exitcode} without a caffeonnx error (its output above says why)")
        return f"rank {e.rank} of {world} (pid {e.pid}) {how}{resume}", 2
    if consequences:
        return str(consequences[0].message), 2
    stopped = [e.exitcode for e in exits]
    return None, 128 + signal.SIGTERM if any(c in (143, -signal.SIGTERM) for c in stopped) else 128 + signal.SIGINT


def _exits(failures: Mapping[int, object]) -> list[RankExit]:
    """torch elastic's ProcessFailure records as RankExits (our own error-file fields when a rank wrote them)."""
    out = []
    for rank, failure in failures.items():
        data = getattr(failure, "error_file_data", None) or {}
        extra = data.get("caffeonnx") if isinstance(data, dict) else None
        message = data.get("message") if isinstance(extra, dict) else None
        seen = float(getattr(failure, "timestamp", 0))
        out.append(RankExit(int(rank), int(getattr(failure, "pid", -1)), int(getattr(failure, "exitcode", 1)),
                            message if isinstance(message, str) else None,
                            bool(extra.get("consequence")) if isinstance(extra, dict) else False,
                            float(extra.get("time", seen)) if isinstance(extra, dict) else seen))
    return out


@contextlib.contextmanager
def _launcher_environment(extra: Mapping[str, str]) -> Iterator[None]:
    """Variables for the ranks (the agent hands them os.environ) and torch elastic's log lines kept off the console
    for the block: the launcher reports what went wrong in one line of its own."""
    saved = {name: os.environ.get(name) for name in extra}
    os.environ.update(extra)
    quiet = logging.NullHandler()
    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.distributed.launcher")]
    for logger in loggers:
        logger.addHandler(quiet)
        logger.propagate = False
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(quiet)
            logger.propagate = True
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def launch(args: Sequence[str], nproc: int, timeout: float) -> None:
    """Run `python -m caffeonnx train ARGS` as `nproc` ranks on this machine through torch's elastic launcher.

    What `torchrun --standalone --nproc_per_node N -m caffeonnx train ARGS` does, from torch's own API
    (torch.distributed.launcher.api: LaunchConfig, elastic_launch): a c10d rendezvous on 127.0.0.1 with a free
    port, no restarts, OMP_NUM_THREADS=1 unless set.  A signal to the launcher goes to every rank, which stop at
    the same iteration boundary and rank 0 snapshots; the agent waits `timeout` seconds (--dist-timeout) for that
    before it kills them.  A failed rank makes the agent stop the others; raises DistributedError with one
    message, KeyboardInterrupt on SIGINT, SystemExit(128 + signal) on other signals.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"caffeonnx-{uuid.uuid4().hex}",
                          role="caffeonnx", rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", local_addr="127.0.0.1",
                          max_restarts=0, monitor_interval=0.1, start_method="spawn",
                          shutdown_timeout=max(30, math.ceil(timeout)))
    extra = {LAUNCHED: "1"}
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun: one intra-op thread per rank unless told otherwise
        extra["OMP_NUM_THREADS"] = "1"
    with _launcher_environment(extra):
        try:
            elastic_launch(config, sys.executable)("-u", "-m", "caffeonnx", "train", *args)
        except ChildFailedError as exc:
            message, code = explain(_exits(exc.failures), nproc)
            if message is not None:
                raise DistributedError(message) from None
            if code == 128 + signal.SIGINT:
                raise KeyboardInterrupt from None
            raise SystemExit(code) from None
        except SignalException as exc:  # the agent has passed the signal on and waited for the ranks
            if exc.sigval == signal.SIGINT:
                raise KeyboardInterrupt from None
            raise SystemExit(128 + int(exc.sigval)) from None
        except (RendezvousError, RuntimeError, OSError) as exc:  # the rendezvous or the agent itself failed
            raise DistributedError(f"torch's elastic launcher could not run {nproc} ranks: {type(exc).__name__}: "
                                   f"{exc}") from None
