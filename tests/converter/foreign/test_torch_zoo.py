"""A model-zoo style torch net (MobileNet-like blocks) exported both ways converts to Caffe 1.0 exactly.

Covers what torch emits for common blocks: Conv+BatchNorm+ReLU6 (Clip), depthwise conv,
Hardswish, a squeeze-and-excitation gate (global pool, 1x1 convs, Hardsigmoid, broadcast Mul),
a residual Add, ceil-mode MaxPool and AvgPool(count_include_pad=False) branches joined by
Concat, PReLU, LeakyReLU, Dropout, Flatten, Linear and Softmax.  Outputs are compared with
onnxruntime (atol 1e-5, rtol 1e-4) via the Caffe -> ONNX converter and tests/caffe_numpy.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.converter.foreign.helpers import check_conversion, layer_types
from tests.converter.foreign.test_torch_models import EXPORTERS, _export, _model


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // 2, 1)
        self.expand = nn.Conv2d(channels // 2, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = nn.functional.adaptive_avg_pool2d(x, 1)
        gate = nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(gate))))
        return x * gate


class ZooNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.Hardswish())
        self.se = SqueezeExcite(8)
        self.max_branch = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.avg_branch = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.prelu = nn.PReLU(16)
        self.head = nn.Sequential(nn.LeakyReLU(0.1), nn.Dropout(0.2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = self.stem(x)
        y = self.se(self.depthwise(stem)) + stem
        y = self.prelu(torch.cat([self.max_branch(y), self.avg_branch(y)], dim=1))
        return torch.softmax(self.head(y), dim=1)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_zoo_style_net(dynamo: bool, tmp_path: Path) -> None:
    x = torch.from_numpy(np.random.default_rng(5).standard_normal((2, 3, 16, 16), dtype=np.float32) * 2)
    model = _export(_model(ZooNet, 5), x, tmp_path / "zoo.onnx", dynamo, dynamic_batch=False)
    result = check_conversion(model, {"x": x.numpy()}, tmp_path)
    types = set(layer_types(result))
    assert {"Convolution", "Pooling", "Concat", "PReLU", "InnerProduct", "Softmax"} <= types, types
