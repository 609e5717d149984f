"""Training speed by torch intra-op thread count, on an idle machine and under load.

The bundled tied autoencoder (caffeonnx/examples/tied_ae: 784-64-784, batch 100, SGD) and the
same net widened to 1000 hidden units are trained for `--iters` iterations on the bundled MNIST
subset, each with 1 thread, with torch's default thread count, and with the count `caffeonnx
train` chooses (`default_threads`: torch's count less the CPUs busy elsewhere).  "Loaded" runs
start one busy-loop process per CPU the benchmark may use (a machine shared with other jobs);
rounds alternate the settings so a change in the machine hits them alike.  Ratios are to the
1-thread run of the same round.  Writes benchmarks/results/train_threads.{json,md}.

    python benchmarks/train_threads.py --iters 200 --reps 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from caffeonnx.demo import example_dir, mnist_scaled
from caffeonnx.trainer.commands import busy_cpus, default_threads
from caffeonnx.trainer.session import TrainOptions, run_training

ROOT = Path(__file__).resolve().parent
CASES = {"tied_ae_784_64": 64, "tied_ae_784_1000": 1000}
DECISION = """## The default of `caffeonnx train --threads`

torch's default (one thread per core) collapses as soon as other processes keep the cores
busy: its threads meet at a barrier in every parallel kernel, and a thread that is not
scheduled holds all the others.  In the recorded run it was 4-12x slower than 1 thread
under the load generator, and as slow in most "idle" rounds too, where other jobs took the
CPUs during the round.  With the CPUs really free, 2 threads were 1.1x (784-64) and 1.5x
(784-1000) faster than 1.  So the win of more threads is modest and the loss large, but
only when the cores are taken: `caffeonnx train` (and `caffeonnx time`) sample /proc/stat
for 0.1 s at the start and use torch's thread count less the CPUs other processes keep
busy, at least 1 (`default_threads` in caffeonnx/trainer/commands.py): every core on a
free machine, 1 thread on a loaded one.  Load that arrives after the start is not seen;
on a shared machine pass `--threads 1`.  `--threads N` always overrides the default.
"""


def case_solver(workdir: Path, hidden: int) -> Path:
    """The bundled solver and train net with `hidden` code units (fillers start it: no caffemodel needed)."""
    ex = example_dir()
    net = (ex / "train.prototxt").read_text().replace("num_output: 64", f"num_output: {hidden}")
    (workdir / f"train_{hidden}.prototxt").write_text(net)
    solver = (ex / "solver.prototxt").read_text().replace('net: "train.prototxt"',
                                                           f'net: "{workdir / f"train_{hidden}.prototxt"}"')
    path = workdir / f"solver_{hidden}.prototxt"
    path.write_text(solver)
    return path


def train_seconds(solver: Path, data: Path, threads: int, iters: int) -> float:
    """Seconds of the training loop alone (setup excluded) for `iters` iterations at `threads` threads."""
    result = run_training(TrainOptions(solver, data=str(data), max_iter=iters, pictures=False, device="cpu",
                                       threads=threads), say=lambda _: None)
    return result.seconds


def wait_quiet(limit_s: float, busy_below: float = 0.3) -> float:
    """Wait (up to `limit_s`) until other processes keep fewer than `busy_below` CPUs busy; returns the last reading."""
    deadline = time.monotonic() + limit_s
    busy = busy_cpus(0.5)
    while busy >= busy_below and time.monotonic() < deadline:
        busy = busy_cpus(0.5)
    return busy


def start_load() -> list[subprocess.Popen]:
    """One busy-loop process per CPU this process may run on."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in os.sched_getaffinity(0)]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "train_threads.json")
    parser.add_argument("--wait-quiet", type=float, default=120.0,
                        help="Seconds an idle round may wait for other jobs to leave the CPUs alone.")
    args = parser.parse_args()
    default = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = workdir / "mnist.npz"
        np.savez(data, data=mnist_scaled(example_dir("mnist_subset") / "train-images-idx3-ubyte.gz", workdir))
        solvers = {name: case_solver(workdir, hidden) for name, hidden in CASES.items()}
        for solver in solvers.values():  # warm-up: imports, allocator, oneDNN kernels
            train_seconds(solver, data, 1, 10)
        for load in ("idle", "loaded"):
            procs = start_load() if load == "loaded" else []
            try:
                for rep in range(args.reps):
                    for name, solver in solvers.items():
                        busy = wait_quiet(args.wait_quiet) if load == "idle" else busy_cpus(0.5)
                        auto = default_threads()  # what `caffeonnx train` would pick right now
                        counts = {"1 thread": 1, f"torch default ({default})": default, f"chosen ({auto})": auto}
                        order = list(counts) if rep % 2 == 0 else list(counts)[::-1]
                        seconds = {k: train_seconds(solver, data, counts[k], args.iters) for k in order}
                        rows.append({"load": load, "case": name, "rep": rep, "busy_cpus_before": round(busy, 2),
                                     "chosen_threads": auto, "seconds": {k: seconds[k] for k in counts}})
                        print(load, name, rep, {k: f"{v:.2f}" for k, v in rows[-1]["seconds"].items()}, flush=True)
            finally:
                stop_load(procs)
    summary = {}
    for load in ("idle", "loaded"):
        for name in CASES:
            mine = [r for r in rows if r["load"] == load and r["case"] == name]
            keys = ["1 thread", f"torch default ({default})", "chosen"]
            vals = [[list(r["seconds"].values())[i] for r in mine] for i in range(3)]
            summary[f"{load}/{name}"] = {
                "seconds": {k: statistics.median(v) for k, v in zip(keys, vals)},
                "over_1_thread": {k: statistics.median(a / b for a, b in zip(v, vals[0])) for k, v in zip(keys, vals)},
                "chosen_threads": sorted({r["chosen_threads"] for r in mine}),
                "busy_cpus_before": statistics.median(r["busy_cpus_before"] for r in mine),
            }
    result = {"iters": args.iters, "reps": args.reps, "torch_default_threads": default,
              "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
              "load_processes": len(os.sched_getaffinity(0)), "torch": torch.__version__,
              "machine": platform.machine(), "summary": summary, "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    lines = [(f"| load | busy CPUs before | net | 1 thread (s) | default {default} threads (s) | default / 1 | chosen threads | "
              "chosen (s) | chosen / 1 |"), "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for key, s in summary.items():
        load, name = key.split("/")
        sec, ratio = list(s["seconds"].values()), list(s["over_1_thread"].values())
        lines.append(f"| {load} | {s['busy_cpus_before']:.1f} | {name} | {sec[0]:.2f} | {sec[1]:.2f} | {ratio[1]:.2f} | "
                     f"{', '.join(map(str, s['chosen_threads']))} | {sec[2]:.2f} | {ratio[2]:.2f} |")
    table = "\n".join(lines)
    print(table)
    args.output.with_suffix(".md").write_text(
        f"# Training threads: {args.iters} iterations, median of {args.reps} alternating rounds\n\n"
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch's default {default} threads; written by "
        "benchmarks/train_threads.py. \"idle\": no load generator; each round first waits up to --wait-quiet s "
        "for other jobs to leave the CPUs (the .json has the busy CPUs measured before each round); "
        "\"loaded\": one busy-loop process per CPU.\n\n" + table + "\n\n" + DECISION)


if __name__ == "__main__":
    main()
