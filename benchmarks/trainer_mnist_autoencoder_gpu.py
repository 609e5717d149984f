"""Issue 4 (c): benchmark (a) on a GPU: Caffe's mnist_autoencoder (784-1000-500-250-30, SGD) trained by
caffeonnx's Caffe-exact trainer versus a plain torch eager loop of the same net, both on CUDA, same process.

Same nets, solver and alternating rounds as trainer_mnist_autoencoder.py (whose definitions it reuses); the
data is the bundled MNIST subset (examples/mnist_subset, 2,000 images, cycled: throughput does not depend on
which images) so the script runs on a GPU machine that has no copy of the full set.  Both loops read their
batches from host memory, as `caffeonnx train` does.  Writes results/trainer_mnist_autoencoder_gpu.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from trainer_mnist_autoencoder import SOLVER, autoencoder_prototxt, eager_loop

from caffeonnx.converter.caffe_io import parse_prototxt
from caffeonnx.converter.caffe_to_onnx import convert_net
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.converter.upgrade import upgrade_net
from caffeonnx.demo import example_dir
from caffeonnx.proto import caffe_pb2
from caffeonnx.runtime.inputs import open_samples
from caffeonnx.trainer.data import BatchSource
from caffeonnx.trainer.graph_module import GraphModule
from caffeonnx.trainer.loop import Trainer

ROOT = Path(__file__).resolve().parent


def measure(batch: int, x: np.ndarray, device: torch.device, iters: int, rounds: int) -> dict:
    """samples/s of both loops at `batch`, in alternating rounds of `iters` iterations after a warm-up."""
    torch.manual_seed(0)
    net = upgrade_net(parse_prototxt(autoencoder_prototxt(batch), "mnist_autoencoder"))
    converted = convert_net(net, None, ConvertOptions(phase=caffe_pb2.TRAIN, seed=0), "mnist_autoencoder")
    module = GraphModule(converted.model, converted.weights).to(device)
    source = BatchSource({"data": x}, {"data": (batch, 784)})
    trainer = Trainer(module, SOLVER, source)
    eager_iters = eager_loop(module, source, batch, device)

    runs: dict[str, list[float]] = {"caffeonnx": [], "torch_eager": []}
    for _ in range(rounds):
        for name, fn in (("caffeonnx", trainer.step), ("torch_eager", eager_iters)):
            fn(10)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(iters)
            torch.cuda.synchronize()
            runs[name].append(iters * batch / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"samples_per_s": runs, "median_samples_per_s": med,
            "ratio_caffeonnx_over_eager": med["caffeonnx"] / med["torch_eager"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", default="100,1000", help="comma-separated batch sizes (100: Caffe's example)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "trainer_mnist_autoencoder_gpu.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark measures the GPU (see trainer_mnist_autoencoder.py for CPU)")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # both loops in float32, as Caffe computes
    with open_samples(example_dir("mnist_subset") / "train-images-idx3-ubyte.gz", scratch_dir="/tmp") as images:
        x = (np.asarray(images[:], dtype=np.float32) / 255.0).reshape(-1, 784)
    results = {b: measure(int(b), x, device, args.iters, args.rounds) for b in args.batches.split(",")}
    report = {
        "net": "Caffe mnist_autoencoder 784-1000-500-250-30 (sigmoid, linear code, mirrored decoder), SGD momentum "
               "0.9 weight_decay 5e-4; float32 (TF32 off)",
        "device": torch.cuda.get_device_name(),
        "machine": f"{platform.machine()} python {platform.python_version()} torch {torch.__version__}",
        "iters_per_round": args.iters, "rounds": args.rounds, "by_batch": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
