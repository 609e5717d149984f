"""Interp (DeepLab / PSPNet) against a numpy transcription of interp_layer.cpp and caffe_cpu_interp2
(tests/spatial_fork_reference.py), through onnxruntime at opsets 11, 13 and 21 and through the trainer,
whose gradient is checked against caffe_cpu_interp2_backward; and against OpenCV DNN's Caffe importer
for the forms it implements (zoom_factor, height and width; it refuses shrink_factor, pads and two bottoms).

Tolerances: atol 1e-5, rtol 1e-4 (measured: tops below 2e-6, gradients below 7e-6 where zoom_factor 8
sums up to 64 weighted diffs into one input).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from caffeonnx.converter.caffe_to_onnx import convert_files, load_net
from caffeonnx.converter.metadata import net_without_blobs
from caffeonnx.converter.onnx_to_caffe import convert_to_caffe_files
from caffeonnx.errors import LayerError
from tests.converter.layers.graph_grad import forward_backward
from tests.helpers import assert_close, convert_text, rng, run
from tests.spatial_fork_reference import interp_backward, interp_forward, interp_size

cv2 = pytest.importorskip("cv2")


def _input(shape: tuple[int, ...], name: str = "data") -> str:
    return f'input: "{name}"\n' + "".join(f"input_dim: {d}\n" for d in shape)


def _interp(param: str, bottoms: tuple[str, ...] = ("conv5_3_pool6_conv",), top: str = "conv5_3_pool6_interp") -> str:
    """An Interp layer as pspnet50_ADE20K_473.prototxt lays it out."""
    lines = "".join(f'  bottom: "{b}"\n' for b in bottoms)
    body = f"  interp_param {{\n    {param}\n  }}\n" if param else ""
    return f'layer {{\n  name: "{top}"\n  type: "Interp"\n{lines}  top: "{top}"\n{body}}}\n'


# (input H, W, interp_param, size rule for the reference) — PSPNet's pyramid (1, 2, 3, 6 bins to 60x60, here
# 12x12), its final zoom_factor 8, DeepLab's label shrink_factor, cropping pads and non-square sizes.
CASES = [
    (1, 1, "height: 12\n    width: 12", {"size": (12, 12)}),
    (2, 2, "height: 12\n    width: 12", {"size": (12, 12)}),
    (3, 3, "height: 12\n    width: 12", {"size": (12, 12)}),
    (6, 6, "height: 12\n    width: 12", {"size": (12, 12)}),
    (7, 9, "zoom_factor: 8", {"zoom": 8}),
    (13, 10, "height: 5\n    width: 17", {"size": (5, 17)}),
    (17, 21, "shrink_factor: 8\n    pad_beg: 0\n    pad_end: 0", {"shrink": 8}),
    (9, 11, "zoom_factor: 2\n    pad_beg: -1\n    pad_end: -2", {"zoom": 2, "pad_beg": -1, "pad_end": -2}),
    (9, 11, "shrink_factor: 3\n    pad_end: -1", {"shrink": 3, "pad_end": -1}),
    (9, 11, "zoom_factor: 1\n    pad_beg: -2", {"zoom": 1, "pad_beg": -2}),  # crop only: the copy case
    (4, 5, "height: 1\n    width: 1", {"size": (1, 1)}),
    (4, 5, "height: 4\n    width: 5", {"size": (4, 5)}),
]
OPENCV_FORMS = ("zoom_factor: 8", "height:")


@pytest.mark.parametrize(("height", "width", "param", "rule"), CASES)
@pytest.mark.parametrize("opset", [11, 13, 21])
def test_interp_matches_caffe(tmp_path: Path, height: int, width: int, param: str, rule: dict, opset: int) -> None:
    """onnxruntime and the trainer give caffe_cpu_interp2's top (batch 3 on a net declared for 1); the
    trainer's input gradient is caffe_cpu_interp2_backward's, zero outside the cropped region."""
    text = _input((1, 4, height, width), "conv5_3_pool6_conv") + _interp(param)
    x = rng(height * 31 + width).normal(size=(3, 4, height, width)).astype(np.float32)
    pads = {k: rule[k] for k in ("pad_beg", "pad_end") if k in rule}
    out_h, out_w = interp_size(height, width, **{k: v for k, v in rule.items()})
    want = interp_forward(x, out_h, out_w, **pads)
    got = run(convert_text(text, opset=opset), {"conv5_3_pool6_conv": x})["conv5_3_pool6_interp"]
    assert_close(got, want, f"Interp {param!r} at opset {opset}")
    if opset == 21:
        dy = rng(5).normal(size=want.shape).astype(np.float32)
        top, grads = forward_backward(text, {"conv5_3_pool6_conv": x}, "conv5_3_pool6_interp", dy,
                                      ["conv5_3_pool6_conv"])
        assert_close(top, want, "top (trainer)")
        assert_close(grads["conv5_3_pool6_conv"], interp_backward(dy, x.shape, **pads), "bottom diff")
        if param.startswith(OPENCV_FORMS):
            proto = tmp_path / "interp.prototxt"
            proto.write_text(text.replace("input_dim: 1\n", "input_dim: 3\n", 1))
            net = cv2.dnn.readNetFromCaffe(str(proto))
            net.setInput(x)
            assert_close(net.forward(), want, "OpenCV DNN's Interp")


def test_second_bottom_gives_the_size() -> None:
    """The 2-bottom form resizes to the second bottom's height and width; that bottom gets no gradient."""
    text = (_input((1, 3, 5, 6), "score") + _input((1, 1, 17, 9), "label")
            + 'layer {\n  name: "score_interp"\n  type: "Interp"\n  bottom: "score"\n  bottom: "label"\n'
              '  top: "score_interp"\n}\n')
    x = rng(11).normal(size=(2, 3, 5, 6)).astype(np.float32)
    label = np.zeros((2, 1, 17, 9), np.float32)
    want = interp_forward(x, 17, 9)
    assert_close(run(convert_text(text), {"score": x, "label": label})["score_interp"], want, "top")
    dy = rng(12).normal(size=want.shape).astype(np.float32)
    _, grads = forward_backward(text, {"score": x, "label": label}, "score_interp", dy, ["score", "label"])
    assert_close(grads["score"], interp_backward(dy, x.shape), "bottom diff")
    assert not grads["label"].any()


