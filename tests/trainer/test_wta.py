"""Winner-take-all sparsity: FC lifetime and CONV spatial+lifetime masks, gradients, training-only installation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from caffeonnx.converter.caffe_io import parse_prototxt, read_caffemodel
from caffeonnx.errors import CaffeOnnxError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.graph_module import GraphModule
from caffeonnx.trainer.session import TrainOptions, run_training
from caffeonnx.trainer.wta import (
    WtaSpec,
    apply_wta,
    lifetime_sparsity,
    parse_wta,
    spatial_lifetime_sparsity,
    take_wta_layers,
)
from tests.helpers import convert_text, rng


@pytest.mark.parametrize(("batch", "fraction", "k"), [(100, 0.05, 5), (40, 0.1, 4), (7, 0.01, 1)])
def test_lifetime_sparsity_keeps_each_units_k_largest_and_backpropagates_through_them(batch: int, fraction: float,
                                                                                      k: int) -> None:
    x = torch.from_numpy(rng(batch).normal(size=(batch, 30))).requires_grad_()
    y = lifetime_sparsity(x, fraction)
    y.sum().backward()
    top = torch.topk(x.detach(), k, dim=0).indices
    want = torch.zeros_like(x).scatter_(0, top, 1.0)
    assert torch.equal((y != 0).double(), want), "exactly the k largest of each unit survive"
    assert torch.equal(y[want.bool()], x.detach()[want.bool()]), "winners keep their value"
    assert torch.equal(x.grad, want), "the gradient flows through the winners only"


def test_spatial_lifetime_sparsity_keeps_one_spike_per_map_then_the_k_largest_spikes() -> None:
    x = torch.from_numpy(rng(3).normal(size=(20, 4, 5, 6))).requires_grad_()
    y = spatial_lifetime_sparsity(x, 0.25)
    y.sum().backward()
    flat = y.detach().flatten(2)
    assert ((flat != 0).sum(dim=2) <= 1).all(), "at most one value per (sample, map)"
    spikes = x.detach().flatten(2).max(dim=2).values
    kept = (flat != 0).any(dim=2)
    for c in range(4):
        top = set(torch.topk(spikes[:, c], 5).indices.tolist())
        assert set(torch.nonzero(kept[:, c]).flatten().tolist()) == top, f"map {c}: the 5 largest spikes of 20"
    assert torch.equal(x.grad, (y.detach() != 0).double())


NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 50 dim: 16 } } }
layer { name: "encode" type: "InnerProduct" bottom: "data" top: "code"
  inner_product_param { num_output: 40 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "relu" type: "ReLU" bottom: "code" top: "code" }
layer { name: "decode" type: "InnerProduct" bottom: "code" top: "recon"
  inner_product_param { num_output: 16 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "recon" bottom: "data" top: "loss" }
"""


def test_wta_applies_while_training_only_and_leaves_the_graph_alone() -> None:
    converted = convert_text(NET, phase=caffe_pb2.TRAIN)
    module = GraphModule(converted.model, converted.weights)
    nodes_before = len(module.to_converted().model.graph.node)
    assert apply_wta(module, [WtaSpec("relu", 0.1)]) == ["code"]
    x = rng(1).normal(size=(50, 16)).astype(np.float32)
    with torch.no_grad():
        sparse = module.train()({"data": x}, ["code", "loss"])
        dense = module.eval()({"data": x}, ["code", "loss"])
    assert int((sparse["code"] != 0).sum(dim=0).max()) <= 5, "at most 5 of 50 samples per unit while training"
    assert int((dense["code"] != 0).sum()) > 5 * 40, "inference codes are dense"
    assert float(sparse["loss"]) != float(dense["loss"]), "the loss sees the sparse code while training"
    assert len(module.to_converted().model.graph.node) == nodes_before, "the exported graph has no WTA"


@pytest.mark.parametrize(("text", "message"), [("relu", "expects LAYER=k%"), ("relu=0%", r"in \(0%, 100%\]"),
                                               ("relu=abc%", "expects LAYER=k%")])
def test_bad_wta_specs(text: str, message: str) -> None:
    with pytest.raises(CaffeOnnxError, match=message):
        parse_wta(text)
    assert parse_wta("relu=5%") == WtaSpec("relu", 0.05)


def test_wta_on_an_unknown_layer_names_the_layers() -> None:
    converted = convert_text(NET, phase=caffe_pb2.TRAIN)
    with pytest.raises(CaffeOnnxError, match=r"no layer named 'relu2'.*'relu'"):
        apply_wta(GraphModule(converted.model, converted.weights), [WtaSpec("relu2", 0.05)])


