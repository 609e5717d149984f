"""`caffeonnx test`: Caffe's `caffe test -model NET -weights W -iterations N`.

As tools/caffe.cpp's test(): the TEST-phase net (with the given stages and level) reads its
own data layers (or --data), runs N forward passes, and reports every output blob per batch
and averaged over the N batches, with the loss (Σ loss_weight·output) averaged too.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from caffeonnx.converter.caffe_io import read_prototxt
from caffeonnx.converter.upgrade import upgrade_net
from caffeonnx.errors import CaffeOnnxError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.build import TrainNet, build_module, read_weights
from caffeonnx.trainer.session import _data_source, pick_device

Say = Callable[[str], None]


@dataclass
class TestReport:
    """What `caffe test` logs: each batch's outputs, their means and the mean loss."""

    __test__ = False  # not a pytest test class

    batches: list[dict[str, float]] = field(default_factory=list)
    means: dict[str, float] = field(default_factory=dict)
    loss_weights: dict[str, float] = field(default_factory=dict)
    loss: float = 0.0


def run_test(model: str | os.PathLike[str], weights: str | os.PathLike[str] | None = None, iterations: int = 50,
             stages: Sequence[str] = (), level: int = 0, data: str | None = None, device: str = "auto",
             say: Say = print) -> TestReport:
    """Score a net on its TEST-phase data for `iterations` batches, as `caffe test` does."""
    if iterations < 1:
        raise CaffeOnnxError(f"--iterations must be at least 1, got {iterations}")
    path = Path(model)
    net = upgrade_net(read_prototxt(path), str(path))
    state = caffe_pb2.NetState(phase=caffe_pb2.TEST, level=level,
                               stage=list(dict.fromkeys([*net.state.stage, *stages])))
    tn = TrainNet(net, str(path), state)
    module = build_module(tn, read_weights(weights) if weights is not None else None, seed=0,
                          phase=caffe_pb2.TEST)
    for note in tn.notes:
        say(f"note: {note}")
    source = _data_source(data, module, tn, "test", say)
    module.to(pick_device(device)).eval()
    report = TestReport(loss_weights={t.value: t.weight for t in module.loss_terms})
    say(f"Running for {iterations} iterations.")
    sums: dict[str, float] = {}
    with torch.no_grad():
        for i in range(iterations):
            values = module(source.batch(i), module.output_names)
            scores = {name: float(v.double().mean()) for name, v in values.items()}
            report.batches.append(scores)
            if module.loss_terms:
                report.loss += float(module.loss(values))
            for name, score in scores.items():
                sums[name] = sums.get(name, 0.0) + score
                say(f"Batch {i}, {name} = {score:.6g}")
    report.loss /= iterations
    report.means = {name: total / iterations for name, total in sums.items()}
    say(f"Loss: {report.loss:.6g}")
    for name, mean in report.means.items():
        weight = report.loss_weights.get(name)
        say(f"{name} = {mean:.6g}" + (f" (* {weight:g} = {weight * mean:.6g} loss)" if weight else ""))
    return report
