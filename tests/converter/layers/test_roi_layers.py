"""ROIPooling (Fast R-CNN) and PSROIPooling (R-FCN) against numpy transcriptions of the forks' C++
(tests/rcnn_reference.py) and against OpenCV's DNN, which implements both.

Tolerances: ROIPooling is compared bit for bit (equality) with the reference and with OpenCV, and
in the trainer its gradient too (each top diff to its bin's first maximum, ReLU zeros included).
PSROIPooling's means sum in another order than Caffe's loop: atol 1e-5, rtol 1e-5 against the
reference, OpenCV and the backward pass (worst measured: 1.2e-7).  ROIs are seeded, partly or
wholly outside the map, some malformed (x2 < x1), some with scaled coordinates exactly on .5 (C's
round goes away from zero there), with several spatial scales and batch indices.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from caffeonnx.converter.caffe_io import parse_prototxt, write_caffemodel
from caffeonnx.converter.caffe_to_onnx import convert_files, load_net
from caffeonnx.converter.metadata import net_without_blobs
from caffeonnx.converter.onnx_to_caffe import convert_to_caffe_files
from caffeonnx.errors import LayerError
from tests import rcnn_reference as ref
from tests.converter.layers.graph_grad import forward_backward
from tests.helpers import assert_close, convert_text, rng, run


def make_rois(seed: int, count: int, batch: int, scale: float, map_hw: tuple[int, int]) -> np.ndarray:
    """ROIs in image coordinates: a spread from 30% outside the image to 30% beyond its far edge,
    a malformed one, a third whose scaled coordinates land exactly on .5 (ROIPooling rounds those)
    and a third whose own coordinates do (PSROIPooling rounds before scaling)."""
    g = rng(seed)
    image_h, image_w = map_hw[0] / scale, map_hw[1] / scale
    rois = np.zeros((count, 5), dtype=np.float32)
    rois[:, 0] = g.integers(0, batch, count)
    xs = g.uniform(-0.3 * image_w, 1.3 * image_w, (count, 2))
    ys = g.uniform(-0.3 * image_h, 1.3 * image_h, (count, 2))
    rois[:, 1], rois[:, 3] = xs.min(1), xs.max(1)
    rois[:, 2], rois[:, 4] = ys.min(1), ys.max(1)
    rois[0, 1:] = rois[0, [3, 4, 1, 2]]  # malformed: x2 < x1, y2 < y1
    halves = (g.integers(-2, max(map_hw), (count // 3, 4)) + 0.5) / scale
    rois[1:1 + count // 3, 1:] = halves.astype(np.float32)  # k + 0.5 after scaling (exact for these scales)
    raw = g.integers(-8, int(max(image_h, image_w)), (count // 3, 4)) + 0.5
    rois[1 + count // 3:1 + 2 * (count // 3), 1:] = raw.astype(np.float32)  # k + 0.5 before scaling (PSROIPooling)
    return rois


def fast_rcnn_net(n: int, c: int, hw: tuple[int, int], count: int, pooled: tuple[int, int], scale: float,
                  relu: bool = True) -> str:
    """The ROI head as Fast R-CNN's VGG16 test.prototxt writes it (inputs by `input:`, a ReLU before)."""
    text = f"""name: "VGG_ILSVRC_16_layers"
input: "conv5_3"
input_shape {{
  dim: {n}
  dim: {c}
  dim: {hw[0]}
  dim: {hw[1]}
}}
input: "rois"
input_shape {{
  dim: {count} # to be changed on-the-fly to num ROIs
  dim: 5 # [batch ind, x1, y1, x2, y2] zero-based indexing
}}
layer {{
  name: "relu5_3"
  type: "ReLU"
  bottom: "conv5_3"
  top: "conv5_3"
}}
layer {{
  name: "roi_pool5"
  type: "ROIPooling"
  bottom: "conv5_3"
  bottom: "rois"
  top: "pool5"
  roi_pooling_param {{
    pooled_w: {pooled[1]}
    pooled_h: {pooled[0]}
    spatial_scale: {scale!r} # 1/{round(1 / scale)}
  }}
}}
"""
    return text if relu else text.replace('''layer {
  name: "relu5_3"
  type: "ReLU"
  bottom: "conv5_3"
  top: "conv5_3"
}
''', "")


