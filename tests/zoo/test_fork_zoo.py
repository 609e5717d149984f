"""Public architectures, BVLC's and in their forks' own form, every blob against OpenCV DNN's Caffe importer.

Every prototxt in models/opencv/ is a scaled-down copy of a public deploy file (same layer
types, parameters and file style: e.g. MobileNet-SSD by chuanqi305, OpenCV's res10_300x300
face detector, DenseNet-121 by shicai with ceil_mode pooling, ShuffleNet by farmingyard with
ShuffleChannel and ConvolutionDepthwise), with fewer channels and small inputs so the suite
stays fast; each file's header comment names its source.  Weights are seeded random values written to a caffemodel;
caffeonnx converts prototxt + caffemodel, onnxruntime runs every blob, and OpenCV (an
independent implementation of each fork layer) runs the same files with fusion off.
Tolerance: atol 1e-4 + rtol 1e-3 on every blob (float32 through ~20 layers); detections are
compared as sets of rows (label and image id exactly, score and box within 1e-4); their
order is Caffe's, checked against the numpy transcription of the SSD fork.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.zoo.harness import caffeonnx_blobs, input_feeds, seeded_weights

cv2 = pytest.importorskip("cv2")

MODELS = Path(__file__).parent / "models" / "opencv"


def opencv_blobs(prototxt: Path, weights: Path, feeds: dict[str, np.ndarray], names: list[str]
                 ) -> dict[str, np.ndarray]:
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(weights))
    net.enableFusion(False)
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    for name, value in feeds.items():
        net.setInput(value, name)
    return dict(zip(names, net.forward(names)))


def compare_detections(got: np.ndarray, want: np.ndarray) -> None:
    """As sets of rows: OpenCV orders an image's rows by score, Caffe by label then score."""
    def rows(a: np.ndarray) -> np.ndarray:
        a = a.reshape(-1, 7)
        a = a[np.any(a != 0, axis=1)]  # OpenCV pads with zero rows
        return a[np.lexsort((a[:, 3], -a[:, 2], a[:, 1], a[:, 0]))]

    got, want = rows(got), rows(want)
    assert got.shape == want.shape, f"detection_out: {got.shape[0]} rows vs OpenCV's {want.shape[0]}"
    np.testing.assert_array_equal(got[:, :2], want[:, :2], err_msg="detection_out image ids / labels")
    np.testing.assert_allclose(got[:, 2:], want[:, 2:], atol=1e-4, rtol=0, err_msg="detection_out scores / boxes")


def in_order(prototxt: Path, ours: dict[str, np.ndarray], tops: dict[str, str], got: np.ndarray) -> None:
    """The rows in Caffe's order: the SSD fork's DetectionOutput transcribed in numpy, on our own bottoms."""
    from caffeonnx.converter.caffe_io import read_prototxt
    from tests.ssd_detection_reference import detection_output

    layer = next(x for x in read_prototxt(prototxt).layer if x.type == "DetectionOutput")
    p = layer.detection_output_param
    loc, conf, prior = (ours[tops[b]] for b in layer.bottom)
    want = detection_output(loc, conf, prior, num_classes=p.num_classes, share_location=p.share_location,
                            background_label_id=p.background_label_id, code_type=p.code_type,
                            keep_top_k=p.keep_top_k, confidence_threshold=p.confidence_threshold,
                            nms_threshold=p.nms_param.nms_threshold, top_k=p.nms_param.top_k)
    np.testing.assert_array_equal(got[..., :3], want[..., :3], err_msg="detection_out ids/labels/scores in order")
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0, err_msg="detection_out boxes")


@pytest.mark.parametrize("model", sorted(p.stem for p in MODELS.glob("*.prototxt")))
def test_every_blob_matches_opencv(tmp_path: Path, model: str) -> None:
    prototxt, weights = seeded_weights(MODELS / f"{model}.prototxt", tmp_path, seed=11)
    feeds = input_feeds(prototxt, seed=12)
    ours, tops = caffeonnx_blobs(prototxt, weights, feeds)
    theirs = opencv_blobs(prototxt, weights, feeds, list(tops))
    for name, value in tops.items():
        got, want = ours[value], theirs[name]
        if name == "detection_out":
            compare_detections(got, want)
            assert got.reshape(-1, 7).shape[0] >= 4, "the seeded input should give several detections"
            in_order(prototxt, ours, tops, got)
            continue
        assert got.size == want.size, f"{model} layer {name!r}: shape {got.shape} vs OpenCV {want.shape}"
        np.testing.assert_allclose(got.reshape(want.shape), want, atol=1e-4, rtol=1e-3,
                                   err_msg=f"{model} layer {name!r} (value {value!r}, shape {got.shape})")
