"""BatchNorm and LRN against numpy references of Caffe's forward and the layer_zoo Caffe fixture."""
from __future__ import annotations

import json

import numpy as np
import pytest

from caffeonnx.converter.caffe_to_onnx import load_weights
from caffeonnx.converter.metadata import param_records
from caffeonnx.errors import LayerError
from caffeonnx.proto import caffe_pb2
from tests.helpers import REFERENCE, assert_close, convert_text, reference_subnet, rng, run

ZOO = REFERENCE / "layer_zoo"


def _input(shape: tuple[int, ...]) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}\n'


# --- numpy references of Caffe's Forward_cpu -------------------------------------------------
def caffe_batch_norm(x: np.ndarray, blobs: list[np.ndarray] | None, eps: float) -> np.ndarray:
    """Caffe's BatchNorm: stored stats divided by s (0 if s == 0), or biased batch stats when blobs is None."""
    axes = (0, *range(2, x.ndim))
    bshape = (1, -1) + (1,) * (x.ndim - 2)
    if blobs is None:
        mean = x.mean(axis=axes, dtype=np.float64)
        var = ((x - mean.reshape(bshape)) ** 2).mean(axis=axes)
    else:
        s = blobs[2][0]
        factor = 0.0 if s == 0 else 1.0 / s
        mean, var = blobs[0] * factor, blobs[1] * factor
    return ((x - mean.reshape(bshape)) / np.sqrt(var.reshape(bshape) + eps)).astype(np.float32)


def caffe_lrn_across(x: np.ndarray, size: int, alpha: float, beta: float, k: float) -> np.ndarray:
    """Caffe's CrossChannelForward: scale = k + alpha/size * sum of x^2 over the zero-padded channel window."""
    pre = (size - 1) // 2
    c = x.shape[1]
    padded = np.zeros((x.shape[0], c + size - 1, *x.shape[2:]), np.float64)
    padded[:, pre : pre + c] = x.astype(np.float64) ** 2
    scale = k + alpha / size * np.stack([padded[:, i : i + size].sum(axis=1) for i in range(c)], axis=1)
    return (x * scale ** -beta).astype(np.float32)


def caffe_lrn_within(x: np.ndarray, size: int, alpha: float, beta: float) -> np.ndarray:
    """Caffe's WithinChannelForward: (1 + alpha * AVE-pool(x^2, size, pad (size-1)/2))^-beta * x.

    Caffe's AVE pooling divides by the window clipped to [-pad, H + pad), which is size^2
    everywhere for stride 1 and this pad.
    """
    pad = (size - 1) // 2
    n, c, h, w = x.shape
    sq = np.zeros((n, c, h + 2 * pad, w + 2 * pad), np.float64)
    sq[:, :, pad : pad + h, pad : pad + w] = x.astype(np.float64) ** 2
    pooled = np.zeros((n, c, h, w))
    for i in range(h):
        for j in range(w):
            hs, ws = i - pad, j - pad
            he, we = min(hs + size, h + pad), min(ws + size, w + pad)
            window = sq[:, :, hs + pad : he + pad, ws + pad : we + pad]
            pooled[:, :, i, j] = window.sum(axis=(2, 3)) / ((he - hs) * (we - ws))
    return (x * (1.0 + alpha * pooled) ** -beta).astype(np.float32)


# --- BatchNorm ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 7), (2, 3, 5, 6), (2, 3, 2, 3, 4)])
@pytest.mark.parametrize("s", [1.0, 0.37, 0.0])
def test_batch_norm_global_stats(shape: tuple[int, ...], s: float) -> None:
    g = rng(sum(shape) + int(s * 100))
    c = shape[1]
    blobs = [g.normal(size=c).astype(np.float32) * s, g.uniform(0.5, 2, size=c).astype(np.float32) * s,
             np.array([s], np.float32)]
    eps = 1e-3
    m = convert_text(_input(shape) + f'layer {{ name: "bn" type: "BatchNorm" bottom: "x" top: "y" '
                     f'batch_norm_param {{ use_global_stats: true eps: {eps} }} }}', {"bn": blobs})
    x = g.normal(size=shape).astype(np.float32)
    assert_close(run(m, {"x": x})["y"], caffe_batch_norm(x, blobs, eps), "y")
    # The initializers are Caffe's raw blobs (mean*s, var*s, s), byte for byte.
    assert [w.shape for w in m.weights.values()] == [(c,), (c,), (1,)]
    for got, want in zip(m.weights.values(), blobs):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("phase", ["TRAIN", "TEST_explicit"])