def rfcn_net(n: int, dim: int, group: int, hw: tuple[int, int], count: int, scale: float) -> str:
    """The PSROI head as R-FCN's test_agnostic.prototxt writes it (bottoms before the name)."""
    return f"""name: "ResNet-50"
layer {{ name: "input" type: "Input" top: "rfcn_cls" top: "rois"
  input_param {{ shape {{ dim: {n} dim: {dim * group * group} dim: {hw[0]} dim: {hw[1]} }}
                shape {{ dim: {count} dim: 5 }} }} }}
layer {{
    bottom: "rfcn_cls"
    bottom: "rois"
    top: "psroipooled_cls_rois"
    name: "psroipooled_cls_rois"
    type: "PSROIPooling"
    psroi_pooling_param {{
        spatial_scale: {scale!r}
        output_dim: {dim}
        group_size: {group}
    }}
}}
"""


def opencv_forward(tmp_path: Path, text: str, feeds: dict[str, np.ndarray], layer: str) -> np.ndarray:
    """The layer's top as cv2.dnn computes it from the prototxt and a caffemodel written by caffeonnx."""
    proto, model = tmp_path / "deploy.prototxt", tmp_path / "weights.caffemodel"
    proto.write_text(text)
    write_caffemodel(model, parse_prototxt(text, "<test>"), {})
    net = cv2.dnn.readNetFromCaffe(str(proto), str(model))
    for name, value in feeds.items():
        net.setInput(value, name)
    return net.forward(layer)


# (N, C, H, W), ROIs, (pooled_h, pooled_w), spatial_scale
ROI_CASES = [
    ((1, 8, 14, 19), 20, (7, 7), 0.0625),
    ((2, 5, 13, 17), 16, (6, 7), 0.0625),
    ((2, 3, 25, 9), 12, (3, 5), 0.125),
    ((1, 4, 6, 6), 10, (7, 7), 0.5),  # more bins than cells: empty and repeated bins
    ((3, 2, 10, 31), 15, (2, 9), 1.0),
    ((1, 6, 1, 12), 8, (2, 2), 0.25),  # a single row
]


def roi_feeds(seed: int, shape: tuple[int, ...], count: int, scale: float) -> dict[str, np.ndarray]:
    x = rng(seed).normal(size=shape).astype(np.float32)
    x[:, :, ::3] = -np.abs(x[:, :, ::3])  # rows of negatives: bins whose maximum is below zero
    return {"conv5_3": x, "rois": make_rois(seed, count, shape[0], scale, shape[2:])}


@pytest.mark.parametrize(("shape", "count", "pooled", "scale"), ROI_CASES)
@pytest.mark.parametrize("relu", [True, False])
def test_roi_pooling_matches_fast_rcnn(shape: tuple[int, ...], count: int, pooled: tuple[int, int],
                                       scale: float, relu: bool) -> None:
    """One MaxRoiPool node, equal bit for bit to ROIPoolingLayer::Forward_cpu, on ReLU outputs (zeros: ties) and
    on raw features (bins whose maximum is negative)."""
    text = fast_rcnn_net(*shape[:2], shape[2:], count, pooled, scale, relu=relu)
    converted = convert_text(text)
    assert [n.op_type for n in converted.model.graph.node].count("MaxRoiPool") == 1
    feeds = roi_feeds(20, shape, count, scale)
    x = np.maximum(feeds["conv5_3"], 0) if relu else feeds["conv5_3"]
    want, _ = ref.roi_pool(x, feeds["rois"], *pooled, scale)
    assert (want < 0).any() != relu
    assert converted.shapes["pool5"] == want.shape
    np.testing.assert_array_equal(run(converted, feeds)["pool5"], want)


@pytest.mark.parametrize(("shape", "count", "pooled", "scale"), ROI_CASES[:4])
def test_roi_pooling_matches_opencv(shape: tuple[int, ...], count: int, pooled: tuple[int, int], scale: float,
                                    tmp_path: Path) -> None:
    text = fast_rcnn_net(*shape[:2], shape[2:], count, pooled, scale)
    feeds = roi_feeds(21, shape, count, scale)
    np.testing.assert_array_equal(run(convert_text(text), feeds)["pool5"],
                                  opencv_forward(tmp_path, text, feeds, "roi_pool5"))


