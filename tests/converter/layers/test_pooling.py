"""Pooling against a numpy reference of Caffe's loops, over many border cases, and real Caffe fixtures.

The sweep builds one net per (method, round_mode, H) holding a Pooling layer for every
valid (kernel, stride, pad) on the H axis, each paired with another valid triple on the
W axis, so every triple is also exercised along W.  Tolerances: atol 1e-5, rtol 1e-4
(NaN/±FLT_MAX must match exactly: Caffe's windows that hold no input).
"""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from caffeonnx.errors import LayerError
from caffeonnx.proto import caffe_pb2
from tests.converter.layers.caffe_ref_spatial import FLT_MAX, caffe_pool, pooled_size
from tests.helpers import REFERENCE, assert_close, convert_text, reference_subnet, rng, run

Triple = tuple[int, int, int]  # kernel, stride, pad


def _input(shape: tuple[int, ...]) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}\n'


def _pool(name: str, params: str, tops: tuple[str, ...] | None = None) -> str:
    t = " ".join(f'top: "{x}"' for x in (tops or (name,)))
    return f'layer {{ name: "{name}" type: "Pooling" bottom: "x" {t} pooling_param {{ {params} }} }}\n'


def _triples(size: int, method: str, ceil: bool) -> list[Triple]:
    """(kernel, stride, pad) that Caffe accepts on an axis of `size` with a non-empty output."""
    pads = (0,) if method == "STOCHASTIC" else (0, 1, 2)
    return [(k, s, p) for k, s, p in itertools.product((1, 2, 3, 4), (1, 2, 3), pads)
            if (p == 0 or p < k) and pooled_size(size, k, s, p, ceil) > 0]


def _sweep_input(shape: tuple[int, ...], method: str, seed: int) -> np.ndarray:
    g = rng(seed)
    x = g.normal(size=shape).astype(np.float32)
    if method == "STOCHASTIC":  # the layer follows a ReLU in practice: non-negative, with zero windows
        x = np.maximum(x, 0)
        x[0, 0] = 0
    return x


@pytest.mark.parametrize("method", ["MAX", "AVE", "STOCHASTIC"])
@pytest.mark.parametrize("round_mode", ["CEIL", "FLOOR"])
@pytest.mark.parametrize("height", [1, 2, 3, 4, 5, 6, 7, 8, 9])
def test_border_sweep_matches_caffe(method: str, round_mode: str, height: int) -> None:
    width = height + 2
    ceil = round_mode == "CEIL"
    rows, cols = _triples(height, method, ceil), _triples(width, method, ceil)
    cases = [(rows[i % len(rows)], cols[(3 * i + 1) % len(cols)]) for i in range(max(len(rows), len(cols)))]
    text = _input((2, 3, height, width))
    for i, ((kh, sh, ph), (kw, sw, pw)) in enumerate(cases):
        text += _pool(f"p{i}", f"pool: {method} round_mode: {round_mode} kernel_h: {kh} kernel_w: {kw} "
                               f"stride_h: {sh} stride_w: {sw} pad_h: {ph} pad_w: {pw}")
    x = _sweep_input((2, 3, height, width), method, height * 10 + len(method) + ceil)
    outs = run(convert_text(text), {"x": x})
    for i, ((kh, sh, ph), (kw, sw, pw)) in enumerate(cases):
        want, _ = caffe_pool(x, method, (kh, kw), (sh, sw), (ph, pw), ceil)
        assert_close(outs[f"p{i}"], want, f"{method} {round_mode} on {height}x{width}: kernel {(kh, kw)} "
                                          f"stride {(sh, sw)} pad {(ph, pw)}")


def test_sweep_covers_the_border_cases() -> None:
    """The sweep holds windows cut by the padded end, dropped last windows and windows outside the input."""
    cut = dropped = outside = 0
    for height, ceil in itertools.product(range(1, 10), (True, False)):
        for k, s, p in _triples(height, "AVE", ceil):
            out = pooled_size(height, k, s, p, ceil)
            if p and (out - 1) * s >= height + p:
                dropped += 1
                out -= 1
            cut += (out - 1) * s + k > height + 2 * p
            outside += (out - 1) * s >= height
    assert cut > 20 and dropped > 5 and outside > 5, (cut, dropped, outside)


