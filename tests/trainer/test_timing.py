"""`caffeonnx time`: Caffe's per-layer report, and layer-by-layer backward giving the net's gradients."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from caffeonnx.cli import main
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.graph_module import GraphModule
from caffeonnx.trainer.timing import time_module
from tests.helpers import assert_close, convert_text

NET = """
name: "branchy"
layer { name: "data" type: "Input" top: "data" top: "target" top: "label"
  input_param { shape { dim: 4 dim: 1 dim: 12 dim: 12 } shape { dim: 4 dim: 5 } shape { dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "xavier" } bias_filler { type: "gaussian" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip_a" type: "InnerProduct" bottom: "pool" top: "ip_a" param { name: "shared" }
  inner_product_param { num_output: 5 bias_term: false weight_filler { type: "xavier" } } }
layer { name: "ip_b" type: "InnerProduct" bottom: "pool" top: "ip_b" param { name: "shared" }
  inner_product_param { num_output: 5 bias_term: false weight_filler { type: "xavier" } } }
layer { name: "sum" type: "Eltwise" bottom: "ip_a" bottom: "ip_b" top: "sum" }
layer { name: "euclid" type: "EuclideanLoss" bottom: "sum" bottom: "target" top: "euclid" }
layer { name: "softmax" type: "SoftmaxWithLoss" bottom: "ip_a" bottom: "label" top: "softmax" loss_weight: 0.5 }
"""
SHAPES = {"data": (4, 1, 12, 12), "target": (4, 5), "label": (4,)}
LAYERS = ["data", "conv", "relu", "pool", "ip_a", "ip_b", "sum", "euclid", "softmax"]


def test_layer_by_layer_backward_gives_the_nets_gradients() -> None:
    """Cutting autograd at every layer boundary (to time each Backward alone) loses nothing: the params end
    with the gradients of one whole-net backward on the same inputs (a blob read by two layers, a shared
    weight, an in-place ReLU and two weighted losses included)."""
    converted = convert_text(NET, phase=caffe_pb2.TRAIN)
    module = GraphModule(converted.model, converted.weights)
    timing = time_module(module, SHAPES, iterations=2, seed=5)
    got = {info.name: p.grad.clone() for info, p in zip(module.param_info, module.params)}
    generator = torch.Generator().manual_seed(5)
    feeds = {name: torch.rand(shape, generator=generator) for name, shape in SHAPES.items()}
    module.zero_grad(set_to_none=True)
    module.loss(module(feeds, module.loss_outputs())).backward()
    assert set(got) == {"shared", "conv.weight", "conv.bias"}
    for info, p in zip(module.param_info, module.params):
        assert_close(got[info.name].numpy(), p.grad.numpy(), f"gradient of {info.name}", atol=1e-6, rtol=1e-5)
    times = {t.name: t for t in timing.layers}
    assert [t.name for t in timing.layers] == LAYERS
    assert times["data"].forward_ms == times["data"].backward_ms == 0.0, "random inputs: the data layer does nothing"
    for name in ("conv", "ip_a", "ip_b", "euclid", "softmax"):
        assert times[name].forward_ms > 0 and times[name].backward_ms > 0, name
    assert timing.forward_ms + timing.backward_ms <= timing.total_ms / timing.iterations


def test_cli_prints_caffes_time_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    net = tmp_path / "net.prototxt"
    net.write_text(NET)
    monkeypatch.setattr(sys, "argv", ["caffeonnx", "time", str(net), "--iterations", "3", "--threads", "1"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr().out
    assert exit_info.value.code == 0, out
    assert "TRAIN phase on cpu (1 CPU threads), 3 iterations" in out and "data 4x1x12x12, target 4x5, label 4" in out
    for name in LAYERS:
        assert re.search(rf"^ *{name}\tforward: [\d.e-]+ ms\.$", out, re.MULTILINE), f"no forward line for {name}:\n{out}"
        assert re.search(rf"^ *{name}\tbackward: [\d.e-]+ ms\.$", out, re.MULTILINE), f"no backward line for {name}:\n{out}"
    for total in ("Average Forward pass", "Average Backward pass", "Average Forward-Backward", "Total Time"):
        assert re.search(rf"^{total}: [\d.e-]+ ms\.$", out, re.MULTILINE), f"no {total!r} line:\n{out}"


def test_bad_iterations_are_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    net = tmp_path / "net.prototxt"
    net.write_text(NET)
    monkeypatch.setattr(sys, "argv", ["caffeonnx", "time", str(net), "--iterations", "0"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--iterations must be a positive number, got 0" in err, err
    assert len(err.strip().splitlines()) == 1, err
