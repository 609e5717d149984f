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
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
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
