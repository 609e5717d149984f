"""`caffeonnx time`: Caffe's `caffe time` — per-layer forward and backward time of a net's TRAIN phase.

Caffe times each layer's Forward, then each layer's Backward in reverse order, averaged over
`-iterations`.  Here the net's GraphModule runs step by step: every step (an ONNX node, or a
TRAIN-phase layer forward) belongs to the Caffe layer that emitted it, and a value passed from
one layer to another is cut from the autograd graph at the boundary, so that each layer's
backward is its own `torch.autograd.backward` call, as Caffe's Layer::Backward is its own call.
Inputs are random (uniform in [0, 1); Caffe's own `time` reads the net's data layers).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from caffeonnx.converter.caffe_io import read_prototxt
from caffeonnx.converter.upgrade import upgrade_net
from caffeonnx.errors import CaffeOnnxError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.build import TrainNet, build_module
from caffeonnx.trainer.data import input_shapes
from caffeonnx.trainer.graph_module import GraphModule


@dataclass
class LayerTime:
    """One Caffe layer's average forward and backward time."""

    name: str
    type: str
    forward_ms: float = 0.0
    backward_ms: float = 0.0


@dataclass
class Timing:
    """What `caffeonnx time` measured (averages per iteration, in milliseconds)."""

    layers: list[LayerTime]
    iterations: int
    input_shapes: dict[str, tuple[int, ...]]
    device: str
    total_ms: float = 0.0  # wall time of all iterations (Caffe's "Total Time")
    per_iteration_ms: list[float] = field(default_factory=list)

    @property
    def forward_ms(self) -> float:
        """Caffe's "Average Forward pass": the layers' forward times added up."""
        return sum(t.forward_ms for t in self.layers)

    @property
    def backward_ms(self) -> float:
        """Caffe's "Average Backward pass"."""
        return sum(t.backward_ms for t in self.layers)

    def lines(self) -> list[str]:
        """The report in `caffe time`'s wording."""
        out = ["Average time per layer: "]
        for t in self.layers:
            out.append(f"{t.name:>10}\tforward: {t.forward_ms:.6g} ms.")
            out.append(f"{t.name:>10}\tbackward: {t.backward_ms:.6g} ms.")
        out += [f"Average Forward pass: {self.forward_ms:.6g} ms.",
                f"Average Backward pass: {self.backward_ms:.6g} ms.",
                f"Average Forward-Backward: {self.total_ms / self.iterations:.6g} ms.",
                f"Total Time: {self.total_ms:.6g} ms."]
        return out


def _owners(module: GraphModule) -> dict[str, int]:
    """ONNX value -> position (in module.records) of the Caffe layer whose node or TRAIN forward computes it.

    A layer's nodes are named after it (`conv1`, `conv1/Reshape`); names may repeat in Caffe, so
    among layers of one name the node goes to the first one not before the previous node's layer.
    """
    by_name: dict[str, list[int]] = {}
    for k, rec in enumerate(module.records):
        by_name.setdefault(rec.name, []).append(k)
    owner = {top: k for k, rec in enumerate(module.records) for top in rec.tops}
    cursor = 0
    for node in module.skeleton.graph.node:
        name = node.name
        while name not in by_name and "/" in name:
            name = name.rsplit("/", 1)[0]
        if name not in by_name:
            continue
        cursor = next((k for k in by_name[name] if k >= cursor), by_name[name][-1])
        for out in node.output:
            owner.setdefault(out, cursor)
    return owner


