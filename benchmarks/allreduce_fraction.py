"""The gradient all-reduce's share of a training iteration under 2 gloo ranks (loopback) on this machine.

Caffe's mnist_autoencoder (784-1000-500-250-30, 2.8 M learnable values, an 11 MB float32 gradient), SGD with
momentum, trained by `caffeonnx train` in 2 ranks started through torch's elastic launcher (the API behind
`caffeonnx train --procs 2`), 1 thread per rank, at two batch sizes per rank.  Inside each rank the script
times, per iteration:

- step: Trainer.step(1), the whole iteration (forward/backward passes, the loss agreement, the all-reduce and
  the update);
- reduce: Synchronizer.reduce_gradients (flatten the diffs, all-reduce, scale by 1/N, copy back);
- all_reduce: the torch.distributed.all_reduce call inside it alone;
- agree: the per-iteration all-gather of the losses and stop signals.

An all-reduce also waits for the slower rank.  A second setting ("barrier first") puts a dist.barrier just
before each gradient all-reduce and times it apart, which splits that wait from the transfer itself.  The
first `--warmup` iterations are left out; numbers are medians over iterations, per rank.
Writes benchmarks/results/allreduce_fraction.json.

    python benchmarks/allreduce_fraction.py [--iters 60] [--batches 100,25]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
MNIST = ROOT.parent.parent / "shared" / "data" / "mnist" / "train-images-idx3-ubyte.gz"


def rank_main(workdir: Path, solver: str, barrier: bool) -> None:
    """One rank: train with timers around the collectives and the iteration, then write this rank's timings."""
    import torch
    import torch.distributed as dist

    from caffeonnx.trainer import distributed, loop
    from caffeonnx.trainer.session import TrainOptions, run_training

    times: dict[str, list[float]] = {"step": [], "reduce": [], "all_reduce": [], "agree": [], "barrier": []}

    def timed(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[key].append(time.perf_counter() - start)
        return run

    all_reduce = dist.all_reduce

    def gradient_all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if barrier:
            timed("barrier", dist.barrier)()
        return timed("all_reduce", all_reduce)(tensor, *args, **kwargs)

    reduce = distributed.Synchronizer.reduce_gradients

    def reduce_gradients(self: distributed.Synchronizer, blobs: Any) -> None:
        dist.all_reduce = gradient_all_reduce  # only the gradient all-reduce goes through the timer
        try:
            return timed("reduce", reduce)(self, blobs)
        finally:
            dist.all_reduce = all_reduce

    distributed.Synchronizer.reduce_gradients = reduce_gradients  # type: ignore[method-assign]
    distributed.Synchronizer.agree = timed("agree", distributed.Synchronizer.agree)  # type: ignore[method-assign]
    loop.Trainer.step = timed("step", loop.Trainer.step)  # type: ignore[method-assign]
    os.chdir(workdir)
    run_training(TrainOptions(Path(solver), data="data.npz", pictures=False, threads=1), say=lambda _: None)
    rank = int(os.environ["RANK"])
    (workdir / f"times_{'barrier' if barrier else 'plain'}_{solver}_{rank}.json").write_text(json.dumps(times))


def launch(workdir: Path, solver: str, barrier: bool) -> None:
    """Start the 2 ranks of this script through torch's elastic launcher, as `caffeonnx train --procs 2` does."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from caffeonnx.trainer.distributed import _launcher_environment

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=f"bench-{time.time_ns()}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", local_addr="127.0.0.1", max_restarts=0,
                          monitor_interval=0.1)
    with _launcher_environment({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT.parent)}):
        elastic_launch(config, sys.executable)(str(Path(__file__).resolve()), "--rank-worker", str(workdir), solver,
                                               *(["--barrier"] if barrier else []))


def summarize(times: dict[str, list[float]], warmup: int) -> dict[str, float]:
    """Median milliseconds per iteration of each timer, and the all-reduce's fraction of the step."""
    keep = {k: v[warmup:] for k, v in times.items() if v}
    out = {f"{k}_ms": 1000 * statistics.median(v) for k, v in keep.items()}
    steps = np.asarray(keep["step"])
    for key in ("reduce", "all_reduce", "agree", "barrier"):
        if key in keep:
            out[f"{key}_fraction_of_step"] = float(np.median(np.asarray(keep[key]) / steps))
    return out


def main() -> None:
    if "--rank-worker" in sys.argv:
        at = sys.argv.index("--rank-worker")
        rank_main(Path(sys.argv[at + 1]), sys.argv[at + 2], "--barrier" in sys.argv)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batches", default="100,25", help="batch sizes per rank, comma-separated")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "allreduce_fraction.json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from trainer_mnist_autoencoder import autoencoder_prototxt

    from caffeonnx.runtime.inputs import open_samples

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        with open_samples(MNIST, scratch_dir=tmp) as images:
            np.savez(d / "data.npz", data=(np.asarray(images[:6000], dtype=np.float32) / 255).reshape(-1, 784))
        for batch in (int(b) for b in args.batches.split(",")):
            (d / f"net{batch}.prototxt").write_text(autoencoder_prototxt(batch))
            solver = f"solver{batch}.prototxt"
            (d / solver).write_text(
                f'net: "net{batch}.prototxt"\nbase_lr: 0.01\nmomentum: 0.9\nweight_decay: 0.0005\nlr_policy: "fixed"'
                f"\nmax_iter: {args.iters}\nsnapshot_after_train: false\nrandom_seed: 1\n")
            for barrier in (False, True):
                launch(d, solver, barrier)
                label = f"batch {batch} per rank" + (", barrier first" if barrier else "")
                results[label] = {
                    f"rank {r}": summarize(json.loads((d / f"times_{'barrier' if barrier else 'plain'}_{solver}_{r}"
                                                           ".json").read_text()), args.warmup)
                    for r in (0, 1)}
                print(label, json.dumps(results[label], indent=1), flush=True)
    report = {
        "what": (f"Caffe mnist_autoencoder (2.8 M values, 11 MB gradient), SGD momentum, 2 gloo ranks on 127.0.0.1 "
                 f"through torch's elastic launcher, 1 thread each; {args.iters} iterations, first {args.warmup} "
                 "left out; medians per iteration"),
        "machine": f"{platform.machine()} python {platform.python_version()} cpus {os.cpu_count()}",
        "load_average_at_end": os.getloadavg(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
