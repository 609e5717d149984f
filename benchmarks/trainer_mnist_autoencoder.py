"""Throughput of Caffe's mnist_autoencoder (784-1000-500-250-30, batch 100, SGD) trained by caffeonnx
versus a plain torch eager loop of the same net, in the same process, on the same MNIST batches.

Rounds alternate between the two loops so machine load hits both alike; each round times
`--iters` iterations after a short warm-up.  Writes benchmarks/results/trainer_mnist_autoencoder.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from caffeonnx.converter.caffe_io import parse_prototxt
from caffeonnx.converter.caffe_to_onnx import convert_net
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.converter.upgrade import upgrade_net
from caffeonnx.proto import caffe_pb2
from caffeonnx.runtime.inputs import open_samples
from caffeonnx.trainer.data import BatchSource
from caffeonnx.trainer.graph_module import GraphModule
from caffeonnx.trainer.loop import Trainer

ROOT = Path(__file__).resolve().parent
MNIST = ROOT.parent.parent / "shared" / "data" / "mnist" / "train-images-idx3-ubyte.gz"
SIZES = [784, 1000, 500, 250, 30]


def autoencoder_prototxt(batch: int) -> str:
    """Caffe's examples/mnist autoencoder layout: sigmoid encoder, linear 30-d code, mirrored decoder."""
    def ip(name: str, bottom: str, n: int) -> str:
        return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" '
                'param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 1 decay_mult: 0 } '
                f'inner_product_param {{ num_output: {n} weight_filler {{ type: "gaussian" std: 1 sparse: 15 }} '
                'bias_filler { type: "constant" value: 0 } } }\n')

    def sig(name: str) -> str:
        return f'layer {{ name: "{name}neuron" type: "Sigmoid" bottom: "{name}" top: "{name}neuron" }}\n'

    text = f'name: "MNISTAutoencoder"\nlayer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: {batch} dim: 784 }} }} }}\n'
    bottom = "data"
    for i, n in enumerate(SIZES[1:], start=1):
        text += ip(f"encode{i}", bottom, n)
        bottom = f"encode{i}"
        if i < 4:
            text += sig(bottom)
            bottom += "neuron"
    for i, n in zip((4, 3, 2, 1), reversed(SIZES[:-1])):
        text += ip(f"decode{i}", bottom, n)
        bottom = f"decode{i}"
        if i > 1:
            text += sig(bottom)
            bottom += "neuron"
    text += ('layer { name: "loss" type: "SigmoidCrossEntropyLoss" bottom: "decode1" bottom: "data" '
             'top: "cross_entropy_loss" loss_weight: 1 }\n'
             'layer { name: "decode1neuron" type: "Sigmoid" bottom: "decode1" top: "decode1neuron" }\n'
             'layer { name: "loss2" type: "EuclideanLoss" bottom: "decode1neuron" bottom: "data" '
             'top: "l2_error" loss_weight: 0 }\n')
    return text


SOLVER = caffe_pb2.SolverParameter(base_lr=0.01, lr_policy="step", gamma=0.1, stepsize=10000, momentum=0.9,
                                   weight_decay=0.0005, max_iter=65000)


def plain_net() -> tuple[nn.Sequential, torch.optim.Optimizer]:
    """Caffe's mnist_autoencoder as nn.Linear/nn.Sigmoid with torch.optim.SGD (momentum 0.9, L2 on the weights)."""
    layers: list[nn.Module] = []
    dims = SIZES + SIZES[-2::-1]
    for k, (a, b) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(a, b))
        if k not in (3, 7):
            layers.append(nn.Sigmoid())
    net = nn.Sequential(*layers)
    weights = [m.weight for m in net if isinstance(m, nn.Linear)]
    biases = [m.bias for m in net if isinstance(m, nn.Linear)]
    opt = torch.optim.SGD([{"params": weights, "weight_decay": 0.0005}, {"params": biases, "weight_decay": 0.0}],
                          lr=0.01, momentum=0.9)
    return net, opt


def plain_torch(module: GraphModule) -> tuple[nn.Module, torch.optim.Optimizer]:
    """`plain_net` starting from `module`'s weights."""
    net, opt = plain_net()
    linears = [m for m in net if isinstance(m, nn.Linear)]
    for k, lin in enumerate(linears):
        name = f"encode{k + 1}" if k < 4 else f"decode{8 - k}"
        with torch.no_grad():
            lin.weight.copy_(module.parameter(f"{name}.weight"))
            lin.bias.copy_(module.parameter(f"{name}.bias"))
    return net, opt


def eager_loop(module: GraphModule, source: BatchSource, batch: int,
               device: torch.device | str = "cpu") -> Callable[[int], None]:
    """`run(n)`: n iterations of the plain torch loop (a `plain_torch` copy of `module`) on `source`'s batches."""
    eager, opt = plain_torch(module)
    eager.to(device)
    bce = nn.BCEWithLogitsLoss(reduction="sum")
    state = {"batch": 0}

    def run(n: int) -> None:
        for _ in range(n):
            data = torch.from_numpy(source.batch(state["batch"])["data"]).to(device)
            state["batch"] += 1
            opt.zero_grad()
            loss = bce(eager(data), data) / batch
            loss.backward()
            float(loss.detach())
            opt.step()

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "trainer_mnist_autoencoder.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    with open_samples(MNIST, scratch_dir="/tmp") as images:
        x = (np.asarray(images[:6000], dtype=np.float32) / 255.0).reshape(-1, 784)
    net = upgrade_net(parse_prototxt(autoencoder_prototxt(args.batch), "mnist_autoencoder"))
    converted = convert_net(net, None, ConvertOptions(phase=caffe_pb2.TRAIN, seed=0), "mnist_autoencoder")
    module = GraphModule(converted.model, converted.weights)
    source = BatchSource({"data": x}, {"data": (args.batch, 784)})
    trainer = Trainer(module, SOLVER, source)
    eager_iters = eager_loop(module, source, args.batch)

    def caffeonnx_iters(n: int) -> None:
        trainer.step(n)

    runs: dict[str, list[float]] = {"caffeonnx": [], "torch_eager": []}
    for _ in range(args.rounds):
        for name, fn in (("caffeonnx", caffeonnx_iters), ("torch_eager", eager_iters)):
            fn(3)
            t0 = time.perf_counter()
            fn(args.iters)
            runs[name].append(args.iters * args.batch / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "net": "Caffe mnist_autoencoder 784-1000-500-250-30 (sigmoid, linear code, mirrored decoder), batch "
               f"{args.batch}, SGD momentum 0.9 weight_decay 5e-4",
        "machine": f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()} torch "
                   f"{torch.__version__} threads {torch.get_num_threads()}",
        "device": "cpu",
        "iters_per_round": args.iters,
        "samples_per_s": runs,
        "median_samples_per_s": med,
        "ratio_caffeonnx_over_eager": med["caffeonnx"] / med["torch_eager"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
