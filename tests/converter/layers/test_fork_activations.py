"""ReLU6, HardSwish and HardSigmoid of the MobileNet Caffe forks against numpy transcriptions of their C++
(inisis/caffe's ReLU6Layer with relu6_param, micronet-caffe's HardSwishLayer, inisis/synopsys-caffe's
HardSigmoidLayer), forward through onnxruntime and the trainer, backward against their Backward_cpu, and
against OpenCV DNN's Caffe importer where it has the layer.

Tolerances: ReLU6 and HardSigmoid are compared exactly or to atol 1e-6 (one rounding of alpha·x + beta);
HardSwish to atol 1e-6, rtol 1e-5 (ONNX's x·clamp(x/6 + 1/2) rounds differently from the C++'s
x·relu6(x + 3)/6, by at most a few float32 ulps).  Gradients are exact on the open pieces; at
x == threshold exactly the trainer's ReLU6 passes the gradient where the forks' Backward_cpu does not
(see relu6.py), so the inputs avoid that one point (x == 0, where both block it, is included).  Likewise
ONNX HardSigmoid's trainer gradient passes alpha at alpha·x + beta == 0 or 1 exactly, where the one fork
that trains a HardSigmoid (fixed 0.2x + 0.5) passes none; inisis/caffe and synopsys-caffe, which have the
parameters, define no backward.  Random inputs do not hit those points.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from caffeonnx.converter.caffe_io import parse_prototxt, read_caffemodel, write_caffemodel
from caffeonnx.converter.caffe_to_onnx import convert_files, load_net
from caffeonnx.converter.metadata import net_without_blobs
from caffeonnx.converter.onnx_to_caffe import convert_to_caffe_files
from caffeonnx.errors import LayerError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.graph_module import GraphModule
from caffeonnx.wire import length_delimited
from tests.helpers import assert_close, convert_text, rng, run

SHAPE = (2, 8, 5, 6)


def mobilenet_net(layer_type: str, params: str = "", shape: tuple[int, ...] = SHAPE) -> str:
    """An in-place activation after a convolution's top, as MobileNetv2-SSDLite's deploy.prototxt writes them."""
    dims = "".join(f"  dim: {d}\n" for d in shape)
    return (f'name: "MobileNetv2"\ninput: "conv_1/expand"\ninput_shape {{\n{dims}}}\n'
            f'layer {{\n  name: "conv_1/expand/relu"\n  type: "{layer_type}"\n  bottom: "conv_1/expand"\n'
            f'  top: "conv_1/expand"\n{params}}}\n')


def forward(text: str, x: np.ndarray, opset: int = 21) -> np.ndarray:
    """The net's one output on onnxruntime, fed `x` (an in-place top is a value of its own in ONNX)."""
    converted = convert_text(text, opset=opset)
    return run(converted, {converted.model.graph.input[0].name: x})[converted.model.graph.output[0].name]


def train(text: str, x: np.ndarray, dy: np.ndarray, opset: int = 21) -> tuple[np.ndarray, np.ndarray]:
    """The trainer's top, and the bottom diff autograd gives for top diff `dy`."""
    converted = convert_text(text, opset=opset, phase=caffe_pb2.TRAIN)
    bottom, top = converted.model.graph.input[0].name, converted.model.graph.output[0].name
    module = GraphModule(converted.model, converted.weights).train()
    xt = torch.tensor(x, requires_grad=True)
    y = module({bottom: xt}, [top])[top]
    (y * torch.as_tensor(dy)).sum().backward()
    assert xt.grad is not None
    return y.detach().numpy(), xt.grad.numpy()


def opencv_forward(tmp_path: Path, text: str, x: np.ndarray) -> np.ndarray:
    """OpenCV DNN's Caffe importer on `text` (+ an empty caffemodel, as the layer has no blobs)."""
    cv2 = pytest.importorskip("cv2")
    proto, model = tmp_path / "deploy.prototxt", tmp_path / "deploy.caffemodel"
    proto.write_text(text)
    write_caffemodel(model, parse_prototxt(text, "<test>"), {})
    net = cv2.dnn.readNetFromCaffe(str(proto), str(model))
    net.setInput(x)
    return net.forward()


