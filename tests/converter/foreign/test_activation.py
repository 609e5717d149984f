"""Activations -> Caffe neuron layers; Clip (ReLU6) and hard sigmoids from ReLU + Power (atol 1e-5).

With extensions, Clip(0, 6), HardSigmoid and HardSwish become the MobileNet forks' ReLU6, HardSigmoid and
HardSwish layers; their written nets match onnxruntime to atol 1e-5, rtol 1e-4 (check_conversion's default;
HardSwish differs from ONNX's rounding by a few float32 ulps), both through tests/caffe_numpy.py and
converted back to ONNX by caffeonnx.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from caffeonnx.converter.onnx_to_caffe import onnx_to_caffe
from caffeonnx.errors import CaffeOnnxError
from tests.converter.foreign.helpers import check_conversion, feeds_for, layer_types, make_model, node

X = {"x": [2, 3, 4, 5]}
CASES = {
    "Relu": ([node("Relu", ["x"])], {}, "ReLU"),
    "LeakyRelu": ([node("LeakyRelu", ["x"], alpha=0.2)], {}, "ReLU"),
    "Sigmoid": ([node("Sigmoid", ["x"])], {}, "Sigmoid"),
    "Tanh": ([node("Tanh", ["x"])], {}, "TanH"),
    "Elu": ([node("Elu", ["x"], alpha=0.7)], {}, "ELU"),
    "Selu": ([node("Selu", ["x"])], {}, "ELU"),
    "Abs": ([node("Abs", ["x"])], {}, "AbsVal"),
    "Exp": ([node("Exp", ["x"])], {}, "Exp"),
    "Softplus": ([node("Softplus", ["x"])], {}, "BNLL"),
    "PRelu_channel": ([node("PRelu", ["x", "s"])], {"s": np.array([[[0.1]], [[0.3]], [[-0.2]]], np.float32)}, "PReLU"),
    "PRelu_shared": ([node("PRelu", ["x", "s"])], {"s": np.array([0.25], np.float32)}, "PReLU"),
    "HardSigmoid": ([node("HardSigmoid", ["x"], alpha=0.3, beta=0.4)], {}, "ReLU"),
    "HardSwish": ([node("HardSwish", ["x"])], {}, "Eltwise"),
    "Softmax_axis1": ([node("Softmax", ["x"], axis=1)], {}, "Softmax"),
    "Softmax_last": ([node("Softmax", ["x"])], {}, "Softmax"),
}


@pytest.mark.parametrize("case", CASES)
def test_activation(case: str, tmp_path: Path) -> None:
    nodes, inits, caffe_type = CASES[case]
    model = make_model(nodes, X, ["y"], inits)
    feeds = {"x": feeds_for(model, 0)["x"] * np.float32(3)}  # reach the saturating ranges too
    result = check_conversion(model, feeds, tmp_path)
    assert caffe_type in layer_types(result)


def test_log_of_positive_input(tmp_path: Path) -> None:
    model = make_model([node("Log", ["x"])], X, ["y"])
    check_conversion(model, feeds_for(model, 1, positive=True), tmp_path)


def test_softmax_before_opset_13_flattens_the_trailing_axes(tmp_path: Path) -> None:
    model = make_model([node("Softmax", ["x"], axis=1)], X, ["y"], opset=11)
    result = check_conversion(model, feeds_for(model, 2), tmp_path)
    assert layer_types(result) == ["Input", "Reshape", "Softmax", "Reshape"]


INF = np.float32(np.inf)


@pytest.mark.parametrize(("lo", "hi", "types"), [
    (0.0, 6.0, ["ReLU", "Power", "ReLU", "Power"]),
    (0.0, None, ["ReLU"]),
    (-1.0, 1.0, ["Power", "ReLU", "Power", "ReLU", "Power"]),
    (None, 0.5, ["Power", "ReLU", "Power"]),
    (0.5, None, ["Power", "ReLU", "Power"]),
    (None, None, []),
], ids=["relu6", "relu", "hardtanh", "max_only", "min_only", "none"])
def test_clip_from_standard_layers(lo: float | None, hi: float | None, types: list[str], tmp_path: Path) -> None:
    inits = {k: np.array(v, np.float32) for k, v in (("lo", lo), ("hi", hi)) if v is not None}
    inputs = ["x", "lo" if lo is not None else "", "hi" if hi is not None else ""]
    model = make_model([node("Clip", inputs)], X, ["y"], inits)
    feeds = {"x": feeds_for(model, 3)["x"] * np.float32(4)}
    result = check_conversion(model, feeds, tmp_path)
    assert layer_types(result)[1:] == types + (["Split"] if not types else [])


def test_clip_attributes_before_opset_11(tmp_path: Path) -> None:
    model = make_model([node("Clip", ["x"], min=-0.5, max=2.0)], X, ["y"], opset=10)
    check_conversion(model, {"x": feeds_for(model, 4)["x"] * np.float32(3)}, tmp_path)


def test_clip_with_extensions_is_one_clip_layer(tmp_path: Path) -> None:
    inits = {"lo": np.array(-1, np.float32), "hi": np.array(2.5, np.float32)}
    model = make_model([node("Clip", ["x", "lo", "hi"])], X, ["y"], inits)
    result = check_conversion(model, {"x": feeds_for(model, 5)["x"] * np.float32(5)}, tmp_path, extensions=True)
    assert layer_types(result) == ["Input", "Clip"]
    assert (result.net.layer[1].clip_param.min, result.net.layer[1].clip_param.max) == (-1.0, 2.5)


SIX = {"lo": np.array(0, np.float32), "hi": np.array(6, np.float32)}
FORK_CASES = {  # ONNX node(s), initializers, opset, the fork layer written with extensions
    "relu6": ([node("Clip", ["x", "lo", "hi"])], SIX, 17, "ReLU6"),
    "relu6_attributes": ([node("Clip", ["x"], min=0.0, max=6.0)], {}, 9, "ReLU6"),
    "hard_swish": ([node("HardSwish", ["x"])], {}, 17, "HardSwish"),
    "hard_sigmoid_v3": ([node("HardSigmoid", ["x"], alpha=1.0 / 6.0, beta=0.5)], {}, 17, "HardSigmoid"),
    "hard_sigmoid_default": ([node("HardSigmoid", ["x"])], {}, 17, "HardSigmoid"),
    "hard_sigmoid_custom": ([node("HardSigmoid", ["x"], alpha=0.3, beta=0.4)], {}, 17, "HardSigmoid"),
}


@pytest.mark.parametrize("case", FORK_CASES)
def test_extensions_write_the_mobilenet_forks_layer(case: str, tmp_path: Path) -> None:
    """Extensions: one fork layer, equal to onnxruntime, back through Caffe -> ONNX; a BVLC target refuses it."""
    nodes, inits, opset, caffe_type = FORK_CASES[case]
    model = make_model(nodes, X, ["y"], inits, opset=opset)
    feeds = {"x": feeds_for(model, 6)["x"] * np.float32(4)}  # both saturated ends
    result = check_conversion(model, feeds, tmp_path / "ext", extensions=True)
    assert layer_types(result) == ["Input", caffe_type]
    written = result.net.layer[1]
    if caffe_type == "HardSigmoid":
        attrs = {a.name: a.f for a in nodes[0].attribute}
        p = written.hardsigmoid_param
        assert (p.alpha, p.beta) == (np.float32(attrs.get("alpha", 0.2)), np.float32(attrs.get("beta", 0.5)))
    else:
        assert not written.ListFields()[4:]  # name, type, bottom, top only: the forks' defaults
    with pytest.raises(CaffeOnnxError, match=rf"BVLC Caffe has no layer type .*\({caffe_type}, from MobileNet forks\)"):
        onnx_to_caffe(model, extensions=True, target="bvlc")
    assert layer_types(onnx_to_caffe(model, extensions=True, target="mobilenet")) == ["Input", caffe_type]
    lowered = check_conversion(model, feeds, tmp_path / "bvlc")  # without extensions: Caffe 1.0 layers as before
    assert caffe_type not in layer_types(lowered) and "ReLU" in layer_types(lowered)