@pytest.mark.parametrize("opset", [13, 21])  # ReduceMean's axes: an attribute before opset 18, an input since
def test_batch_norm_batch_stats(shape: tuple[int, ...], phase: str, opset: int) -> None:
    """TRAIN phase (default) or use_global_stats: false normalises with the batch's own statistics."""
    g = rng(len(shape))
    explicit = "use_global_stats: false" if phase == "TEST_explicit" else ""
    opts = {"phase": caffe_pb2.TRAIN, "opset": opset} if phase == "TRAIN" else {"opset": opset}
    m = convert_text(_input(shape) + f'layer {{ name: "bn" type: "BatchNorm" bottom: "x" top: "y" '
                     f'batch_norm_param {{ {explicit} eps: 1e-5 }} }}', None, **opts)
    x = (g.normal(size=shape) * 3 + 1).astype(np.float32)
    assert_close(run(m, {"x": x})["y"], caffe_batch_norm(x, None, 1e-5), "y")
    # Still Caffe's three blobs, zero-initialised as Caffe does.
    assert [(w.shape, float(np.abs(w).sum())) for w in m.weights.values()] == [((shape[1],), 0.0)] * 2 + [((1,), 0.0)]


def test_fp16_weights_keep_caffe_blob_shapes() -> None:
    """--fp16 stores the blobs as float16 and casts them back; results stay within float16 rounding."""
    g = rng(12)
    c = 4
    blobs = {"bn": [g.normal(size=c) * 0.5, g.uniform(1, 2, size=c) * 0.5, np.array([0.5])],
             "sc": [g.normal(size=c), g.normal(size=c)], "pr": [g.normal(size=c)]}
    text = (_input((2, c, 3, 3)) + 'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "b" }\n'
            'layer { name: "sc" type: "Scale" bottom: "b" top: "s" scale_param { bias_term: true } }\n'
            'layer { name: "pr" type: "PReLU" bottom: "s" top: "y" }')
    full, half = convert_text(text, blobs), convert_text(text, blobs, fp16=True)
    assert [(w.shape, w.dtype) for w in half.weights.values()] == [(w.shape, np.float16) for w in full.weights.values()]
    x = g.normal(size=(2, c, 3, 3)).astype(np.float32)
    assert_close(run(half, {"x": x})["y"], run(full, {"x": x})["y"], "y (fp16 weights)", atol=1e-2, rtol=1e-2)


def test_batch_norm_is_batch_agnostic() -> None:
    g = rng(3)
    blobs = [g.normal(size=3), g.uniform(1, 2, size=3), np.array([2.0])]
    m = convert_text(_input((2, 3, 4)) + 'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y" }', {"bn": blobs})
    x = g.normal(size=(5, 3, 4)).astype(np.float32)
    assert_close(run(m, {"x": x})["y"], caffe_batch_norm(x, [np.float32(b) for b in blobs], 1e-5), "y (batch 5)")


def test_batch_norm_statistics_get_lr_mult_zero() -> None:
    """Caffe masks the statistics from the solver; the metadata says so."""
    m = convert_text(_input((2, 3)) + 'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y" }', None)
    assert [r["lr_mult"] for r in param_records(m.model)] == [0.0, 0.0, 0.0]


def test_batch_norm_refuses_learnable_statistics() -> None:
    text = _input((2, 3)) + 'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y" param { lr_mult: 1 } }'
    with pytest.raises(LayerError, match=r"layer 'bn' \(BatchNorm\): param 0 has lr_mult 1\.0.*lr_mult: 0"):
        convert_text(text, None)


