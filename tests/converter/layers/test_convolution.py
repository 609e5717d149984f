"""Convolution and Deconvolution against numpy im2col/col2im references of Caffe and real Caffe fixtures.

Tolerances: atol 1e-5, rtol 1e-4 (references accumulate in float64); fixtures use their case.json's.
"""
from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from caffeonnx.converter.caffe_to_onnx import load_weights
from caffeonnx.errors import LayerError
from tests.converter.layers.caffe_ref_spatial import caffe_conv, caffe_deconv
from tests.helpers import REFERENCE, assert_close, convert_text, reference_subnet, rng, run

ZOO = REFERENCE / "layer_zoo"
Pair = tuple[int, int]


def _input(shape: tuple[int, ...], top: str = "x") -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'layer {{ name: "in_{top}" type: "Input" top: "{top}" input_param {{ shape {{ {dims} }} }} }}\n'


def _geometry_text(kernel: Pair, stride: Pair, pad: Pair, dilation: Pair, spelling: str) -> str:
    """The 2-D geometry as convolution_param fields, spelled per-axis (repeated) or with *_h/*_w."""
    if spelling == "hw":
        fields = [f"kernel_h: {kernel[0]} kernel_w: {kernel[1]}", f"stride_h: {stride[0]} stride_w: {stride[1]}",
                  f"pad_h: {pad[0]} pad_w: {pad[1]}"]
    else:
        fields = [f"kernel_size: {kernel[0]} kernel_size: {kernel[1]}", f"stride: {stride[0]} stride: {stride[1]}",
                  f"pad: {pad[0]} pad: {pad[1]}"]
    return " ".join(fields) + f" dilation: {dilation[0]} dilation: {dilation[1]}"


def _layer(kind: str, params: str, bottoms: tuple[str, ...] = ("x",), tops: tuple[str, ...] = ("y",)) -> str:
    b = " ".join(f'bottom: "{x}"' for x in bottoms)
    t = " ".join(f'top: "{x}"' for x in tops)
    return f'layer {{ name: "conv" type: "{kind}" {b} {t} convolution_param {{ {params} }} }}\n'


def _seed(*parts: object) -> int:
    """A seed derived from the test's parameters (stable across runs, unlike hash())."""
    return zlib.crc32(repr(parts).encode())


def _weights(g: np.random.Generator, shape: tuple[int, ...], bias: int | None) -> list[np.ndarray]:
    w = [g.normal(size=shape).astype(np.float32)]
    return w + [g.normal(size=bias).astype(np.float32)] if bias else w