@pytest.mark.parametrize(("shape", "param", "bottoms", "match"), [
    ((1, 1, 4, 4), "zoom_factor: 2\n    height: 3\n    width: 3", 1, r"give exactly one \(got zoom_factor, height and"),
    ((1, 1, 4, 4), "height: 3", 1, r"give exactly one \(got none\)"),
    ((1, 1, 4, 4), "", 1, r"give exactly one \(got none\)"),
    ((1, 1, 4, 4), "shrink_factor: 2", 2, r"got shrink_factor, a second bottom"),
    ((1, 1, 4, 4), "zoom_factor: 2\n    pad_end: 1", 1, r"Only supports non-pos padding"),
    ((1, 1, 4, 4), "zoom_factor: 0", 1, r"Zoom factor must be positive"),
    ((1, 1, 4, 4), "shrink_factor: 0", 1, r"Shrink factor must be positive"),
    ((1, 1, 4, 4), "zoom_factor: 2\n    pad_beg: -2\n    pad_end: -2", 1, r"cropped .* is 0x0"),
    ((1, 1, 4, 4), "height: 0\n    width: 3", 1, r"output would be 0x3"),
])
def test_interp_errors_name_the_problem(shape: tuple[int, ...], param: str, bottoms: int, match: str) -> None:
    names = ("data", "ref")[:bottoms]
    text = "".join(_input(shape, n) for n in names) + _interp(param, names, "interp")
    with pytest.raises(LayerError, match=match):
        convert_text(text)


def test_interp_needs_opset_11() -> None:
    with pytest.raises(LayerError, match="opset 11 or later"):
        convert_text(_input((1, 1, 4, 4), "conv5_3_pool6_conv") + _interp("zoom_factor: 2"), opset=10)


def test_interp_round_trips(tmp_path: Path) -> None:
    """to-caffe writes each Interp back unchanged, and the second conversion builds the same graph."""
    text = (_input((1, 4, 6, 6), "conv5_3_pool6_conv") + _interp("height: 12\n    width: 12")
            + _interp("shrink_factor: 2\n    pad_beg: -1", ("conv5_3_pool6_interp",), "shrunk"))
    prototxt = tmp_path / "psp.prototxt"
    prototxt.write_text(text)
    first = convert_files(prototxt)
    first.save(tmp_path / "psp.onnx")
    convert_to_caffe_files(tmp_path / "psp.onnx", tmp_path / "back.prototxt")
    assert net_without_blobs(load_net(tmp_path / "back.prototxt")) == net_without_blobs(load_net(prototxt))
    assert convert_files(tmp_path / "back.prototxt").model.graph == first.model.graph