def test_batch_norm_needs_a_channel_axis() -> None:
    with pytest.raises(LayerError, match=r"'bn'.*\[4\].*\(N, C, \.\.\.\)"):
        convert_text(_input((4,)) + 'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y" }', None)


# --- LRN -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("channels", "size"), [(7, 5), (3, 5), (4, 1), (6, 3)])
@pytest.mark.parametrize(("alpha", "beta", "k"), [(1e-3, 0.75, 1.0), (0.5, 0.6, 2.0)])
def test_lrn_across_channels(channels: int, size: int, alpha: float, beta: float, k: float) -> None:
    g = rng(channels * 10 + size)
    shape = (2, channels, 5, 4)
    m = convert_text(_input(shape) + f'layer {{ name: "lrn" type: "LRN" bottom: "x" top: "y" '
                     f'lrn_param {{ local_size: {size} alpha: {alpha} beta: {beta} k: {k} }} }}', None)
    x = (g.normal(size=shape) * 2).astype(np.float32)
    assert_close(run(m, {"x": x})["y"], caffe_lrn_across(x, size, alpha, beta, k), "y")
    assert not m.weights


@pytest.mark.parametrize(("hw", "size"), [((6, 5), 3), ((4, 7), 5), ((3, 3), 1), ((2, 3), 7)])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 0.75), (0.3, 1.5)])
def test_lrn_within_channel(hw: tuple[int, int], size: int, alpha: float, beta: float) -> None:
    g = rng(hw[0] * 100 + hw[1] * 10 + size)
    shape = (2, 3, *hw)
    # k is ignored by Caffe's within-channel LRN (the shift is fixed to 1): give a non-default one.
    m = convert_text(_input(shape) + f'layer {{ name: "lrn" type: "LRN" bottom: "x" top: "y" lrn_param {{ '
                     f'local_size: {size} alpha: {alpha} beta: {beta} k: 5 norm_region: WITHIN_CHANNEL }} }}', None)
    x = (g.normal(size=shape) * 2).astype(np.float32)
    assert_close(run(m, {"x": x})["y"], caffe_lrn_within(x, size, alpha, beta), "y")


@pytest.mark.parametrize(("shape", "param", "match"), [
    ((2, 3, 4), "", r"'lrn'.*\[2, 3, 4\].*\(N, C, H, W\)"),
    ((2, 3, 4, 4), "lrn_param { local_size: 4 }", r"local_size 4 is even.*use 5"),
])
def test_lrn_errors(shape: tuple[int, ...], param: str, match: str) -> None:
    with pytest.raises(LayerError, match=match):
        convert_text(_input(shape) + f'layer {{ name: "lrn" type: "LRN" bottom: "x" top: "y" {param} }}', None)


# --- real Caffe: layer_zoo's bn -> scale -> prelu -> lrn ------------------------------------
def test_layer_zoo_bn_scale_prelu_lrn_match_caffe() -> None:
    """The zoo's bn..lrn layers fed Caffe's own conv_g blob, with its caffemodel (tolerances from case.json)."""
    case = json.loads((ZOO / "case.json").read_text())
    text, feeds, want = reference_subnet("layer_zoo", ["bn", "scale", "prelu", "lrn"])
    caffemodel = load_weights(ZOO / "weights.caffemodel")
    weights = {name: [b.data for b in caffemodel.blobs[name]] for name in ("bn", "scale", "prelu")}
    m = convert_text(text, weights, all_blobs=True)
    outs = run(m, feeds)
    for blob in ("bn", "scale", "prelu", "lrn"):
        assert_close(outs[blob], want[blob], blob, atol=case["atol"], rtol=case["rtol"])
    # One initializer per Caffe blob, with Caffe's shapes.
    shapes = [list(w.shape) for w in m.weights.values()]
    assert shapes == [s for layer in ("bn", "scale", "prelu") for s in case["layer_param_shapes"][layer]]
