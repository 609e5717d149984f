"""Resize (DenseBox's bilinear resize, as in yangyi02/densebox, happynear/caffe-windows and inisis/caffe)
against a numpy transcription of resize_layer.cpp with util_img.cpp's GetBiLinearResizeMatRules_cpu,
BiLinearResizeMat_cpu and the locs_ scatter of Backward_cpu, all in float32 as the C++ runs.

Checked through onnxruntime at opsets 11, 13 and 21 (batch 3 on a net declared for 1) and through the
trainer's GraphModule (top and bottom diff), for both size modes, upscale, downscale, mixed and
non-square sizes, the copy case, and a 1-pixel input.  OpenCV DNN has no counterpart: its Caffe
importer maps type "Resize" to its own layer, which wants an `interpolation` DenseBox's prototxts lack.

Tolerances: atol 1e-5, rtol 1e-4 (measured: tops within 1.7e-6, bottom diffs within 2.9e-6; onnxruntime
divides by the scale H_out/H where the C++ multiplies by H/H_out, a 1-ulp difference in the sampling
position).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from caffeonnx.converter import forks
from caffeonnx.converter.caffe_io import parse_prototxt, read_caffemodel, write_caffemodel
from caffeonnx.converter.caffe_to_onnx import convert_files, load_net
from caffeonnx.converter.metadata import net_without_blobs
from caffeonnx.converter.onnx_to_caffe import convert_to_caffe_files
from caffeonnx.errors import CaffeOnnxError, LayerError
from caffeonnx.proto import caffe_pb2
from caffeonnx.wire import length_delimited
from tests.converter.layers.graph_grad import forward_backward
from tests.helpers import assert_close, convert_text, rng, run

F32 = np.float32


# --- the C++ in numpy -----------------------------------------------------------------------------------
def caffe_rules(src_h: int, src_w: int, dst_h: int, dst_w: int) -> tuple[np.ndarray, np.ndarray]:
    """GetBiLinearResizeMatRules_cpu: per top position, four (offset into the bottom plane, weight) pairs.

    scale = src / (float)dst; fh = dst_row * scale (float); src_row = floorf(fh); the weights are
    |1 − frac| and |frac|; a neighbour at src_row + 1 == src_h (or column) keeps loc 0, weight 0.
    """
    scale_h, scale_w = F32(src_h) / F32(dst_h), F32(src_w) / F32(dst_w)
    fh = np.arange(dst_h, dtype=F32) * scale_h
    fw = np.arange(dst_w, dtype=F32) * scale_w
    row, col = np.floor(fh).astype(np.int64), np.floor(fw).astype(np.int64)
    fh, fw = fh - row.astype(F32), fw - col.astype(F32)
    wh0, wh1 = np.abs(F32(1) - fh)[:, None], np.abs(fh)[:, None]
    ww0, ww1 = np.abs(F32(1) - fw)[None, :], np.abs(fw)[None, :]
    idx = row[:, None] * src_w + col[None, :]
    right = np.broadcast_to((col + 1 < src_w)[None, :], idx.shape)
    down = np.broadcast_to((row + 1 < src_h)[:, None], idx.shape)
    zero = np.zeros(idx.shape, np.int64)
    locs = np.stack([idx, np.where(right, idx + 1, zero), np.where(down, idx + src_w, zero),
                     np.where(right & down, idx + src_w + 1, zero)], -1)
    weights = np.stack([wh0 * ww0, np.where(right, wh0 * ww1, F32(0)), np.where(down, wh1 * ww0, F32(0)),
                        np.where(right & down, wh1 * ww1, F32(0))], -1).astype(F32)
    return locs.reshape(-1, 4), weights.reshape(-1, 4)


def caffe_forward(x: np.ndarray, dst_h: int, dst_w: int) -> np.ndarray:
    """BiLinearResizeMat_cpu on every (n, c) plane: w1·x[loc1] (+ w2·x[loc2]) (+ w3·x[loc3]) (+ w4·x[loc4])."""
    n, c, h, w = x.shape
    locs, weights = caffe_rules(h, w, dst_h, dst_w)
    planes = x.reshape(n * c, h * w)
    top = np.zeros((n * c, dst_h * dst_w), F32)
    for k in range(4):  # the dropped terms have weight 0 and add nothing, as the skipped ones do
        top = top + weights[:, k] * planes[:, locs[:, k]]
    return top.reshape(n, c, dst_h, dst_w)


def caffe_backward(top_diff: np.ndarray, bottom_shape: tuple[int, ...]) -> np.ndarray:
    """Backward_cpu: zero the bottom diff, then for each top index in order add top_diff·weight_k at loc_k."""
    n, c, h, w = bottom_shape
    dst_h, dst_w = top_diff.shape[2:]
    locs, weights = caffe_rules(h, w, dst_h, dst_w)
    diff = np.zeros((n * c, h * w), F32)
    planes = top_diff.reshape(n * c, -1)
    for p in range(n * c):  # np.add.at adds in the order given: index-major, loc1..loc4, as the C++ loop
        np.add.at(diff[p], locs.reshape(-1), (planes[p][:, None] * weights).reshape(-1))
    return diff.reshape(bottom_shape)


def caffe_size(h: int, w: int, fixed: tuple[int, int] | None = None,
               scales: tuple[float, float] | None = None) -> tuple[int, int]:
    """Reshape's top size: height/width, or int(out_*_scale * in) with the product in float."""
    if fixed is not None:
        return fixed
    assert scales is not None
    return int(F32(scales[0]) * F32(h)), int(F32(scales[1]) * F32(w))


