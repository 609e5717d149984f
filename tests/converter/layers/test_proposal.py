"""Faster R-CNN's proposal layer, both spellings, against a numpy transcription of py-faster-rcnn's
rpn/proposal_layer.py (tests/rcnn_reference.py) and against OpenCV's DNN.

Tolerances: the same boxes must survive in the same order, so the scores top (input values picked
by the layer) is compared for equality; the boxes' corners within atol 1e-4, rtol 1e-6, because
exp() of the size deltas differs by an ulp between onnxruntime (or torch) and the correctly rounded
exp the reference uses (worst measured 3.4e-5 on corners up to 600).  The graph's NMS is ONNX
NonMaxSuppression on +1-shifted corners, whose IoU can differ from py-faster-rcnn's by a few float
ulps (see converter/layers/proposal.py: at most 3.6e-6 measured), so each case asserts that no
decision of the reference (an IoU against nms_thresh, a side against min_size·scale) came within
1e-5 of flipping: the seeds are chosen so (scores are continuous and distinct).
OpenCV's own Proposal layer decodes and suppresses its own way and has no min_size filter: it is
compared where the filter removes nothing (atol 1e-3).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from caffeonnx.converter.caffe_to_onnx import convert_files, load_net
from caffeonnx.converter.layers.proposal import generate_anchors
from caffeonnx.converter.metadata import net_without_blobs
from caffeonnx.converter.onnx_to_caffe import convert_to_caffe_files
from caffeonnx.errors import LayerError, UnsupportedError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.graph_module import GraphModule
from tests import rcnn_reference as ref
from tests.helpers import assert_close, convert_text, rng, run

PYTHON_LAYER = """layer {{
  name: 'proposal'
  type: 'Python'
  bottom: 'rpn_cls_prob_reshape'
  bottom: 'rpn_bbox_pred'
  bottom: 'im_info'
  top: 'rois'{scores_top}
  python_param {{
    module: 'rpn.proposal_layer'
    layer: 'ProposalLayer'
    param_str: "{param_str}"
  }}
}}
"""

CPP_LAYER = """layer {{
  name: "proposal"
  type: "Proposal"
  bottom: "rpn_cls_prob_reshape"
  bottom: "rpn_bbox_pred"
  bottom: "im_info"
  top: "rois"{scores_top}
  proposal_param {{
    {param}
  }}
}}
"""


def rpn_net(anchors: int, hw: tuple[int, int], layer: str) -> str:
    """py-faster-rcnn's test.prototxt inputs (data and im_info by `input:`), the RPN outputs as an Input layer."""
    return f"""name: "VGG_ILSVRC_16_layers"
input: "data"
input_shape {{
  dim: 1
  dim: 3
  dim: {hw[0] * 16}
  dim: {hw[1] * 16}
}}
input: "im_info"
input_shape {{
  dim: 1
  dim: 3
}}
layer {{
  name: "rpn_out"
  type: "Input"
  top: "rpn_cls_prob_reshape"
  top: "rpn_bbox_pred"
  input_param {{ shape {{ dim: 1 dim: {2 * anchors} dim: {hw[0]} dim: {hw[1]} }}
                shape {{ dim: 1 dim: {4 * anchors} dim: {hw[0]} dim: {hw[1]} }} }}
}}
layer {{
  name: "silence_data"
  type: "Silence"
  bottom: "data"
}}
{layer}"""


def rpn_feeds(seed: int, anchors: int, hw: tuple[int, int], image: tuple[float, float, float],
              spread: float = 0.2) -> dict[str, np.ndarray]:
    """Softmax-normalised bg/fg scores (as rpn_cls_prob_reshape holds them), small deltas, im_info."""
    g = rng(seed)
    logits = g.normal(size=(1, 2, anchors, *hw))
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return {"rpn_cls_prob_reshape": prob.reshape(1, 2 * anchors, *hw).astype(np.float32),
            "rpn_bbox_pred": (g.normal(size=(1, 4 * anchors, *hw)) * spread).astype(np.float32),
            "im_info": np.array([image], dtype=np.float32),
            "data": np.zeros((1, 3, hw[0] * 16, hw[1] * 16), dtype=np.float32)}