@pytest.mark.parametrize(("shape", "count", "pooled", "scale"), ROI_CASES[1:5])
@pytest.mark.parametrize("ties", [False, True])
def test_roi_pooling_trains_like_caffe(shape: tuple[int, ...], count: int, pooled: tuple[int, int], scale: float,
                                       ties: bool) -> None:
    """The trainer's forward equals Caffe's and its gradient is Backward_cpu's: each top diff to the bin's argmax,
    the first maximum in row-major order when several are equal (`ties`: zeros and repeated values)."""
    text = fast_rcnn_net(*shape[:2], shape[2:], count, pooled, scale, relu=False)
    feeds = roi_feeds(22, shape, count, scale)
    if ties:
        feeds["conv5_3"] = np.maximum(np.round(feeds["conv5_3"] * 2), 0).astype(np.float32)
    want, argmax = ref.roi_pool(feeds["conv5_3"], feeds["rois"], *pooled, scale)
    top_diff = rng(23).normal(size=want.shape).astype(np.float32)
    got, grads = forward_backward(text, feeds, "pool5", top_diff, ["conv5_3"])
    np.testing.assert_array_equal(got, want)
    assert_close(grads["conv5_3"], ref.roi_pool_backward(feeds["conv5_3"].shape, feeds["rois"], argmax, top_diff),
                 "d conv5_3", atol=1e-6, rtol=1e-6)


def test_roi_blob_may_be_four_dimensional() -> None:
    """Caffe only checks C·H·W == 5: an R x 5 x 1 x 1 ROI blob works the same."""
    text = """layer { name: "input" type: "Input" top: "feat" top: "rois"
  input_param { shape { dim: 1 dim: 3 dim: 9 dim: 9 } shape { dim: 4 dim: 5 dim: 1 dim: 1 } } }
layer { name: "roi_pool" type: "ROIPooling" bottom: "feat" bottom: "rois" top: "pooled"
  roi_pooling_param { pooled_w: 3 pooled_h: 3 spatial_scale: 0.125 } }
"""
    feeds = {"feat": rng(24).normal(size=(1, 3, 9, 9)).astype(np.float32), "rois": make_rois(24, 4, 1, 0.125, (9, 9))}
    want, _ = ref.roi_pool(feeds["feat"], feeds["rois"], 3, 3, 0.125)
    np.testing.assert_array_equal(run(convert_text(text), {**feeds, "rois": feeds["rois"].reshape(4, 5, 1, 1)})["pooled"],
                                  want)


@pytest.mark.parametrize(("param", "rois", "message"), [
    ("pooled_w: 7", "dim: 3 dim: 5", r"pooled_h and pooled_w must be > 0 \(got pooled_h 0, pooled_w 7\)"),
    ("pooled_w: 7 pooled_h: 7", "dim: 3 dim: 4", r"ROI blob 'rois' has shape \[3, 4\]: ROI layer C x W x H must be == 5"),
])
def test_roi_pooling_refuses_what_caffe_refuses(param: str, rois: str, message: str) -> None:
    text = (f'layer {{ name: "input" type: "Input" top: "feat" top: "rois" input_param {{ shape {{ dim: 1 dim: 2 '
            f'dim: 4 dim: 4 }} shape {{ {rois} }} }} }}\n'
            f'layer {{ name: "roi_pool5" type: "ROIPooling" bottom: "feat" bottom: "rois" top: "pool5" '
            f'roi_pooling_param {{ {param} }} }}\n')
    with pytest.raises(LayerError, match=r"'roi_pool5' \(ROIPooling\): " + message):
        convert_text(text)


# (N, output_dim, group_size, H, W), ROIs, spatial_scale
PSROI_CASES = [
    ((1, 3, 7, 14, 19), 12, 0.0625),  # R-FCN's 7 x 7 position-sensitive grid
    ((2, 2, 3, 13, 17), 16, 0.0625),
    ((2, 4, 2, 9, 25), 10, 0.125),
    ((1, 2, 5, 4, 6), 9, 0.5),  # more bins than cells
    ((3, 1, 1, 10, 11), 12, 1.0),
]


def psroi_feeds(seed: int, n: int, channels: int, hw: tuple[int, int], count: int,
                scale: float) -> dict[str, np.ndarray]:
    return {"rfcn_cls": rng(seed).normal(size=(n, channels, *hw)).astype(np.float32),
            "rois": make_rois(seed, count, n, scale, hw)}


@pytest.mark.parametrize(("dims", "count", "scale"), PSROI_CASES)
def test_psroi_pooling_matches_rfcn(dims: tuple[int, ...], count: int, scale: float) -> None:
    n, dim, group, h, w = dims
    converted = convert_text(rfcn_net(n, dim, group, (h, w), count, scale))
    feeds = psroi_feeds(30, n, dim * group * group, (h, w), count, scale)
    want = ref.psroi_pool(feeds["rfcn_cls"], feeds["rois"], dim, group, scale)
    assert converted.shapes["psroipooled_cls_rois"] == want.shape
    assert_close(run(converted, feeds)["psroipooled_cls_rois"], want, "psroipooled_cls_rois", atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("dims", "count", "scale"), PSROI_CASES[:4])