def test_the_transcription_fades_at_the_far_edge() -> None:
    """2 → 4 columns: x0, (x0 + x1)/2, x1, x1/2: the neighbour past the edge is dropped, not clamped."""
    x = np.array([[[[2.0, 6.0]]]], F32)
    np.testing.assert_array_equal(caffe_forward(x, 1, 4), [[[[2.0, 4.0, 6.0, 3.0]]]])
    # and the backward is the forward's adjoint
    a = rng(0).normal(size=(1, 1, 3, 5)).astype(F32)
    b = rng(1).normal(size=(1, 1, 7, 4)).astype(F32)
    assert abs(float((caffe_forward(a, 7, 4) * b).sum()) - float((a * caffe_backward(b, a.shape)).sum())) < 1e-4


# --- prototxt as the public models write it -------------------------------------------------------------
def _input(shape: tuple[int, ...], name: str = "inception-scale-1") -> str:
    if len(shape) != 4:  # input_dim takes four per input
        return f'input: "{name}"\ninput_shape {{ ' + " ".join(f"dim: {d}" for d in shape) + " }\n\n"
    return f'input: "{name}"\n' + "".join(f"input_dim: {d}\n" for d in shape) + "\n"


def _densebox(param: str, bottom: str = "inception-scale-1", top: str = "inception2-1-resize") -> str:
    """A Resize layer as DenseBox's multi-scale prototxts lay it out (tabs, `layer{`, type before name)."""
    body = "".join(f"\t\t{line}\n" for line in param.splitlines())
    return (f'layer{{\n\ttype: "Resize"\n\tname: "{top}"\n\tbottom: "{bottom}"\n\ttop: "{top}"\n'
            f"\tresize_param{{\n{body}\t}}\n}}\n")


def _windows(param: str, bottom: str = "inception-scale-1", top: str = "inception2-1-resize") -> str:
    """The same layer in the two-space style of caffe-windows' prototxts."""
    return (f'layer {{\n  name: "{top}"\n  type: "Resize"\n  bottom: "{bottom}"\n  top: "{top}"\n'
            f"  resize_param {{ {' '.join(param.splitlines())} }}\n}}\n")