def check(out: dict[str, np.ndarray], want_rois: np.ndarray, want_scores: np.ndarray | None, margin: float,
          case: str) -> None:
    assert margin > 1e-5, f"{case}: the data puts a decision within {margin:.2g} of its threshold; reseed"
    assert out["rois"].shape == want_rois.shape, f"{case}: {out['rois'].shape[0]} rois, expected {len(want_rois)}"
    if want_scores is not None:
        np.testing.assert_array_equal(out["scores"], want_scores, err_msg=f"{case}: other boxes or order")
    assert_close(out["rois"], want_rois, f"{case} rois", atol=1e-4, rtol=1e-6)


# case, anchors (base_size, ratios, scales), feat_stride, map (H, W), im_info, layer text, settings for the
# reference, seed (one whose data has no decision within 1e-5 of its threshold)
CASES = [
    ("end2end_test", (16, (0.5, 1, 2), (8, 16, 32)), 16, (14, 19), (224, 304, 1.6),
     PYTHON_LAYER.format(scores_top="\n  top: 'scores'", param_str="'feat_stride': 16"), {}, 41),
    ("scales_in_param_str", (16, (0.5, 1, 2), (4, 8, 16, 32)), 16, (9, 12), (144, 192, 0.5),
     PYTHON_LAYER.format(scores_top="", param_str="{'feat_stride': 16, 'scales': [4, 8, 16, 32]}"), {}, 40),
    ("opencv_proposal_param", (16, (0.5, 1, 2), (8, 16, 32)), 16, (11, 15), (176, 240, 1.0),
     CPP_LAYER.format(scores_top="\n  top: \"scores\"", param="ratio: 0.5 ratio: 1.0 ratio: 2.0\n    "
                      "scale: 8 scale: 16 scale: 32"), {}, 40),
    ("small_anchors_tight_topn", (8, (0.5, 1, 2.5), (2, 4)), 8, (16, 13), (128, 104, 0.9),
     CPP_LAYER.format(scores_top="\n  top: \"scores\"", param="feat_stride: 8 base_size: 8 min_size: 6 "
                      "ratio: 0.5 ratio: 1 ratio: 2.5 scale: 2 scale: 4\n    pre_nms_topn: 150 post_nms_topn: 25 "
                      "nms_thresh: 0.6"),
     {"pre_nms_topn": 150, "post_nms_topn": 25, "nms_thresh": 0.6, "min_size": 6}, 40),
    ("keep_all", (16, (1,), (4, 8)), 16, (7, 9), (112, 144, 2.0),
     CPP_LAYER.format(scores_top="\n  top: \"scores\"", param="ratio: 1 scale: 4 scale: 8 pre_nms_topn: 0 "
                      "post_nms_topn: 0 nms_thresh: 0.5"),
     {"pre_nms_topn": 0, "post_nms_topn": 0, "nms_thresh": 0.5}, 40),
]


@pytest.mark.parametrize(("case", "anchor_spec", "stride", "hw", "image", "layer", "settings", "seed"), CASES,
                         ids=[c[0] for c in CASES])
def test_proposal_matches_py_faster_rcnn(case: str, anchor_spec: tuple, stride: int, hw: tuple[int, int],
                                         image: tuple[float, float, float], layer: str, settings: dict,
                                         seed: int) -> None:
    anchors = ref.generate_anchors(*anchor_spec)
    converted = convert_text(rpn_net(len(anchors), hw, layer))
    feeds = rpn_feeds(seed, len(anchors), hw, image)
    want_rois, want_scores, margin = ref.proposal(feeds["rpn_cls_prob_reshape"], feeds["rpn_bbox_pred"],
                                                  feeds["im_info"], feat_stride=stride, anchors=anchors, **settings)
    out = run(converted, {k: v for k, v in feeds.items()})
    check(out, want_rois, want_scores if "scores" in out else None, margin, case)
    assert len(want_rois) > 3  # the cases keep boxes (the filter and NMS also drop some)
    assert converted.shapes["rois"][1] == 5