def test_windows_outside_the_input_give_caffes_values() -> None:
    """No pad, CEIL, stride > kernel: the last window holds no input; Caffe yields -FLT_MAX (MAX), NaN (AVE)."""
    x = rng(1).normal(size=(1, 2, 4, 4)).astype(np.float32)
    text = _input(x.shape) + _pool("mx", "pool: MAX kernel_size: 1 stride: 2") + _pool(
        "av", "pool: AVE kernel_size: 1 stride: 2")
    outs = run(convert_text(text), {"x": x})
    assert outs["mx"].shape == (1, 2, 3, 3)
    assert np.all(outs["mx"][:, :, 2, :] == -FLT_MAX) and np.all(np.isnan(outs["av"][:, :, 2, :]))
    assert_close(outs["mx"], caffe_pool(x, "MAX", (1, 1), (2, 2), (0, 0))[0], "MAX outside")
    assert_close(outs["av"], caffe_pool(x, "AVE", (1, 1), (2, 2), (0, 0))[0], "AVE outside")


@pytest.mark.parametrize(("square", "rect"), [
    ("kernel_size: 3 stride: 2 pad: 1", "kernel_h: 3 kernel_w: 3 stride_h: 2 stride_w: 2 pad_h: 1 pad_w: 1"),
    ("kernel_size: 2", "kernel_h: 2 kernel_w: 2 stride_h: 1 stride_w: 1"),
])
@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_square_and_hw_spellings_agree(square: str, rect: str, method: str) -> None:
    x = rng(2).normal(size=(2, 2, 7, 6)).astype(np.float32)
    outs = run(convert_text(_input(x.shape) + _pool("a", f"pool: {method} {square}") + _pool(
        "b", f"pool: {method} {rect}")), {"x": x})
    np.testing.assert_array_equal(outs["a"], outs["b"])


@pytest.mark.parametrize("method", ["MAX", "AVE", "STOCHASTIC"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 1), (3, 2, 6, 1)])
def test_global_pooling_any_batch(method: str, shape: tuple[int, ...]) -> None:
    """Global pooling over H×W; the net declared for batch N runs a batch of N + 3."""
    fed = (shape[0] + 3, *shape[1:])
    x = np.abs(rng(len(method) + shape[2]).normal(size=fed)).astype(np.float32)
    converted = convert_text(_input(shape) + _pool("g", f"pool: {method} global_pooling: true"))
    out = run(converted, {"x": x})["g"]
    assert_close(out, caffe_pool(x, method, (0, 0), (1, 1), (0, 0), global_pooling=True)[0], f"global {method}")


def _geometry(kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int]) -> str:
    return (f"kernel_h: {kernel[0]} kernel_w: {kernel[1]} stride_h: {stride[0]} stride_w: {stride[1]} "
            f"pad_h: {pad[0]} pad_w: {pad[1]}")


@pytest.mark.parametrize(("method", "kernel", "stride", "pad"), [
    ("AVE", (3, 3), (2, 2), (1, 1)),  # border divisor constant
    ("AVE", (1, 1), (2, 2), (0, 0)),  # Pad node: windows outside the input
    ("MAX", (3, 2), (2, 2), (1, 1)),
    ("STOCHASTIC", (3, 3), (2, 2), (0, 0)),
])
def test_batch_differs_from_prototxt(method: str, kernel: tuple[int, int], stride: tuple[int, int],
                                     pad: tuple[int, int]) -> None:
    """The batch dimension stays dynamic: a net declared for batch 2 runs batch 5 correctly."""
    x = np.abs(rng(sum(kernel) + len(method)).normal(size=(5, 3, 8, 7))).astype(np.float32)
    text = _input((2, 3, 8, 7)) + _pool("p", f"pool: {method} " + _geometry(kernel, stride, pad))
    out = run(convert_text(text), {"x": x})["p"]
    assert_close(out, caffe_pool(x, method, kernel, stride, pad)[0], f"{method} {kernel} batch 5 (declared 2)")


@pytest.mark.parametrize(("kernel", "stride", "pad"), [
    ((3, 3), (2, 2), (0, 0)), ((2, 2), (1, 1), (1, 1)), ((2, 3), (2, 2), (1, 0)), ((7, 6), (1, 1), (0, 0)),
    ((1, 1), (2, 2), (0, 0)),  # the last column of windows lies outside the 6 wide input: -FLT_MAX, mask -1
])
@pytest.mark.parametrize("ties", [False, True])
def test_max_mask_top_is_caffes_argmax(kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int],
                                       ties: bool) -> None:
    """The second top of MAX pooling: h·W + w of the first maximum of each window, as float (batch 3, declared 2)."""
    g = rng(sum(kernel) + sum(pad) + ties)
    x = (g.integers(0, 3, size=(3, 2, 7, 6)) if ties else g.normal(size=(3, 2, 7, 6))).astype(np.float32)
    converted = convert_text(_input((2, 2, 7, 6)) + _pool("p", "pool: MAX " + _geometry(kernel, stride, pad),
                                                          ("y", "mask")))
    outs = run(converted, {"x": x})
    top, mask = caffe_pool(x, "MAX", kernel, stride, pad)
    assert_close(outs["y"], top, f"MAX {kernel} {stride} {pad}")
    np.testing.assert_array_equal(outs["mask"], mask, err_msg=f"mask of MAX {kernel} {stride} {pad}")
    assert outs["mask"].dtype == np.float32