# (input H, W, resize_param, size rule) — DenseBox's pyramid 2x, fixed up/down/mixed/non-square sizes, scales
# whose float product truncates differently from a double one (0.7 · 10 is 7 in float, 6.99999988 in double),
# fractional scales, the copy case, one axis kept, and a 1x1 input.
CASES = [
    (6, 6, "is_pyramid_test: true\nout_height_scale: 2\nout_width_scale: 2", {"scales": (2, 2)}),
    (5, 7, "is_pyramid_test: true\nout_height_scale: 1.5\nout_width_scale: 0.5", {"scales": (1.5, 0.5)}),
    (10, 9, "is_pyramid_test: true\nout_height_scale: 0.7\nout_width_scale: 1.7", {"scales": (0.7, 1.7)}),
    (7, 4, "height: 15\nwidth: 11", {"fixed": (15, 11)}),
    (13, 17, "height: 5\nwidth: 6", {"fixed": (5, 6)}),
    (6, 9, "height: 10\nwidth: 4", {"fixed": (10, 4)}),
    (4, 5, "height: 4\nwidth: 5", {"fixed": (4, 5)}),
    (4, 5, "height: 9\nwidth: 5", {"fixed": (9, 5)}),
    (1, 1, "height: 3\nwidth: 2", {"fixed": (3, 2)}),
    (5, 3, "height: 1\nwidth: 1\nis_pyramid_test: false", {"fixed": (1, 1)}),
    (8, 8, "height: 3\nwidth: 3\nout_height_scale: 4\nout_width_scale: 4", {"fixed": (3, 3)}),  # scales unused
]


@pytest.mark.parametrize(("height", "width", "param", "rule"), CASES)
@pytest.mark.parametrize("opset", [11, 13, 21])
def test_resize_matches_caffe(height: int, width: int, param: str, rule: dict, opset: int) -> None:
    """onnxruntime gives the C++ top; the trainer gives the top and Backward_cpu's bottom diff."""
    style = _densebox if "pyramid_test: true" in param else _windows
    text = _input((1, 4, height, width)) + style(param)
    x = rng(height * 31 + width).normal(size=(3, 4, height, width)).astype(F32)
    want = caffe_forward(x, *caffe_size(height, width, **rule))
    got = run(convert_text(text, opset=opset), {"inception-scale-1": x})["inception2-1-resize"]
    assert_close(got, want, f"Resize {param!r} at opset {opset}")
    if opset == 21:
        dy = rng(5).normal(size=want.shape).astype(F32)
        top, grads = forward_backward(text, {"inception-scale-1": x}, "inception2-1-resize", dy, ["inception-scale-1"])
        assert_close(top, want, "top (trainer)")
        assert_close(grads["inception-scale-1"], caffe_backward(dy, x.shape), "bottom diff (trainer)")


def test_a_densebox_head_chains_resizes() -> None:
    """DenseBox's scale branch: a 2x pyramid Resize feeding a fixed-size one, the two in a row."""
    text = (_input((1, 3, 5, 4)) + _densebox("is_pyramid_test: true\nout_height_scale: 2\nout_width_scale: 2")
            + _windows("height: 7\nwidth: 13", "inception2-1-resize", "resized"))
    x = rng(9).normal(size=(2, 3, 5, 4)).astype(F32)
    want = caffe_forward(caffe_forward(x, 10, 8), 7, 13)
    assert_close(run(convert_text(text), {"inception-scale-1": x})["resized"], want, "chained Resize")
    dy = rng(10).normal(size=want.shape).astype(F32)
    _, grads = forward_backward(text, {"inception-scale-1": x}, "resized", dy, ["inception-scale-1"])
    assert_close(grads["inception-scale-1"], caffe_backward(caffe_backward(dy, (2, 3, 10, 8)), x.shape), "bottom diff")