def test_psroi_pooling_matches_opencv(dims: tuple[int, ...], count: int, scale: float, tmp_path: Path) -> None:
    n, dim, group, h, w = dims
    text = rfcn_net(n, dim, group, (h, w), count, scale)
    feeds = psroi_feeds(31, n, dim * group * group, (h, w), count, scale)
    assert_close(run(convert_text(text), feeds)["psroipooled_cls_rois"],
                 opencv_forward(tmp_path, text, feeds, "psroipooled_cls_rois"), "vs OpenCV", atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("dims", "count", "scale"), PSROI_CASES[1:4])
def test_psroi_pooling_trains_like_rfcn(dims: tuple[int, ...], count: int, scale: float) -> None:
    """The trainer's gradient is R-FCN's GPU backward: top diff / bin area over each bin of its channel."""
    n, dim, group, h, w = dims
    text = rfcn_net(n, dim, group, (h, w), count, scale)
    feeds = psroi_feeds(32, n, dim * group * group, (h, w), count, scale)
    top_diff = rng(33).normal(size=(count, dim, group, group)).astype(np.float32)
    got, grads = forward_backward(text, feeds, "psroipooled_cls_rois", top_diff, ["rfcn_cls"])
    assert_close(got, ref.psroi_pool(feeds["rfcn_cls"], feeds["rois"], dim, group, scale), "forward", atol=1e-5,
                 rtol=1e-5)
    want = ref.psroi_pool_backward(feeds["rfcn_cls"].shape, feeds["rois"], dim, group, scale, top_diff)
    assert_close(grads["rfcn_cls"], want, "d rfcn_cls", atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("param", "channels", "message"), [
    ("spatial_scale: 0.0625 output_dim: 2", 18, r"psroi_pooling_param is missing required field\(s\) \['group_size'\]"),
    ("spatial_scale: 0.0625 output_dim: 2 group_size: 3", 16,
     (r"input channel number does not match layer parameters: bottom 'rfcn_cls' has 16 channels, "
      r"output_dim·group_size² is 2·3² = 18")),
    ("spatial_scale: 0.0625 output_dim: 0 group_size: 3", 18, r"output_dim and group_size must be > 0"),
])
def test_psroi_pooling_refuses_what_rfcn_refuses(param: str, channels: int, message: str) -> None:
    text = (f'layer {{ name: "input" type: "Input" top: "rfcn_cls" top: "rois" input_param {{ shape {{ dim: 1 '
            f'dim: {channels} dim: 4 dim: 4 }} shape {{ dim: 3 dim: 5 }} }} }}\n'
            f'layer {{ name: "psroi" type: "PSROIPooling" bottom: "rfcn_cls" bottom: "rois" top: "pooled" '
            f'psroi_pooling_param {{ {param} }} }}\n')
    with pytest.raises(LayerError, match=r"'psroi' \(PSROIPooling\): " + message):
        convert_text(text)


def test_psroi_pooling_needs_opset_13() -> None:
    with pytest.raises(LayerError, match="needs ONNX opset 13 or later"):
        convert_text(rfcn_net(1, 2, 3, (5, 5), 4, 0.0625), opset=12)


def test_both_layers_round_trip_through_to_caffe(tmp_path: Path) -> None:
    """Caffe -> ONNX -> Caffe gives the same layers back, and the second conversion the same graph."""
    text = fast_rcnn_net(1, 18, (9, 9), 4, (3, 3), 0.0625) + """layer {
    bottom: "conv5_3"
    bottom: "rois"
    top: "psroipooled_cls_rois"
    name: "psroipooled_cls_rois"
    type: "PSROIPooling"
    psroi_pooling_param { spatial_scale: 0.0625 output_dim: 2 group_size: 3 }
}
"""
    proto = tmp_path / "test.prototxt"
    proto.write_text(text)
    first = convert_files(proto)
    first.save(tmp_path / "m.onnx")
    convert_to_caffe_files(tmp_path / "m.onnx", tmp_path / "back.prototxt", tmp_path / "back.caffemodel")
    assert net_without_blobs(load_net(tmp_path / "back.prototxt")) == net_without_blobs(load_net(proto))
    assert convert_files(tmp_path / "back.prototxt", tmp_path / "back.caffemodel").model.graph == first.model.graph