# --- ReLU6 ------------------------------------------------------------------------------------------------

def caffe_relu6(x: np.ndarray, slope: float, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """inisis/caffe ReLU6Layer: Forward min(max(x, 0) + slope·min(x, 0), t); Backward (x > 0 + slope·(x <= 0))·(x < t)."""
    s, t, zero = np.float32(slope), np.float32(threshold), np.float32(0)
    y = np.minimum(np.maximum(x, zero) + s * np.minimum(x, zero), t)
    return y, (((x > 0) + s * (x <= 0)) * (x < t)).astype(np.float32)


def relu6_input(threshold: float, seed: int = 1) -> np.ndarray:
    """Values on both sides of 0 and the threshold, with exact zeros and near-threshold values (not on it)."""
    x = rng(seed).uniform(-3, threshold + 3, size=SHAPE).astype(np.float32)
    t = np.float32(threshold)
    x.reshape(-1)[:6] = [0, 0, np.nextafter(t, np.float32(0)), np.nextafter(t, np.float32(99)), -0.0, 1e-30]
    return x


RELU6_CASES = [  # (params as the forks' prototxts write them, negative_slope, threshold)
    ("", 0.0, 6.0),  # chuanqi305/MobileNetv2-SSDLite: no params
    ("  relu6_param {\n    threshold: 6\n  }\n", 0.0, 6.0),  # brocolli (inisis/caffe) writes the threshold
    ("  relu6_param {\n    negative_slope: 0.1\n  }\n", 0.1, 6.0),  # MobileNet-YOLO's leaky form
    ("  relu6_param {\n    threshold: 3.5\n  }\n", 0.0, 3.5),
    ("  relu_param {\n    negative_slope: 0.2\n  }\n", 0.2, 6.0),  # NVIDIA's Caffe reads the slope from relu_param
]


@pytest.mark.parametrize(("params", "slope", "threshold"), RELU6_CASES)
@pytest.mark.parametrize("opset", [21, 9])
def test_relu6_forward(params: str, slope: float, threshold: float, opset: int) -> None:
    x = relu6_input(threshold)
    got = forward(mobilenet_net("ReLU6", params), x, opset)
    assert_close(got, caffe_relu6(x, slope, threshold)[0], "relu6", atol=0, rtol=0)


def test_relu6_keeps_nan_as_caffe_does() -> None:
    x = np.array([np.nan, -np.inf, np.inf, 7.0], dtype=np.float32).reshape(1, 4, 1, 1)
    got = forward(mobilenet_net("ReLU6", shape=(1, 4, 1, 1)), x)
    assert_close(got, np.array([np.nan, 0, 6, 6], dtype=np.float32).reshape(1, 4, 1, 1), "relu6 nan/inf")


@pytest.mark.parametrize(("params", "slope", "threshold"), RELU6_CASES)
@pytest.mark.parametrize("opset", [21, 9])
def test_relu6_trains_with_the_forks_gradient(params: str, slope: float, threshold: float, opset: int) -> None:
    x = relu6_input(threshold, seed=2)
    dy = rng(3).normal(size=SHAPE).astype(np.float32)
    y, dx = train(mobilenet_net("ReLU6", params), x, dy, opset)
    want, mask = caffe_relu6(x, slope, threshold)
    assert_close(y, want, "relu6 (trainer)", atol=0, rtol=0)
    assert_close(dx, dy * mask, "relu6 bottom diff", atol=0, rtol=0)


def test_relu6_matches_opencv(tmp_path: Path) -> None:
    x = relu6_input(6.0, seed=4)
    text = mobilenet_net("ReLU6")
    want = opencv_forward(tmp_path, text, x)
    assert_close(forward(text, x), want, "relu6 vs OpenCV", atol=0, rtol=0)


def test_relu6_slopes_given_twice_must_agree() -> None:
    params = "  relu6_param { negative_slope: 0.1 }\n  relu_param { negative_slope: 0.2 }\n"
    with pytest.raises(LayerError, match=r"relu6_param.negative_slope 0.1.* and relu_param.negative_slope 0.2.* "
                                         r"disagree"):
        convert_text(mobilenet_net("ReLU6", params))


# --- HardSwish --------------------------------------------------------------------------------------------

def caffe_hard_swish(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """micronet-caffe HardSwishLayer: Forward x·min(max(x + 3, 0), 6)/6 in float32; Backward 0 below -3,
    1 above 3, (2x + 3)/6 between (both edges on the middle piece)."""
    tmp = np.minimum(np.maximum(x + np.float32(3), np.float32(0)), np.float32(6))
    y = x * tmp / np.float32(6)
    slope = np.where(x < -3, 0, np.where(x > 3, 1, (x * 2 + 3) / np.float32(6))).astype(np.float32)
    return y, slope


def hard_swish_input(seed: int) -> np.ndarray:
    x = rng(seed).uniform(-6, 6, size=SHAPE).astype(np.float32)
    x.reshape(-1)[:6] = [-3, 3, 0, -2.999, 3.001, -3.001]
    return x


@pytest.mark.parametrize("opset", [21, 13])
def test_hard_swish_forward_and_gradient(opset: int) -> None:
    """Opset 21 emits ONNX HardSwish; 13 predates it, x·HardSigmoid(x) instead (same values, same gradient)."""
    x = hard_swish_input(5)
    text = mobilenet_net("HardSwish")
    want, slope = caffe_hard_swish(x)
    assert_close(forward(text, x, opset), want, "hardswish (onnxruntime)", atol=1e-6, rtol=1e-5)
    dy = rng(6).normal(size=SHAPE).astype(np.float32)
    y, dx = train(text, x, dy, opset)
    assert_close(y, want, "hardswish (trainer)", atol=1e-6, rtol=1e-5)
    assert_close(dx, dy * slope, "hardswish bottom diff", atol=1e-6, rtol=1e-5)


def test_hard_swish_matches_opencv(tmp_path: Path) -> None:
    x = hard_swish_input(7)
    text = mobilenet_net("HardSwish")
    want = opencv_forward(tmp_path, text, x)
    assert_close(forward(text, x), want, "hardswish vs OpenCV", atol=1e-6, rtol=1e-5)


# --- HardSigmoid ------------------------------------------------------------------------------------------

def caffe_hard_sigmoid(x: np.ndarray, alpha: float, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """HardSigmoidLayer: Forward max(0, min(1, x·alpha + beta)); the derivative alpha where 0 < z < 1 (the
    forks that train it pass 0.2 on -2.5 < x < 2.5 for the defaults)."""
    z = x * np.float32(alpha) + np.float32(beta)
    return np.maximum(np.float32(0), np.minimum(np.float32(1), z)), np.where((z > 0) & (z < 1), alpha, 0)


HARD_SIGMOID_CASES = [  # (params, alpha, beta)
    ("", 0.2, 0.5),  # the defaults (and the fixed 0.2x + 0.5 of the forks without params)
    ("  hardsigmoid_param {\n    alpha: 0.16666667\n    beta: 0.5\n  }\n", 0.16666667, 0.5),  # MobileNet v3's h-sigmoid
    ("  hard_sigmoid_param {\n    alpha: 0.5\n    beta: 0.25\n  }\n", 0.5, 0.25),  # synopsys-caffe's spelling
]


def se_gate_net(params: str) -> str:
    """A MobileNet v3 squeeze-excite gate: HardSigmoid in place on the excitation's InnerProduct top."""
    return ('name: "MobileNetV3"\nlayer {\n  name: "data"\n  type: "Input"\n  top: "conv3-2/dwise-se-fc2"\n'
            '  input_param { shape: { dim: 2 dim: 8 dim: 5 dim: 6 } }\n}\n'
            'layer {\n  name: "relu5_2"\n  type: "HardSigmoid"\n  bottom: "conv3-2/dwise-se-fc2"\n'
            f'  top: "conv3-2/dwise-se-fc2"\n{params}}}\n')


@pytest.mark.parametrize(("params", "alpha", "beta"), HARD_SIGMOID_CASES)
def test_hard_sigmoid_forward_gradient_and_opencv(tmp_path: Path, params: str, alpha: float, beta: float) -> None:
    """OpenCV reads either spelling's alpha and beta, so it checks the parameters too."""
    x = rng(8).uniform(-8, 8, size=SHAPE).astype(np.float32)
    text = se_gate_net(params)
    want, slope = caffe_hard_sigmoid(x, alpha, beta)
    assert_close(forward(text, x), want, "hardsigmoid (onnxruntime)", atol=1e-6, rtol=0)
    assert_close(opencv_forward(tmp_path, text, x), want, "hardsigmoid (OpenCV)", atol=1e-6, rtol=0)
    dy = rng(9).normal(size=SHAPE).astype(np.float32)
    y, dx = train(text, x, dy)
    assert_close(y, want, "hardsigmoid (trainer)", atol=1e-6, rtol=0)
    assert_close(dx, dy * slope, "hardsigmoid bottom diff", atol=1e-6, rtol=1e-6)


def test_hard_sigmoid_refuses_both_spellings() -> None:
    params = "  hardsigmoid_param { alpha: 0.2 }\n  hard_sigmoid_param { alpha: 0.1 }\n"
    with pytest.raises(LayerError, match=r"both hardsigmoid_param .* and hard_sigmoid_param"):
        convert_text(se_gate_net(params))


# --- to-caffe ---------------------------------------------------------------------------------------------

def test_fork_activations_round_trip_through_to_caffe(tmp_path: Path) -> None:
    """prototxt -> ONNX -> prototxt: the same layers (each fork's spelling kept), the same graph again."""
    text = (mobilenet_net("ReLU6", "  relu6_param {\n    negative_slope: 0.1\n    threshold: 5\n  }\n")
            + 'layer {\n  name: "hswish"\n  type: "HardSwish"\n  bottom: "conv_1/expand"\n  top: "hswish"\n}\n'
            + 'layer {\n  name: "gate"\n  type: "HardSigmoid"\n  bottom: "hswish"\n  top: "gate"\n'
              '  hard_sigmoid_param {\n    alpha: 0.16666667\n  }\n}\n')
    proto, model = tmp_path / "deploy.prototxt", tmp_path / "deploy.caffemodel"
    proto.write_text(text)
    write_caffemodel(model, parse_prototxt(text, "<test>"), {})
    first = convert_files(proto, model)
    first.save(tmp_path / "m.onnx")
    convert_to_caffe_files(tmp_path / "m.onnx", tmp_path / "back.prototxt", tmp_path / "back.caffemodel")
    assert net_without_blobs(load_net(tmp_path / "back.prototxt")) == net_without_blobs(load_net(proto))
    assert convert_files(tmp_path / "back.prototxt", tmp_path / "back.caffemodel").model.graph == first.model.graph


@pytest.mark.parametrize(("type_", "field", "number", "message"), [
    ("ReLU6", "relu6_param", 503, caffe_pb2.ReLU6Parameter(negative_slope=0.1, threshold=5)),
    ("HardSigmoid", "hardsigmoid_param", 501, caffe_pb2.HardSigmoidParameter(alpha=1 / 6, beta=0.5)),
    ("HardSigmoid", "hard_sigmoid_param", 258, caffe_pb2.HardSigmoidParameter(alpha=0.5, beta=0.25)),
])
def test_a_forks_caffemodel_params_read_at_its_numbers(tmp_path: Path, type_: str, field: str, number: int,
                                                      message: object) -> None:
    """inisis/caffe numbers relu6_param 503 and hardsigmoid_param 501, synopsys-caffe hard_sigmoid_param 258."""
    payload = message.SerializeToString()
    body = (length_delimited(1, 1) + b"l" + length_delimited(2, len(type_)) + type_.encode()
            + length_delimited(number, len(payload)) + payload)
    path = tmp_path / "fork.caffemodel"
    path.write_bytes(length_delimited(100, len(body)) + body)
    assert getattr(read_caffemodel(path).net.layer[0], field) == message