@pytest.mark.parametrize(("shape", "param", "match"), [
    ((1, 2, 4, 4), "width: 3", r"output height is required"),
    ((1, 2, 4, 4), "height: 3", r"output width is required"),
    ((1, 2, 4, 4), "out_height_scale: 2\nout_width_scale: 2", r"output height is required.*is_pyramid_test: true"),
    ((1, 2, 4, 4), "is_pyramid_test: true\nout_height_scale: 2", r"output width scale is required"),
    ((1, 2, 4, 4), "is_pyramid_test: true\nheight: 8\nwidth: 8", r"output height scale is required"),
    ((1, 2, 4, 4), "height: 0\nwidth: 3", r"output would be 0x3"),
    ((1, 2, 10, 4), "is_pyramid_test: true\nout_height_scale: 0.05\nout_width_scale: 1", r"output would be 0x4 .*0\.05"),
    ((1, 2, 4, 4), "is_pyramid_test: true\nout_height_scale: -2\nout_width_scale: 2", r"output would be -8x8"),
    ((1, 2, 4, 4), "is_pyramid_test: true\nout_height_scale: 1e38\nout_width_scale: 2", r"which no int holds"),
    ((1, 2, 4, 4), "height: 100000\nwidth: 100000", r"exceeds INT_MAX"),
    ((2, 4), "height: 3\nwidth: 3", r"has 2 axes; Resize needs \(N, C, H, W\)"),
])
def test_resize_errors_name_the_problem(shape: tuple[int, ...], param: str, match: str) -> None:
    with pytest.raises(LayerError, match=match):
        convert_text(_input(shape) + _windows(param))


def test_resize_needs_opset_11() -> None:
    with pytest.raises(LayerError, match="opset 11 or later"):
        convert_text(_input((1, 1, 4, 4)) + _windows("height: 8\nwidth: 8"), opset=10)


def test_resize_round_trips(tmp_path: Path) -> None:
    """to-caffe writes each Resize back unchanged, and the second conversion builds the same graph."""
    text = (_input((1, 4, 6, 5)) + _densebox("is_pyramid_test: true\nout_height_scale: 2\nout_width_scale: 2")
            + _windows("height: 9\nwidth: 4", "inception2-1-resize", "fixed"))
    prototxt = tmp_path / "densebox.prototxt"
    prototxt.write_text(text)
    first = convert_files(prototxt)
    first.save(tmp_path / "densebox.onnx")
    convert_to_caffe_files(tmp_path / "densebox.onnx", tmp_path / "back.prototxt")
    assert net_without_blobs(load_net(tmp_path / "back.prototxt")) == net_without_blobs(load_net(prototxt))
    assert convert_files(tmp_path / "back.prototxt").model.graph == first.model.graph


def _layer_bytes(name: str, type_: str, fields: bytes) -> bytes:
    body = length_delimited(1, len(name)) + name.encode() + length_delimited(2, len(type_)) + type_.encode() + fields
    return length_delimited(100, len(body)) + body


@pytest.mark.parametrize("number", [231, 3001, 251])  # caffe-windows, DenseBox, inisis/caffe
def test_each_forks_caffemodel_number_is_read_and_231_written(tmp_path: Path, number: int) -> None:
    param = caffe_pb2.ResizeParameter(is_pyramid_test=True, out_height_scale=2, out_width_scale=2)
    payload = param.SerializeToString()
    path = tmp_path / "densebox.caffemodel"
    path.write_bytes(_layer_bytes("inception2-1-resize", "Resize", length_delimited(number, len(payload)) + payload))
    net = read_caffemodel(path).net
    assert net.layer[0].resize_param == param
    out = tmp_path / "again.caffemodel"
    write_caffemodel(out, net, {})
    raw = out.read_bytes()
    assert length_delimited(231, len(payload)) + payload in raw
    assert length_delimited(3001, len(payload)) not in raw and length_delimited(251, len(payload)) not in raw


def test_resize_is_caffe_windows_layer() -> None:
    net = parse_prototxt(_input((1, 2, 4, 4)) + _windows("height: 8\nwidth: 8"))
    assert forks.layer_fork(net.layer[0]) == "caffe-windows"
    forks.retarget(net, "caffe-windows")
    with pytest.raises(CaffeOnnxError, match=r"'inception2-1-resize' \(Resize, from caffe-windows"):
        forks.retarget(net, "bvlc")