class _Clock:
    """Wall-clock milliseconds that wait for the device's queued work (CUDA kernels run asynchronously)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() * 1000.0


def time_module(module: GraphModule, shapes: dict[str, tuple[int, ...]], iterations: int = 50,
                seed: int = 0) -> Timing:
    """Average per-layer forward/backward times of `module` (TRAIN mode) over `iterations`, after one warm-up.

    The inputs are drawn once from torch.rand (seeded) in the order of `shapes`; the params keep the
    last iteration's gradients.
    """
    if iterations < 1:
        raise CaffeOnnxError(f"--iterations must be a positive number, got {iterations}")
    device = module.device
    clock = _Clock(device)
    outputs = tuple(module.loss_outputs() or module.output_names)
    weights = {term.value: term.weight for term in module.loss_terms}
    owner = _owners(module)
    module.train()
    plan = module._plan(outputs, True, frozenset())  # the steps module.forward would run, in order
    generator = torch.Generator().manual_seed(seed)
    feeds = {name: torch.rand(shape, generator=generator).to(device) for name, shape in shapes.items()}
    constants = {name: module.get_buffer(key) for name, key in module._const_keys}
    params = {info.name: p for info, p in zip(module.param_info, module.params)}
    totals = [LayerTime(rec.name, rec.type) for rec in module.records]

    def iteration(record: bool) -> None:
        for p in module.params:  # Caffe's ClearParamDiffs (untimed); the last iteration's diffs stay for a look
            p.grad = None
        env: dict[str, Tensor] = {**constants, **params, **feeds}
        cut: dict[str, Tensor] = {}  # values crossing a layer boundary, as autograd leaves of their consumers
        produced: dict[int, list[str]] = {}  # layer -> the values its steps computed, layers in forward order
        for step, _ in plan:
            k = owner.get(next(o for o in step.outputs if o), -1)
            args = []
            for n in step.inputs:
                if n and owner.get(n, k) != k:
                    if n not in cut:
                        value = env[n]
                        cut[n] = value.detach().requires_grad_() if value.requires_grad else value
                    args.append(cut[n])
                else:
                    args.append(env[n] if n else None)
            start = clock.now()
            out = step.kernel(*args)
            spent = clock.now() - start
            if record and k >= 0:
                totals[k].forward_ms += spent
            for name, value in zip(step.outputs, out if isinstance(out, tuple) else (out,)):
                if name:
                    env[name] = value
                    produced.setdefault(k, []).append(name)
        for k, names in reversed(produced.items()):  # Caffe's Backward: top layer first, each layer on its own
            tensors, grads = [], []
            for name in names:
                value = env[name]
                grad = cut[name].grad if name in cut else None
                if name in weights:  # a loss top: its diff is the loss weight (plus any consumer's)
                    grad = torch.full_like(value, weights[name]) + (grad if grad is not None else 0)
                if grad is not None and value.requires_grad:
                    tensors.append(value)
                    grads.append(grad)
            if not tensors:
                continue
            start = clock.now()
            torch.autograd.backward(tensors, grads)
            spent = clock.now() - start
            if record and k >= 0:
                totals[k].backward_ms += spent

    iteration(record=False)  # Caffe's time runs one Forward/Backward first too (memory, kernel selection)
    per_iteration = []
    begin = clock.now()
    for _ in range(iterations):
        start = clock.now()
        iteration(record=True)
        per_iteration.append(clock.now() - start)
    total = clock.now() - begin
    for t in totals:
        t.forward_ms /= iterations
        t.backward_ms /= iterations
    return Timing(totals, iterations, shapes, str(device), total, per_iteration)


def time_net(path: str | os.PathLike[str], iterations: int = 50, device: str = "cpu",
             phase: int = caffe_pb2.TRAIN) -> Timing:
    """`caffe time -model PATH -iterations N`: the net of a prototxt, its fillers, random inputs of its shapes."""
    source = str(path)
    net = upgrade_net(read_prototxt(Path(path)), source)
    state = caffe_pb2.NetState(phase=phase)
    state.MergeFrom(net.state)
    module = build_module(TrainNet(net, source, state), None, seed=0, phase=phase)
    needed = module.required_inputs(list(module.loss_outputs() or module.output_names))
    layers = [layer for layer in module.caffe_layers if layer is not None]
    shapes = input_shapes({n: module.input_dims[n] for n in needed}, layers)
    module.to(torch.device(device))
    return time_module(module, shapes, iterations)
