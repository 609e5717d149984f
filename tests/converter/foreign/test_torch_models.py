"""Acceptance: torch models exported with torch.onnx.export become Caffe nets that compute the same outputs.

Each model is exported with the TorchScript exporter (dynamo=False) and with the default
torch.export-based one (needs onnxscript), converted to a prototxt + caffemodel, and its
outputs are compared with onnxruntime on the exported ONNX (atol 1e-5, rtol 1e-4) via
caffeonnx's Caffe -> ONNX converter and via tests/caffe_numpy.py.
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from tests.converter.foreign.helpers import check_conversion

EXPORTERS = [
    pytest.param(False, id="torchscript"),
    pytest.param(True, id="dynamo", marks=pytest.mark.skipif(
        importlib.util.find_spec("onnxscript") is None, reason="the dynamo exporter needs onnxscript")),
]


class TiedAE(nn.Module):
    """Encoder Linear; the decoder multiplies by the encoder's weight transposed (a tied autoencoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(20, 8)
        self.decoder_bias = nn.Parameter(torch.randn(20) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = torch.sigmoid(self.encoder(x))
        return torch.sigmoid(nn.functional.linear(code, self.encoder.weight.t(), self.decoder_bias))


class ConvAE(nn.Module):
    """Conv, MaxPool with padding, ConvTranspose with stride 2 and output_padding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.deconv = nn.ConvTranspose2d(6, 2, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.deconv(torch.relu(self.pool(self.conv(x)))))


class Classifier(nn.Module):
    """Conv + BatchNorm2d, ceil-mode average pooling, size-driven reshapes, Linear + BatchNorm1d, Flatten, Softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 6 * 6, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(torch.relu(self.conv(x)))
        y = nn.functional.avg_pool2d(y, 2, ceil_mode=True)
        y = y.reshape(y.size(0), y.size(1), -1)
        y = y.view(y.size(0), -1)
        y = self.bn1(self.fc(y))
        return torch.softmax(self.out(torch.flatten(y, 1)), dim=1)


def _randomise_batch_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Distinct, non-trivial BN statistics and affine params (defaults of 0/1 would hide mix-ups)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.2)


def _export(model: nn.Module, x: torch.Tensor, path: Path, dynamo: bool, dynamic_batch: bool) -> onnx.ModelProto:
    kwargs: dict = {"input_names": ["x"], "output_names": ["y"]}
    if dynamic_batch:
        if dynamo:
            kwargs["dynamic_shapes"] = {"x": {0: torch.export.Dim("batch")}}
        else:
            kwargs["dynamic_axes"] = {"x": {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=dynamo, **kwargs)
    return onnx.load(path)


def _model(cls: type[nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = cls()
    _randomise_batch_norms(model, torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_tied_autoencoder_keeps_one_shared_transposed_weight(dynamo: bool, tmp_path: Path) -> None:
    x = torch.from_numpy(np.random.default_rng(0).random((4, 20), dtype=np.float32))
    model = _export(_model(TiedAE, 0), x, tmp_path / "tied.onnx", dynamo, dynamic_batch=False)
    result = check_conversion(model, {"x": x.numpy()}, tmp_path)
    ips = [lay for lay in result.net.layer if lay.type == "InnerProduct"]
    assert len(ips) == 2, [lay.type for lay in result.net.layer]
    encoder, decoder = ips
    names = {spec.name for lay in ips for spec in lay.param if spec.name}
    assert names == {"encoder.weight"}, f"shared param names {names}"
    assert encoder.param[0].name == decoder.param[0].name == "encoder.weight"
    assert not encoder.inner_product_param.transpose and decoder.inner_product_param.transpose
    assert all(len(lay.param) == 1 for lay in ips), "only the weight is shared (biases differ)"
    enc_w, dec_w = result.blobs[encoder.name][0], result.blobs[decoder.name][0]
    assert enc_w.shape == dec_w.shape == (8, 20) and np.array_equal(enc_w, dec_w)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_conv_autoencoder(dynamo: bool, tmp_path: Path) -> None:
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 2, 9, 9), dtype=np.float32))
    model = _export(_model(ConvAE, 1), x, tmp_path / "conv_ae.onnx", dynamo, dynamic_batch=False)
    result = check_conversion(model, {"x": x.numpy()}, tmp_path)
    types = [lay.type for lay in result.net.layer]
    assert {"Convolution", "Pooling", "Deconvolution"} <= set(types), types


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_classifier_with_batch_norm_and_reshape_chains(dynamo: bool, tmp_path: Path) -> None:
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((3, 3, 13, 13), dtype=np.float32))
    model = _export(_model(Classifier, 2), x, tmp_path / "clf.onnx", dynamo, dynamic_batch=True)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param, "the export should have a dynamic batch"
    ops = {node.op_type for node in model.graph.node}
    assert "BatchNormalization" in ops, ops
    if not dynamo:  # the TorchScript exporter computes the reshape targets from Shape -> Gather -> Concat chains
        assert {"Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "Flatten"} <= ops, ops
    result = check_conversion(model, {"x": x.numpy()}, tmp_path, batch=3)
    types = [lay.type for lay in result.net.layer]
    assert types.count("BatchNorm") == sum(node.op_type == "BatchNormalization" for node in model.graph.node), types
    assert "Reshape" in types, types
    assert result.net.layer[0].input_param.shape[0].dim == [3, 3, 13, 13]
