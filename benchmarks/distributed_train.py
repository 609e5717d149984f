"""Training samples/s of one process against 2 torchrun ranks (gloo, loopback) on this machine.

Caffe's mnist_autoencoder (784-1000-500-250-30, SGD, momentum) on MNIST, batch 100 per pass, the same
work per update in every setup (200 samples): one process with iter_size 2 at 1 and at every thread,
and 2 ranks of batch 100 (`--shard contiguous`, 1 thread each, as torchrun sets OMP_NUM_THREADS=1).
Times are the training loop's own (the `trained N iteration(s) in S s` line), not process start-up.
Rounds alternate the setups.  Writes benchmarks/results/distributed_train.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from trainer_mnist_autoencoder import autoencoder_prototxt

from caffeonnx.runtime.inputs import open_samples

ROOT = Path(__file__).resolve().parent
MNIST = ROOT.parent.parent / "shared" / "data" / "mnist" / "train-images-idx3-ubyte.gz"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _seconds(stderr: str) -> float:
    found = re.search(r"trained \d+ iteration\(s\) in ([0-9.]+)s", stderr)
    if found is None:
        raise RuntimeError(f"no training summary in:\n{stderr[-3000:]}")
    return float(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "distributed_train.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "net.prototxt").write_text(autoencoder_prototxt(100))
        with open_samples(MNIST, scratch_dir=tmp) as images:
            np.savez(d / "data.npz", data=(np.asarray(images[:6000], dtype=np.float32) / 255).reshape(-1, 784))
        for name, iter_size in (("one", 2), ("ranks", 1)):
            (d / f"{name}.prototxt").write_text(
                f'net: "net.prototxt"\nbase_lr: 0.01\nmomentum: 0.9\nweight_decay: 0.0005\nlr_policy: "fixed"\n'
                f"max_iter: {args.iters}\niter_size: {iter_size}\nsnapshot_after_train: false\nrandom_seed: 1\n")
        common = ["--data", "data.npz", "--no-png", "-q", "--device", "cpu"]
        setups = {
            "1 process, iter_size 2, 1 thread": [sys.executable, "-m", "caffeonnx", "train", "one.prototxt", *common,
                                                  "--threads", "1"],
            f"1 process, iter_size 2, {os.cpu_count()} threads": [sys.executable, "-m", "caffeonnx", "train",
                                                                  "one.prototxt", *common, "--threads",
                                                                  str(os.cpu_count())],
            "2 ranks (gloo), batch 100 each, 1 thread each": None,
        }
        runs: dict[str, list[float]] = {k: [] for k in setups}
        for _ in range(args.rounds):
            for label, cmd in setups.items():
                if cmd is None:
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(_port()), "-m", "caffeonnx", "train", "ranks.prototxt",
                           *common, "--shard", "contiguous"]
                res = subprocess.run(cmd, cwd=d, capture_output=True, text=True, timeout=900, check=True)
                runs[label].append(args.iters * 200 / _seconds(res.stderr))
    med = {k: statistics.median(v) for k, v in runs.items()}
    base = med["1 process, iter_size 2, 1 thread"]
    result = {
        "what": f"Caffe mnist_autoencoder, {args.iters} updates of 200 samples (2 passes of 100), SGD momentum",
        "machine": f"{platform.machine()} python {platform.python_version()} cpus {os.cpu_count()}",
        "samples_per_s": runs,
        "median_samples_per_s": med,
        "ratio_over_one_process_one_thread": {k: v / base for k, v in med.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