def test_the_trainer_runs_it_forward() -> None:
    """The trainer's kernels (NonMaxSuppression, TopK, Compress...) give the same proposals as onnxruntime."""
    case, anchor_spec, stride, hw, image, layer, settings, seed = CASES[3]
    anchors = ref.generate_anchors(*anchor_spec)
    converted = convert_text(rpn_net(len(anchors), hw, layer))
    feeds = rpn_feeds(seed, len(anchors), hw, image)
    want_rois, want_scores, margin = ref.proposal(feeds["rpn_cls_prob_reshape"], feeds["rpn_bbox_pred"],
                                                  feeds["im_info"], feat_stride=stride, anchors=anchors, **settings)
    module = GraphModule(converted.model, converted.weights).eval()
    with torch.no_grad():
        got = module({k: torch.from_numpy(v) for k, v in feeds.items()}, ["rois", "scores"])
    check({k: v.numpy() for k, v in got.items()}, want_rois, want_scores, margin, f"{case} (trainer)")


def test_train_phase_uses_the_train_settings() -> None:
    """py-faster-rcnn's cfg.TRAIN: pre_nms_topN 12000, post_nms_topN 2000 (TEST: 6000, 300)."""
    layer = PYTHON_LAYER.format(scores_top="\n  top: 'scores'", param_str="'feat_stride': 16")
    hw = (28, 25)  # 6300 anchors: TEST cuts them at 6000 before NMS and 300 after
    feeds = rpn_feeds(41, 9, hw, (448, 400, 0.2), spread=0.05)  # no decision within 1e-5 of flipping
    counts = {}
    for phase, (pre, post) in ((caffe_pb2.TEST, (6000, 300)), (caffe_pb2.TRAIN, (12000, 2000))):
        out = run(convert_text(rpn_net(9, hw, layer), phase=phase), feeds)
        want_rois, want_scores, margin = ref.proposal(feeds["rpn_cls_prob_reshape"], feeds["rpn_bbox_pred"],
                                                      feeds["im_info"], pre_nms_topn=pre, post_nms_topn=post)
        check(out, want_rois, want_scores, margin, caffe_pb2.Phase.Name(phase))
        counts[phase] = len(want_rois)
    assert counts[caffe_pb2.TEST] == 300 < counts[caffe_pb2.TRAIN]


def test_no_box_survives_the_size_filter() -> None:
    """An im_info scale that makes min_size larger than the image leaves no proposal: rois is 0 x 5."""
    layer = PYTHON_LAYER.format(scores_top="\n  top: 'scores'", param_str="'feat_stride': 16")
    out = run(convert_text(rpn_net(9, (5, 6), layer)), rpn_feeds(42, 9, (5, 6), (80, 96, 10.0)))
    assert out["rois"].shape == (0, 5) and out["scores"].shape == (0, 1)


def test_anchors_are_py_faster_rcnns() -> None:
    """generate_anchors() for the defaults, as py-faster-rcnn's generate_anchors.py documents them, and
    numpy's half-to-even rounding: base 8, ratio 2.5 gives width round(√25.6) = 5, height round(12.5) = 12."""
    np.testing.assert_array_equal(generate_anchors(16, (0.5, 1, 2), (8, 16, 32)), np.array([
        [-84, -40, 99, 55], [-176, -88, 191, 103], [-360, -184, 375, 199],
        [-56, -56, 71, 71], [-120, -120, 135, 135], [-248, -248, 263, 263],
        [-36, -80, 51, 95], [-80, -168, 95, 183], [-168, -344, 183, 359]], dtype=np.float64))
    box = generate_anchors(8, (2.5,), (1,))[0]
    assert (box[2] - box[0] + 1, box[3] - box[1] + 1) == (5, 12)
    for spec in [(16, (0.5, 1, 2), (4, 8, 16, 32)), (8, (0.5, 1, 2.5), (2, 4)), (10, (0.25, 0.7, 3), (1.5, 3))]:
        np.testing.assert_array_equal(generate_anchors(*spec), ref.generate_anchors(*spec))