def test_a_wta_python_layer_in_the_prototxt_becomes_a_spec_and_leaves_the_net(tmp_path: Path) -> None:
    net_text = NET.replace('layer { name: "decode"', '''layer { name: "wta" type: "Python" bottom: "code" top: "code"
  python_param { module: "caffeonnx.wta" layer: "WinnerTakeAll" param_str: "10%" } }
layer { name: "decode"''')
    (tmp_path / "net.prototxt").write_text(net_text)
    (tmp_path / "solver.prototxt").write_text(f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.01\nlr_policy: "fixed"\n'
                                              "max_iter: 2\nsnapshot_after_train: false\n")
    np.savez(tmp_path / "d.npz", data=rng(1).normal(size=(50, 16)).astype(np.float32))
    said: list[str] = []
    run_training(TrainOptions(tmp_path / "solver.prototxt", data=str(tmp_path / "d.npz"), output=tmp_path / "o"),
                 say=said.append)
    assert "winner-take-all sparsity on 'code' while training (inference and exports stay dense)" in said
    assert "Python" not in {layer.type for layer in read_caffemodel(tmp_path / "o.caffemodel").net.layer}
    net = parse_prototxt(net_text, "<t>")
    assert take_wta_layers(net, "<t>") == [WtaSpec("relu", 0.1, 2)]
    assert [layer.name for layer in net.layer] == ["data", "encode", "relu", "decode", "loss"]


def test_a_wta_python_layer_after_a_repeated_name_pins_its_layer_by_position(tmp_path: Path) -> None:
    """Caffe allows repeated names: the WTA layer's spec is the layer that wrote its blob, not every 'encode'."""
    net_text = NET.replace('name: "relu"', 'name: "encode"').replace('layer { name: "decode"', '''layer { name: "wta"
  type: "Python" bottom: "code" top: "code" python_param { module: "caffeonnx.wta" param_str: "10%" } }
layer { name: "decode"''')
    net = parse_prototxt(net_text, "<t>")
    assert take_wta_layers(net, "<t>") == [WtaSpec("encode", 0.1, 2)]
    (tmp_path / "net.prototxt").write_text(net_text)
    (tmp_path / "solver.prototxt").write_text(f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.01\nlr_policy: "fixed"\n'
                                              "max_iter: 2\nsnapshot_after_train: false\n")
    np.savez(tmp_path / "d.npz", data=rng(1).normal(size=(50, 16)).astype(np.float32))
    said: list[str] = []
    run_training(TrainOptions(tmp_path / "solver.prototxt", data=str(tmp_path / "d.npz")), say=said.append)
    assert "winner-take-all sparsity on 'code' while training (inference and exports stay dense)" in said
    with pytest.raises(CaffeOnnxError, match="layer name 'encode' is ambiguous"):
        run_training(TrainOptions(tmp_path / "solver.prototxt", data=str(tmp_path / "d.npz"), wta=["encode=5%"]),
                     say=said.append)


def test_a_wta_python_layer_must_be_in_place() -> None:
    net = parse_prototxt(NET.replace('layer { name: "decode"', '''layer { name: "wta" type: "Python" bottom: "code"
  top: "sparse" python_param { module: "caffeonnx.wta" param_str: "5%" } }
layer { name: "decode"'''), "<t>")
    with pytest.raises(CaffeOnnxError, match="must work in place"):
        take_wta_layers(net, "<t>")


def test_conv_wta_keeps_one_spike_per_map_in_a_conv_autoencoder() -> None:
    text = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 10 dim: 1 dim: 12 dim: 12 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 5 pad: 2 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "deconv" type: "Deconvolution" bottom: "conv" top: "recon"
  convolution_param { num_output: 1 kernel_size: 5 pad: 2 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "recon" bottom: "data" top: "loss" }
"""
    converted = convert_text(text, phase=caffe_pb2.TRAIN)
    module = GraphModule(converted.model, converted.weights).train()
    apply_wta(module, [WtaSpec("relu", 0.2)])
    x = rng(4).normal(size=(10, 1, 12, 12)).astype(np.float32)
    code = module({"data": x}, ["conv"])["conv"]
    spikes = (code.detach().flatten(2) != 0).sum(dim=2)
    assert int(spikes.max()) == 1, "one value per (sample, map)"
    assert (spikes.sum(dim=0) <= 2).all(), "20% of 10 samples: at most 2 spikes per map across the batch"
    loss = module.loss(module({"data": x}, module.loss_outputs()))
    loss.backward()
    assert module.parameter("conv.weight").grad.abs().sum() > 0
