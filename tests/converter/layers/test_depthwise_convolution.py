"""ConvolutionDepthwise and DepthwiseConvolution against a numpy transcription of conv_dw_layer.cpp's
Forward_cpu / Backward_cpu (per-channel loops, windows clipped at the border): atol 1e-5, rtol 1e-4,
forward in onnxruntime and the trainer, bottom gradient through the trainer."""
from __future__ import annotations

import numpy as np
import pytest

from caffeonnx.errors import LayerError
from tests.converter.layers.graph_grad import forward_backward
from tests.helpers import assert_close, convert_text, rng, run


def dw_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: tuple[int, int],
               pad: tuple[int, int], dil: tuple[int, int]) -> np.ndarray:
    """ConvolutionDepthwiseLayer::Forward_cpu: each channel with its own k×k filter, then the bias."""
    n, c, h, wd = x.shape
    kh, kw = w.shape[2:]
    oh = (h + 2 * pad[0] - (dil[0] * (kh - 1) + 1)) // stride[0] + 1
    ow = (wd + 2 * pad[1] - (dil[1] * (kw - 1) + 1)) // stride[1] + 1
    y = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            for a in range(kh):
                for e in range(kw):
                    hi, wi = -pad[0] + i * stride[0] + a * dil[0], -pad[1] + j * stride[1] + e * dil[1]
                    if 0 <= hi < h and 0 <= wi < wd:
                        y[:, :, i, j] += w[None, :, 0, a, e] * x[:, :, hi, wi]
    if b is not None:
        y += b[None, :, None, None]
    return y


def dw_backward(x_shape: tuple[int, ...], w: np.ndarray, dy: np.ndarray, stride: tuple[int, int],
                pad: tuple[int, int], dil: tuple[int, int]) -> np.ndarray:
    """Backward_cpu's bottom diff: every top diff scattered back through its window."""
    dx = np.zeros(x_shape)
    kh, kw = w.shape[2:]
    for i in range(dy.shape[2]):
        for j in range(dy.shape[3]):
            for a in range(kh):
                for e in range(kw):
                    hi, wi = -pad[0] + i * stride[0] + a * dil[0], -pad[1] + j * stride[1] + e * dil[1]
                    if 0 <= hi < x_shape[2] and 0 <= wi < x_shape[3]:
                        dx[:, :, hi, wi] += w[None, :, 0, a, e] * dy[:, :, i, j]
    return dx


# farmingyard/caffe-mobilenet's MobileNet (conv2_1/dw ...) and a ShuffleNet-style stride-2 3x3.
CASES = [
    ("pad: 1 kernel_size: 3 stride: 1", (1, 1), (1, 1), (1, 1), True),
    ("pad: 1 kernel_size: 3 stride: 2", (2, 2), (1, 1), (1, 1), True),
    ("bias_term: false pad_h: 0 pad_w: 2 kernel_h: 3 kernel_w: 5 stride_h: 1 stride_w: 2", (1, 2), (0, 2), (1, 1), False),
    ("pad: 2 kernel_size: 3 dilation: 2", (1, 1), (2, 2), (2, 2), True),
]


@pytest.mark.parametrize(("param", "stride", "pad", "dil", "bias"), CASES)
def test_convolution_depthwise(param: str, stride: tuple[int, int], pad: tuple[int, int],
                               dil: tuple[int, int], bias: bool) -> None:
    text = ('input: "data"\ninput_shape { dim: 2 dim: 6 dim: 9 dim: 8 }\n'
            'layer {\n  name: "conv2_1/dw"\n  type: "ConvolutionDepthwise"\n  bottom: "data"\n  top: "conv2_1/dw"\n'
            f'  convolution_param {{\n    num_output: 6\n    {param}\n    weight_filler {{ type: "msra" }}\n  }}\n}}\n')
    g = rng(5)
    kh, kw = (3, 5) if "kernel_w: 5" in param else (3, 3)
    w = g.normal(size=(6, 1, kh, kw)).astype(np.float32)
    b = g.normal(size=6).astype(np.float32) if bias else None
    x = g.normal(size=(2, 6, 9, 8)).astype(np.float32)
    converted = convert_text(text, {"conv2_1/dw": [w] + ([b] if bias else [])})
    want = dw_forward(x, w, b, stride, pad, dil)
    assert_close(run(converted, {"data": x})["conv2_1/dw"], want, "conv2_1/dw (onnxruntime)")
    dy = g.normal(size=want.shape).astype(np.float32)
    got, grads = forward_backward(text, {"data": x}, "conv2_1/dw", dy, ["data"])
    # the trainer runs the fillers' weights (msra, zero bias): the reference gets the same ones
    weights = convert_text(text).weights
    w_trainer = next(v for v in weights.values() if v.ndim == 4)
    b_trainer = next((v for v in weights.values() if v.ndim == 1), None)
    assert_close(got, dw_forward(x, w_trainer, b_trainer, stride, pad, dil), "conv2_1/dw (trainer)")
    assert_close(grads["data"], dw_backward(x.shape, w_trainer, dy, stride, pad, dil), "d data (trainer)")


def test_num_output_and_group_are_ignored_and_blobs_are_per_channel() -> None:
    text = ('input: "data"\ninput_shape { dim: 1 dim: 4 dim: 5 dim: 5 }\n'
            'layer { name: "dw" type: "ConvolutionDepthwise" bottom: "data" top: "dw" '
            'convolution_param { num_output: 32 group: 2 kernel_size: 3 } }\n')
    converted = convert_text(text)
    assert sorted(v.shape for v in converted.weights.values()) == [(4,), (4, 1, 3, 3)]
    assert converted.shapes["dw"] == (1, 4, 3, 3)
    with pytest.raises(LayerError, match="4-D blobs"):
        convert_text(text.replace("dim: 1 dim: 4 dim: 5 dim: 5", "dim: 1 dim: 4 dim: 5"))


def test_depthwise_convolution_is_convolution() -> None:
    """yonghenglh6's DepthwiseConvolution: BVLC's parameters and blobs, its own group."""
    text = ('input: "data"\ninput_shape { dim: 1 dim: 8 dim: 7 dim: 7 }\n'
            'layer { name: "conv1/dw" type: "{t}" bottom: "data" top: "conv1/dw" param {{ lr_mult: 1 decay_mult: 1 }} '
            'convolution_param { num_output: 8 bias_term: false pad: 1 kernel_size: 3 group: 8 stride: 2 '
            'weight_filler { type: "msra" } engine: CAFFE } }\n')
    w = rng(2).normal(size=(8, 1, 3, 3)).astype(np.float32)
    x = rng(3).normal(size=(1, 8, 7, 7)).astype(np.float32)
    fork = run(convert_text(text.replace("{t}", "DepthwiseConvolution").replace("{{", "{").replace("}}", "}"),
                            {"conv1/dw": [w]}), {"data": x})["conv1/dw"]
    bvlc = run(convert_text(text.replace("{t}", "Convolution").replace("{{", "{").replace("}}", "}"),
                            {"conv1/dw": [w]}), {"data": x})["conv1/dw"]
    np.testing.assert_array_equal(fork, bvlc)
    assert_close(fork, dw_forward(x, w, None, (2, 2), (1, 1), (1, 1)), "conv1/dw")