def test_proposal_matches_opencv(tmp_path: Path) -> None:
    """OpenCV's DNN, on data whose min_size filter removes nothing (OpenCV has none)."""
    text = rpn_net(9, (12, 16), CPP_LAYER.format(
        scores_top="", param="ratio: 0.5 ratio: 1.0 ratio: 2.0\n    scale: 8 scale: 16 scale: 32\n    "
                              "pre_nms_topn: 400 post_nms_topn: 60"))
    feeds = rpn_feeds(43, 9, (12, 16), (192, 256, 0.01))
    proto = tmp_path / "test.prototxt"
    proto.write_text(text)
    net = cv2.dnn.readNetFromCaffe(str(proto))
    for name, value in feeds.items():
        net.setInput(value, name)
    want = net.forward("proposal")
    got = run(convert_text(text), feeds)["rois"]
    assert got.shape == want.shape == (60, 5)
    assert_close(got, want, "rois vs OpenCV", atol=1e-3, rtol=1e-6)


@pytest.mark.parametrize(("layer", "error", "message"), [
    (PYTHON_LAYER.format(scores_top="", param_str="'feat_stride': 16").replace("rpn.proposal_layer",
                                                                               "roi_data_layer.layer"),
     UnsupportedError, (r"layer 'proposal' \(Python\) runs Python code \(module 'roi_data_layer.layer', layer "
                        r"'ProposalLayer'\) that caffeonnx cannot convert; of Python layers only py-faster-rcnn's "
                        r"rpn.proposal_layer.ProposalLayer is converted")),
    (PYTHON_LAYER.format(scores_top="", param_str="'num_classes': 21"), LayerError,
     r"param_str \"'num_classes': 21\" sets \['num_classes'\], which caffeonnx does not know"),
    (PYTHON_LAYER.format(scores_top="", param_str="'scales': [8]"), LayerError, r"has no 'feat_stride'"),
    (CPP_LAYER.format(scores_top="", param="ratio: 1 scale: 8 scale: 16"), LayerError,
     r"bottom 0 'rpn_cls_prob_reshape' \(rpn_cls_prob_reshape\) has shape \[1, 18, 4, 5\]; with 2 anchors"),
])
def test_refusals(layer: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        convert_text(rpn_net(9, (4, 5), layer))


def test_other_python_layers_still_name_their_module() -> None:
    text = """layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "loss_layer" type: "Python" bottom: "data" top: "out"
  python_param { module: "pyloss" layer: "EuclideanLossLayer" } }
"""
    with pytest.raises(UnsupportedError, match=r"module 'pyloss', layer 'EuclideanLossLayer'"):
        convert_text(text)


@pytest.mark.parametrize("layer", [CASES[0][5], CASES[3][5]], ids=["python", "proposal"])
def test_round_trip_through_to_caffe(layer: str, tmp_path: Path) -> None:
    """Caffe -> ONNX -> Caffe restores the layer (proposal_param at OpenCV's field 201 in the caffemodel)."""
    proto = tmp_path / "test.prototxt"
    proto.write_text(rpn_net(9 if "Python" in layer else 6, (6, 7), layer))
    first = convert_files(proto)
    first.save(tmp_path / "m.onnx")
    convert_to_caffe_files(tmp_path / "m.onnx", tmp_path / "back.prototxt", tmp_path / "back.caffemodel")
    assert net_without_blobs(load_net(tmp_path / "back.prototxt")) == net_without_blobs(load_net(proto))
    assert convert_files(tmp_path / "back.prototxt", tmp_path / "back.caffemodel").model.graph == first.model.graph