# (kernel, stride, pad, dilation) per (h, w); the last ones have a dilated kernel wider than
# the padded input, where Caffe's truncating division still makes one output window.
CONV_GEOMETRIES = [
    ((3, 3), (1, 1), (0, 0), (1, 1)),
    ((3, 5), (2, 1), (1, 2), (1, 1)),
    ((2, 4), (3, 2), (1, 0), (2, 1)),
    ((1, 1), (2, 2), (2, 1), (1, 1)),
    ((5, 3), (1, 3), (2, 1), (1, 2)),
    ((4, 2), (2, 2), (3, 1), (1, 3)),
    ((5, 3), (3, 4), (0, 0), (2, 2)),
    ((3, 3), (4, 4), (1, 0), (4, 5)),
]


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES, ids=str)
@pytest.mark.parametrize("spelling", ["repeated", "hw"])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_convolution_2d_matches_caffe(geometry: tuple[Pair, ...], spelling: str, group: int, bias: bool) -> None:
    kernel, stride, pad, dilation = geometry
    shape, m = (2, 4, 7, 9), 6
    g = rng(_seed(geometry, spelling, group, bias))
    x = g.normal(size=shape).astype(np.float32)
    blobs = _weights(g, (m, shape[1] // group, *kernel), m if bias else None)
    params = f"num_output: {m} group: {group} bias_term: {str(bias).lower()} " + _geometry_text(*geometry, spelling)
    out = run(convert_text(_input(shape) + _layer("Convolution", params), {"conv": blobs}), {"x": x})["y"]
    want = caffe_conv(x, blobs[0], blobs[1] if bias else None, stride, pad, dilation, group)
    assert_close(out, want, f"conv {geometry} {spelling} group {group}")


DECONV_GEOMETRIES = [
    ((3, 3), (1, 1), (0, 0), (1, 1)),
    ((4, 4), (2, 2), (1, 1), (1, 1)),
    ((3, 5), (2, 3), (1, 2), (1, 1)),
    ((2, 3), (3, 2), (0, 1), (2, 1)),
    ((1, 1), (3, 2), (1, 0), (1, 1)),
    ((5, 4), (1, 2), (4, 3), (2, 2)),
]


@pytest.mark.parametrize("geometry", DECONV_GEOMETRIES, ids=str)
@pytest.mark.parametrize("spelling", ["repeated", "hw"])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_deconvolution_2d_matches_caffe(geometry: tuple[Pair, ...], spelling: str, group: int, bias: bool) -> None:
    kernel, stride, pad, dilation = geometry
    shape, m = (2, 4, 5, 6), 6
    g = rng(_seed(geometry, spelling, group, bias, "deconv"))
    x = g.normal(size=shape).astype(np.float32)
    blobs = _weights(g, (shape[1], m // group, *kernel), m if bias else None)
    params = f"num_output: {m} group: {group} bias_term: {str(bias).lower()} " + _geometry_text(*geometry, spelling)
    out = run(convert_text(_input(shape) + _layer("Deconvolution", params), {"conv": blobs}), {"x": x})["y"]
    want = caffe_deconv(x, blobs[0], blobs[1] if bias else None, stride, pad, dilation, group)
    assert_close(out, want, f"deconv {geometry} {spelling} group {group}")


@pytest.mark.parametrize("kind", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize(("shape", "params", "kernel", "stride", "pad", "dilation"), [
    ((2, 4, 11), "kernel_size: 3 stride: 2 pad: 1 dilation: 2", (3,), (2,), (1,), (2,)),
    ((2, 2, 5, 6, 7), "kernel_size: 3 kernel_size: 2 kernel_size: 3 stride: 1 stride: 2 stride: 2 pad: 1",
     (3, 2, 3), (1, 2, 2), (1, 1, 1), (1, 1, 1)),
    ((1, 2, 4, 5, 6), "kernel_size: 2 stride: 2 pad: 0 pad: 1 pad: 1 dilation: 1 dilation: 2 dilation: 1",
     (2, 2, 2), (2, 2, 2), (0, 1, 1), (1, 2, 1)),
])
def test_nd_kernels_match_caffe(kind: str, shape: tuple[int, ...], params: str, kernel: tuple[int, ...],
                                stride: tuple[int, ...], pad: tuple[int, ...], dilation: tuple[int, ...]) -> None:
    """1-D and 3-D convolutions: kernel_size/stride/pad/dilation once or once per spatial axis."""
    g = rng(_seed(kind, shape, params))
    x = g.normal(size=shape).astype(np.float32)
    m, group = 4, 2
    w_shape = (m, shape[1] // group, *kernel) if kind == "Convolution" else (shape[1], m // group, *kernel)
    blobs = _weights(g, w_shape, m)
    out = run(convert_text(_input(shape) + _layer(kind, f"num_output: {m} group: {group} {params}"), {"conv": blobs}),
              {"x": x})["y"]
    ref = caffe_conv if kind == "Convolution" else caffe_deconv
    assert_close(out, ref(x, blobs[0], blobs[1], stride, pad, dilation, group), f"{kind} {len(kernel)}-D")


@pytest.mark.parametrize("kind", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize(("shape", "axis"), [((2, 3, 4, 6, 5), 2), ((2, 3, 4, 6, 5), -3), ((4, 6, 5), 0)])
def test_channel_axis_folds_leading_axes_into_the_batch(kind: str, shape: tuple[int, ...], axis: int) -> None:
    """axis 2 on (A, B, C, H, W): Caffe convolves A·B images of C channels; axis 0 on (C, H, W): one image."""
    m = 5
    g = rng(_seed(kind, shape, axis))
    x = g.normal(size=shape).astype(np.float32)
    channel = axis % len(shape)
    w_shape = (m, shape[channel], 3, 3) if kind == "Convolution" else (shape[channel], m, 3, 3)
    blobs = _weights(g, w_shape, m)
    text = _input(shape) + _layer(kind, f"num_output: {m} kernel_size: 3 stride: 2 pad: 1 axis: {axis}")
    out = run(convert_text(text, {"conv": blobs}), {"x": x})["y"]
    ref = caffe_conv if kind == "Convolution" else caffe_deconv
    want = ref(x.reshape(-1, *shape[channel:]), blobs[0], blobs[1], (2, 2), (1, 1), (1, 1), 1)
    assert_close(out, want.reshape(*shape[:channel], *want.shape[1:]), f"{kind} axis {axis} on {shape}")


@pytest.mark.parametrize("kind", ["Convolution", "Deconvolution"])
def test_force_nd_im2col_only_changes_caffes_implementation(kind: str) -> None:
    """force_nd_im2col picks Caffe's N-D im2col code path; the numbers are the same."""
    g = rng(_seed(kind, "nd"))
    x = g.normal(size=(2, 2, 6, 5)).astype(np.float32)
    blobs = _weights(g, (3, 2, 3, 2) if kind == "Convolution" else (2, 3, 3, 2), 3)
    params = "num_output: 3 kernel_h: 3 kernel_w: 2 stride: 2 pad: 1 dilation: 2 force_nd_im2col: true"
    out = run(convert_text(_input(x.shape) + _layer(kind, params), {"conv": blobs}), {"x": x})["y"]
    ref = caffe_conv if kind == "Convolution" else caffe_deconv
    assert_close(out, ref(x, blobs[0], blobs[1], (2, 2), (1, 1), (2, 2), 1), f"{kind} force_nd_im2col")


@pytest.mark.parametrize("kind", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize("axis", [1, 2])
def test_batch_differs_from_prototxt(kind: str, axis: int) -> None:
    """The batch dimension stays dynamic: a net declared for batch 2 runs batch 5 correctly."""
    declared = (2, 3, 4, 7, 6) if axis == 2 else (2, 4, 7, 6)
    fed = (5, *declared[1:])
    g = rng(axis + len(kind))
    x = g.normal(size=fed).astype(np.float32)
    c, m = declared[axis], 6
    w_shape = (m, c // 2, 3, 2) if kind == "Convolution" else (c, m // 2, 3, 2)
    blobs = _weights(g, w_shape, m)
    params = f"num_output: {m} group: 2 kernel_h: 3 kernel_w: 2 stride: 2 pad: 1 axis: {axis}"
    converted = convert_text(_input(declared) + _layer(kind, params), {"conv": blobs})
    out = run(converted, {"x": x})["y"]
    ref = caffe_conv if kind == "Convolution" else caffe_deconv
    images = x.reshape(-1, *fed[axis:])
    want = ref(images, blobs[0], blobs[1], (2, 2), (1, 1), (1, 1), 2)
    assert_close(out, want.reshape(*fed[:axis], *want.shape[1:]), f"{kind} batch 5 (declared 2)")


@pytest.mark.parametrize("kind", ["Convolution", "Deconvolution"])
def test_several_bottoms_share_the_filters(kind: str) -> None:
    """Caffe convolves each bottom with the same weights into the matching top."""
    shape, m = (2, 3, 6, 6), 4
    g = rng(5)
    xs = [g.normal(size=shape).astype(np.float32) for _ in range(2)]
    blobs = _weights(g, (m, 3, 3, 3) if kind == "Convolution" else (3, m, 3, 3), m)
    text = _input(shape, "a") + _input(shape, "b") + _layer(kind, f"num_output: {m} kernel_size: 3", ("a", "b"),
                                                            ("ya", "yb"))
    converted = convert_text(text, {"conv": blobs})
    outs = run(converted, {"a": xs[0], "b": xs[1]})
    assert len(converted.weights) == 2
    ref = caffe_conv if kind == "Convolution" else caffe_deconv
    for name, x in zip(("ya", "yb"), xs):
        assert_close(outs[name], ref(x, blobs[0], blobs[1], (1, 1), (0, 0), (1, 1), 1), f"{kind} {name}")


@pytest.mark.parametrize(("kind", "w_shape"), [("Convolution", (6, 2, 3, 2)), ("Deconvolution", (4, 3, 3, 2))])
def test_blob_shapes_and_fillers(kind: str, w_shape: tuple[int, ...]) -> None:
    """Without a caffemodel the initializers have Caffe's blob shapes; the bias filler defaults to 0."""
    text = _input((2, 4, 5, 5)) + _layer(
        kind, 'num_output: 6 group: 2 kernel_h: 3 kernel_w: 2 weight_filler { type: "constant" value: 0.5 }')
    converted = convert_text(text)
    weight, bias = converted.weights.values()
    assert weight.shape == w_shape and bias.shape == (6,)
    assert np.all(weight == 0.5) and np.all(bias == 0)
    x = rng(3).normal(size=(2, 4, 5, 5)).astype(np.float32)
    ref = caffe_conv if kind == "Convolution" else caffe_deconv
    assert_close(run(converted, {"x": x})["y"], ref(x, weight, bias, (1, 1), (0, 0), (1, 1), 2), f"{kind} filled")


def test_default_weight_filler_is_zero() -> None:
    converted = convert_text(_input((1, 2, 4, 4)) + _layer("Convolution", "num_output: 3 kernel_size: 3 "
                                                                         "bias_filler { type: \"constant\" value: 2 }"))
    weight, bias = converted.weights.values()
    assert np.all(weight == 0) and np.all(bias == 2)
    out = run(converted, {"x": np.ones((1, 2, 4, 4), np.float32)})["y"]
    assert_close(out, np.full((1, 3, 2, 2), 2, np.float32), "zero-filled conv")


@pytest.mark.parametrize(("kind", "shape", "params", "match"), [
    ("Convolution", (1, 2, 5, 5), "num_output: 2", r"kernel_size must be specified once.*0 times; 2 spatial"),
    ("Convolution", (1, 2, 5, 5, 5), "num_output: 2 kernel_h: 3 kernel_w: 3", r"kernel_h & kernel_w can only"),
    ("Convolution", (1, 2, 5, 5), "num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3", r"not both"),
    ("Convolution", (1, 2, 5, 5), "num_output: 2 kernel_h: 3", r"kernel size \[3, 0\] has a zero entry"),
    ("Convolution", (1, 2, 5, 5, 5), "num_output: 2 kernel_size: 3 kernel_size: 3", r"specified 2 times; 3 spatial"),
    ("Convolution", (1, 2, 5, 5), "num_output: 2 kernel_size: 3 stride: 0", r"stride \[0, 0\] has a zero"),
    ("Convolution", (1, 2, 5, 5), "num_output: 2 kernel_size: 3 dilation: 0", r"dilation \[0, 0\]"),
    ("Convolution", (1, 3, 5, 5), "num_output: 2 kernel_size: 3 group: 2", r"group 2 must divide.*\(3\).*\(2\)"),
    ("Convolution", (1, 2, 5, 5), "kernel_size: 3", r"num_output must be set"),
    ("Convolution", (1, 2, 5, 5), "num_output: 2 kernel_size: 5 dilation: 2", r"input size 5 with pad 0.*extent 9"),
    ("Convolution", (1, 2), "num_output: 2 kernel_size: 1", r"0 spatial axes"),
    ("Convolution", (1, 2, 3, 3, 3, 3), "num_output: 2 kernel_size: 1", r"4 spatial axes.*1 to 3"),
    ("Deconvolution", (1, 2, 3, 3), "num_output: 2 kernel_size: 2 pad: 2", r"pad 2 crops away the whole output"),
    ("Deconvolution", (1, 2, 3, 3), "num_output: 2 kernel_size: 2 axis: 4", r"axis 4 is out of range"),
])
def test_errors_name_the_problem(kind: str, shape: tuple[int, ...], params: str, match: str) -> None:
    with pytest.raises(LayerError, match=match):
        convert_text(_input(shape) + _layer(kind, params))


def test_bottoms_of_different_shapes_are_refused() -> None:
    text = _input((1, 2, 5, 5), "a") + _input((1, 2, 6, 5), "b") + _layer(
        "Convolution", "num_output: 2 kernel_size: 3", ("a", "b"), ("ya", "yb"))
    with pytest.raises(LayerError, match=r"All inputs must have the same shape.*\[1, 2, 6, 5\]"):
        convert_text(text)


# --- real Caffe: layer_zoo's grouped conv and grouped deconv ------------------------------
@pytest.mark.parametrize("layer", ["conv_g", "deconv"])
def test_layer_zoo_grouped_layers_match_caffe(layer: str) -> None:
    """Fed Caffe's own bottom blob, with the zoo's caffemodel (tolerances from case.json)."""
    case = json.loads((ZOO / "case.json").read_text())
    text, feeds, want = reference_subnet("layer_zoo", [layer])
    caffemodel = load_weights(ZOO / "weights.caffemodel")
    converted = convert_text(text, {layer: [b.data for b in caffemodel.blobs[layer]]})
    assert [list(w.shape) for w in converted.weights.values()] == case["layer_param_shapes"][layer]
    assert_close(run(converted, feeds)[layer], want[layer], layer, atol=case["atol"], rtol=case["rtol"])