def test_global_max_mask_top() -> None:
    x = rng(8).normal(size=(3, 2, 5, 4)).astype(np.float32)
    outs = run(convert_text(_input((1, 2, 5, 4)) + _pool("p", "pool: MAX global_pooling: true", ("y", "mask"))),
               {"x": x})
    top, mask = caffe_pool(x, "MAX", (0, 0), (1, 1), (0, 0), global_pooling=True)
    assert_close(outs["y"], top, "global MAX")
    np.testing.assert_array_equal(outs["mask"], mask, err_msg="mask of global MAX")


@pytest.mark.parametrize(("shape", "params", "tops", "options", "match"), [
    ((1, 1, 5, 5), "pool: STOCHASTIC kernel_size: 2", 1, {"phase": caffe_pb2.TRAIN}, r"STOCHASTIC.*TRAIN"),
    ((1, 1, 5, 5), "pool: STOCHASTIC kernel_size: 2 pad: 1", 1, {}, r"Padding implemented only for average and max"),
    ((1, 1, 5, 5), "pool: MAX kernel_size: 2 pad: 2", 1, {}, r"pad \[2, 2\] must be smaller than the kernel \[2, 2\]"),
    ((1, 1, 5, 5), "pool: AVE global_pooling: true kernel_size: 2", 1, {}, r"Filter size cannot specified"),
    ((1, 1, 5, 5), "pool: AVE global_pooling: true stride: 2", 1, {}, r"only pad = 0 and stride = 1"),
    ((1, 1, 5, 5), "pool: MAX", 1, {}, r"both kernel_h and kernel_w are required"),
    ((1, 1, 5, 5), "pool: MAX kernel_size: 2 kernel_h: 2 kernel_w: 2", 1, {}, r"kernel_size OR kernel_h"),
    ((1, 1, 5, 5), "pool: MAX kernel_size: 2 pad_h: 1", 1, {}, r"pad is pad OR pad_h and pad_w are required"),
    ((1, 1, 5, 5), "pool: MAX kernel_size: 2 stride: 0", 1, {}, r"stride \[0, 0\] has a zero entry"),
    ((1, 1, 5, 5), "pool: MAX kernel_h: 2 kernel_w: 0", 1, {}, r"Filter dimensions cannot be zero"),
    ((1, 1, 2, 2), "pool: MAX kernel_size: 3 round_mode: FLOOR", 1, {}, r"larger than the padded input"),
    ((1, 5, 5), "pool: MAX kernel_size: 2", 1, {}, r"needs \(N, C, H, W\)"),
    ((1, 1, 5, 5), "pool: AVE kernel_size: 2", 2, {}, r"AVE pooling has at most 1 top"),
])
def test_errors_name_the_problem(shape: tuple[int, ...], params: str, tops: int, options: dict, match: str) -> None:
    names = ("y", "mask")[:tops]
    with pytest.raises(LayerError, match=match):
        convert_text(_input(shape) + _pool("p", params, names), **options)


# --- real Caffe ---------------------------------------------------------------------------
def test_layer_zoo_ave_pool_with_pad_matches_caffe() -> None:
    """AVE 3x3/2 pad 1 on 16x16: the last window is cut by the padded end (divisor 6, not 9)."""
    case = json.loads((REFERENCE / "layer_zoo" / "case.json").read_text())
    text, feeds, want = reference_subnet("layer_zoo", ["pool_ave"])
    out = run(convert_text(text), feeds)["pool_ave"]
    assert_close(out, want["pool_ave"], "pool_ave", atol=case["atol"], rtol=case["rtol"])


@pytest.mark.parametrize("layer", ["pool1", "pool2"])
def test_lenet_max_pools_match_caffe(layer: str) -> None:
    """pool2 is 3x3/2 on 8x8: Caffe rounds the output up to 4x4, its last windows are cut by the input end."""
    case = json.loads((REFERENCE / "lenet" / "case.json").read_text())
    text, feeds, want = reference_subnet("lenet", [layer])
    out = run(convert_text(text), feeds)[layer]
    assert_close(out, want[layer], layer, atol=case["atol"], rtol=case["rtol"])
