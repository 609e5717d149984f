"""Concat, Split, Slice, Flatten, Reshape, Squeeze/Unsqueeze, Transpose, DepthToSpace, Identity/Dropout/Cast
(exact copies)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from caffeonnx.converter.onnx_to_caffe import onnx_to_caffe
from caffeonnx.errors import CaffeOnnxError, UnsupportedError
from tests.converter.foreign.helpers import check_conversion, feeds_for, layer_types, make_model, node

SHAPE = [2, 6, 4, 5]
I64 = np.int64


def test_concat(tmp_path: Path) -> None:
    model = make_model([node("Concat", ["a", "b", "c"], axis=-3)], {"a": SHAPE, "b": [2, 2, 4, 5], "c": SHAPE},
                       ["y"])
    result = check_conversion(model, feeds_for(model, 0), tmp_path)
    assert result.net.layer[-1].concat_param.axis == 1


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_with_an_unused_part(opset: int, tmp_path: Path) -> None:
    inits, attrs, inputs = {}, {"axis": 1}, ["x"]
    if opset == 11:
        attrs["split"] = [1, 2, 3]
    elif opset == 13:
        inits, inputs = {"s": np.array([1, 2, 3], I64)}, ["x", "s"]
    else:
        attrs["num_outputs"] = 3
    nodes = [node("Split", inputs, ["a", "b", "unused"], **attrs), node("Add", ["a", "a"], ["y1"]),
             node("Relu", ["b"], ["y2"])]
    model = make_model(nodes, {"x": SHAPE}, ["y1", "y2"], inits, opset=opset)
    result = check_conversion(model, feeds_for(model, 1), tmp_path)
    assert layer_types(result)[1:3] == ["Slice", "Silence"]


@pytest.mark.parametrize(("starts", "ends", "axes"), [
    ([1], [4], [1]), ([0, -3], [2, 100], [2, 3]), ([2], [6], [-3]), ([0], [6], [1]),
], ids=["middle", "two_axes_negative", "tail", "whole"])
def test_slice(starts: list[int], ends: list[int], axes: list[int], tmp_path: Path) -> None:
    inits = {"st": np.array(starts, I64), "en": np.array(ends, I64), "ax": np.array(axes, I64)}
    model = make_model([node("Slice", ["x", "st", "en", "ax"])], {"x": SHAPE}, ["y"], inits)
    check_conversion(model, feeds_for(model, 2), tmp_path)


def test_slice_attributes_before_opset_10(tmp_path: Path) -> None:
    model = make_model([node("Slice", ["x"], starts=[1, 1], ends=[3, -1], axes=[1, 3])], {"x": SHAPE}, ["y"], opset=9)
    check_conversion(model, feeds_for(model, 3), tmp_path)


@pytest.mark.parametrize(("nodes", "inits"), [
    ([node("Flatten", ["x"], axis=1)], {}),
    ([node("Flatten", ["x"], axis=2)], {}),
    ([node("Flatten", ["x"], axis=0)], {}),
    ([node("Reshape", ["x", "s"])], {"s": np.array([0, -1, 5], I64)}),
    ([node("Unsqueeze", ["x", "a"])], {"a": np.array([1], I64)}),
    ([node("Squeeze", ["x", "a"])], {"a": np.array([2], I64)}),
    ([node("Transpose", ["x"], perm=[0, 2, 1, 3])], {}),
], ids=["flatten1", "flatten2", "flatten0", "reshape", "unsqueeze", "squeeze", "transpose_size1_axis"])
def test_reshape_like(nodes: list, inits: dict, tmp_path: Path) -> None:
    shape = [2, 6, 1, 5] if nodes[0].op_type in ("Squeeze", "Transpose") else SHAPE
    model = make_model(nodes, {"x": shape}, ["y"], inits)
    result = check_conversion(model, feeds_for(model, 4), tmp_path)
    assert layer_types(result)[1] in ("Flatten", "Reshape")


def test_transpose_needs_extensions_for_permute(tmp_path: Path) -> None:
    model = make_model([node("Transpose", ["x"], perm=[0, 2, 3, 1])], {"x": SHAPE}, ["y"])
    result = check_conversion(model, feeds_for(model, 5), tmp_path, extensions=True)
    assert layer_types(result) == ["Input", "Permute"]


def test_aliases_write_no_layer(tmp_path: Path) -> None:
    """Identity, Dropout (inference) and Cast to float only rename; a graph output alias gets a Split."""
    nodes = [node("Identity", ["x"], ["a"]), node("Dropout", ["a", "ratio"], ["b"]), node("Cast", ["b"], ["c"], to=1),
             node("Relu", ["c"], ["y"]), node("Identity", ["c"], ["z"])]
    model = make_model(nodes, {"x": SHAPE}, ["y", "z"], {"ratio": np.array(0.5, np.float32)})
    result = check_conversion(model, feeds_for(model, 6), tmp_path)
    assert layer_types(result) == ["Input", "ReLU", "Split"]
    assert list(result.net.layer[1].bottom) == ["x"]


@pytest.mark.parametrize(("shape", "r"), [([2, 8, 3, 5], 2), ([1, 18, 2, 4], 3)])
def test_depth_to_space_crd_is_the_forks_pixel_shuffle(shape: list[int], r: int, tmp_path: Path) -> None:
    """torch's pixel_shuffle (CRD) with extensions: one PixelShuffle, exact both ways; a BVLC target refuses it."""
    model = make_model([node("DepthToSpace", ["x"], blocksize=r, mode="CRD")], {"x": shape}, ["y"])
    result = check_conversion(model, feeds_for(model, 7), tmp_path, extensions=True, atol=0, rtol=0)
    assert layer_types(result) == ["Input", "PixelShuffle"]
    assert result.net.layer[1].pixelshuffle_param.upscale_factor == r
    with pytest.raises(CaffeOnnxError, match=r"\(PixelShuffle, from PixelShuffle forks\)"):
        onnx_to_caffe(model, extensions=True, target="bvlc")
    assert layer_types(onnx_to_caffe(model, extensions=True, target="pixel-shuffle"))[1:] == ["PixelShuffle"]


@pytest.mark.parametrize(("mode", "extensions", "message"), [
    ("CRD", False, r"no sub-pixel layer: pass --allow-extensions"),
    ("DCR", True, r"mode 'DCR'"),
])
def test_depth_to_space_refused(mode: str, extensions: bool, message: str) -> None:
    model = make_model([node("DepthToSpace", ["x"], blocksize=2, mode=mode)], {"x": [1, 8, 3, 3]}, ["y"])
    with pytest.raises(UnsupportedError, match=message):
        onnx_to_caffe(model, extensions=extensions)
