"""DetectionOutput (SSD Caffe fork) against tests/ssd_detection_reference.py, a numpy transcription of
DetectionOutputLayer::Forward_cpu, and against OpenCV DNN's DetectionOutput.

Tolerances, measured: image ids, labels, scores and the row order are exact (atol 0) in every case;
boxes are bit-exact for CORNER and CORNER_SIZE and within 1 ulp (atol 1e-6) for CENTER_SIZE, whose
exp is onnxruntime's float exp where Caffe calls the double ::exp.  Against OpenCV (which orders an
image's rows by score, pads to keep_top_k x N rows with zeros and computes the prior centre as
xmin + width * .5) the rows are compared as sets sorted by (image, label, score), boxes atol 1e-5.

Where exactness cannot hold, and the data here keeps clear of it: a pair of decoded boxes whose
overlap is within float rounding (~1e-6) of nms_threshold (each seeded case asserts every overlap is
at least 2e-6 away, and that some lie within 0.05 of it); and, with keep_top_k cutting, exactly
equal scores at the cut or within a label, which Caffe orders with the unstable std::sort.  Exactly
equal scores within a class without a keep_top_k cut are exact (Caffe's stable_sort): tested below.
"""
from __future__ import annotations

import textwrap

import cv2
import numpy as np
import onnx
import pytest

from caffeonnx.converter.caffe_to_onnx import convert_files, load_net
from caffeonnx.converter.metadata import net_without_blobs
from caffeonnx.converter.onnx_to_caffe import convert_to_caffe_files
from caffeonnx.converter.registry import get_handler
from caffeonnx.errors import LayerError
from caffeonnx.proto import caffe_pb2
from tests.helpers import assert_close, convert_text, rng, run
from tests.ssd_detection_reference import CENTER_SIZE, CORNER, CORNER_SIZE, detection_output, pairwise_overlaps

CODES = {"CORNER": CORNER, "CENTER_SIZE": CENTER_SIZE, "CORNER_SIZE": CORNER_SIZE}


def deploy(batch: int, priors: int, classes: int, param: str, *, share: bool = True, prior_channels: int = 2,
           extra: str = "") -> str:
    """A DetectionOutput head in the style of MobileNet-SSD's deploy.prototxt, bottoms given by `input:` fields."""
    loc_classes = 1 if share else classes
    body = "\n".join("    " + line for line in textwrap.dedent(param).strip().splitlines())
    return f"""name: "MobileNet-SSD"
input: "mbox_loc"
input_shape {{
  dim: {batch}
  dim: {priors * loc_classes * 4}
}}
input: "mbox_conf_flatten"
input_shape {{
  dim: {batch}
  dim: {priors * classes}
}}
input: "mbox_priorbox"
input_shape {{
  dim: 1
  dim: {prior_channels}
  dim: {priors * 4}
}}
{extra}layer {{
  name: "detection_out"
  type: "DetectionOutput"
  bottom: "mbox_loc"
  bottom: "mbox_conf_flatten"
  bottom: "mbox_priorbox"
  top: "detection_out"
  include {{
    phase: TEST
  }}
  detection_output_param {{
    num_classes: {classes}
    share_location: {"true" if share else "false"}
{body}
  }}
}}
"""


def make_inputs(seed: int, batch: int, priors: int, classes: int, *, share: bool, encoded: bool,
                clusters: int = 6, prior_channels: int = 2) -> dict[str, np.ndarray]:
    """Priors in clusters (several per object, overlapping around usual NMS thresholds), random variances
    (nonsense ones when variance_encoded_in_target, which Caffe must ignore), small offsets, softmax scores."""
    r = rng(seed)
    centre = r.uniform(0.25, 0.75, (clusters, 2))[r.integers(0, clusters, priors)] + r.normal(0, 0.04, (priors, 2))
    size = r.uniform(0.15, 0.35, (priors, 2))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    variance = np.full((priors, 4), 7.5) if encoded else r.uniform(0.1, 0.3, (priors, 4))
    prior = np.stack([boxes.reshape(-1), variance.reshape(-1)])[:prior_channels][None].astype(np.float32)
    loc_classes = 1 if share else classes
    loc = r.normal(0, 0.06 if encoded else 0.3, (batch, priors * loc_classes * 4)).astype(np.float32)
    logits = r.normal(0, 1.5, (batch, priors, classes))
    conf = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return {"mbox_loc": loc, "mbox_conf_flatten": conf.reshape(batch, -1).astype(np.float32), "mbox_priorbox": prior}


def check_margin(feeds: dict[str, np.ndarray], classes: int, share: bool, code: int, encoded: bool,
                 threshold: float) -> None:
    """The seeded data has overlaps near the NMS threshold, none within float rounding of it."""
    overlaps = pairwise_overlaps(feeds["mbox_loc"], feeds["mbox_priorbox"], num_classes=classes, share_location=share,
                                 code_type=code, variance_encoded_in_target=encoded)
    gap = np.abs(overlaps.astype(np.float64) - threshold)
    assert gap.min() > 2e-6, f"an overlap is {gap.min():.2g} from nms_threshold: pick another seed"
    assert (gap < 0.05).sum() >= 3, "no overlaps near the threshold: the case would not test NMS's boundary"


def assert_rows(got: np.ndarray, want: np.ndarray, name: str, box_atol: float = 1e-6) -> None:
    """Ids, labels, scores and order exact; boxes to `box_atol`."""
    assert got.shape == want.shape, f"{name}: {got.shape[2]} rows, Caffe has {want.shape[2]}\n{got}\n{want}"
    assert_close(got[..., :3], want[..., :3], f"{name} image/label/score", atol=0, rtol=0)
    assert_close(got[..., 3:], want[..., 3:], f"{name} boxes", atol=box_atol, rtol=0)


def reference(feeds: dict[str, np.ndarray], **kw: object) -> np.ndarray:
    return detection_output(feeds["mbox_loc"], feeds["mbox_conf_flatten"], feeds["mbox_priorbox"], **kw)  # type: ignore[arg-type]


# code type, variance_encoded_in_target, share_location (the seed derives from them)
DECODE_CASES = [(code, encoded, share) for code in CODES for encoded in (False, True) for share in (True, False)]


@pytest.mark.parametrize(("code", "encoded", "share"), DECODE_CASES)
def test_matches_caffe_for_each_code_type(code: str, encoded: bool, share: bool) -> None:
    """Batch 2, 5 classes, 40 priors: top_k 12 of them per class, NMS 0.45, keep_top_k 20 < what NMS keeps."""
    batch, priors, classes, nms = 2, 40, 5, 0.45
    feeds = make_inputs(11 + len(code) + 2 * encoded + share, batch, priors, classes, share=share, encoded=encoded)
    check_margin(feeds, classes, share, CODES[code], encoded, nms)
    param = f"""
        background_label_id: 0
        nms_param {{
          nms_threshold: {nms}
          top_k: 12
        }}
        code_type: {code}
        variance_encoded_in_target: {"true" if encoded else "false"}
        keep_top_k: 20
        confidence_threshold: 0.05
    """
    kw = {"num_classes": classes, "share_location": share, "code_type": CODES[code],
          "variance_encoded_in_target": encoded, "nms_threshold": nms, "top_k": 12, "confidence_threshold": 0.05}
    want = reference(feeds, keep_top_k=20, **kw)
    assert want.shape[2] == 2 * 20, "keep_top_k should cut both images"
    assert reference(feeds, keep_top_k=-1, **kw).shape[2] > want.shape[2]
    assert reference(feeds, keep_top_k=-1, **{**kw, "nms_threshold": 1.0}).shape[2] > \
        reference(feeds, keep_top_k=-1, **kw).shape[2], "NMS should suppress boxes"
    converted = convert_text(deploy(batch, priors, classes, param, share=share))
    assert converted.shapes["detection_out"] == (1, 1, 1, 7)  # Caffe's Reshape; rows are known when it runs
    assert_rows(run(converted, feeds)["detection_out"], want, f"{code} encoded={encoded} share={share}",
                box_atol=1e-6 if code == "CENTER_SIZE" else 0)


# (detection_output_param body, reference keywords): defaults and the knobs one at a time
OPTION_CASES = [
    ("", {}),  # Caffe's defaults: CORNER, nms 0.3, no top_k, keep all, threshold -FLT_MAX
    ("nms_param { nms_threshold: 0.45 }\ncode_type: CENTER_SIZE", {"nms_threshold": 0.45, "code_type": CENTER_SIZE}),
    ("nms_param { nms_threshold: 0.45 top_k: 400 }\ncode_type: CENTER_SIZE\nkeep_top_k: 200\nconfidence_threshold: 0.01",
     {"nms_threshold": 0.45, "top_k": 400, "code_type": CENTER_SIZE, "keep_top_k": 200, "confidence_threshold": 0.01}),
    ("background_label_id: 2\nnms_param { nms_threshold: 0.45 top_k: 5 }\nconfidence_threshold: 0.2",
     {"background_label_id": 2, "nms_threshold": 0.45, "top_k": 5, "confidence_threshold": 0.2}),
    ("background_label_id: -1\nnms_param { nms_threshold: 0.45 }\nkeep_top_k: 7",
     {"background_label_id": -1, "nms_threshold": 0.45, "keep_top_k": 7}),
    ("nms_param { nms_threshold: 0.45 top_k: 3 }\nkeep_top_k: 1000", {"nms_threshold": 0.45, "top_k": 3,
                                                                       "keep_top_k": 1000}),
    ("nms_param { nms_threshold: 0.45 }\nconfidence_threshold: 0.3", {"nms_threshold": 0.45,
                                                                       "confidence_threshold": 0.3}),
]


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize(("param", "kw"), OPTION_CASES)
def test_matches_caffe_for_each_option(param: str, kw: dict[str, object], share: bool) -> None:
    batch, priors, classes = 2, 30, 4
    feeds = make_inputs(5 + len(param), batch, priors, classes, share=share, encoded=False)
    check_margin(feeds, classes, share, int(kw.get("code_type", CORNER)), False,  # type: ignore[call-overload]
                 float(kw.get("nms_threshold", 0.3)))  # type: ignore[arg-type]
    want = reference(feeds, num_classes=classes, share_location=share, **kw)
    assert want[0, 0, 0, 1] != -1, "the case should detect something"
    got = run(convert_text(deploy(batch, priors, classes, param, share=share)), feeds)["detection_out"]
    assert_rows(got, want, param or "defaults", box_atol=1e-6)


def test_batch_stays_dynamic() -> None:
    """Converted for one image, run on three: rows of all three, image_id 0..2."""
    param = "nms_param { nms_threshold: 0.45 top_k: 10 }\ncode_type: CENTER_SIZE\nkeep_top_k: 8"
    feeds = make_inputs(3, 3, 24, 3, share=True, encoded=False)
    converted = convert_text(deploy(1, 24, 3, param))
    want = reference(feeds, num_classes=3, nms_threshold=0.45, top_k=10, code_type=CENTER_SIZE, keep_top_k=8)
    got = run(converted, feeds)["detection_out"]
    assert_rows(got, want, "batch 3", box_atol=1e-6)
    assert set(got[0, 0, :, 0]) == {0, 1, 2}


def test_no_detections_gives_one_fake_row_per_image() -> None:
    """Caffe: num_kept 0 -> top [1, 1, num, 7], all -1 but column 0, the image index."""
    feeds = make_inputs(4, 2, 20, 3, share=True, encoded=False)
    param = "nms_param { nms_threshold: 0.45 }\nkeep_top_k: 10\nconfidence_threshold: 0.999"
    got = run(convert_text(deploy(2, 20, 3, param)), feeds)["detection_out"]
    want = np.array([[[[0, -1, -1, -1, -1, -1, -1], [1, -1, -1, -1, -1, -1, -1]]]], dtype=np.float32)
    assert_close(got, want, "no detections", atol=0, rtol=0)
    assert_close(reference(feeds, num_classes=3, nms_threshold=0.45, keep_top_k=10, confidence_threshold=0.999),
                 want, "reference", atol=0, rtol=0)


@pytest.mark.parametrize("param", ["num_classes_only", "nms_param { top_k: 0 }", "keep_top_k: 0"])
def test_layers_that_cannot_detect_give_the_fake_rows(param: str) -> None:
    """num_classes 1 with background 0 (no class to detect), top_k 0, keep_top_k 0: Caffe keeps nothing."""
    classes = 1 if param == "num_classes_only" else 3
    feeds = make_inputs(6, 2, 10, classes, share=True, encoded=False)
    text = deploy(2, 10, classes, "" if param == "num_classes_only" else param)
    got = run(convert_text(text), feeds)["detection_out"]
    assert_close(got, np.array([[[[0] + [-1] * 6, [1] + [-1] * 6]]], dtype=np.float32), param, atol=0, rtol=0)


def test_an_image_without_detections_gets_no_rows_when_another_has_some() -> None:
    """The fake rows are only for an empty top: image 1 (every score below threshold) simply has no rows."""
    feeds = make_inputs(7, 2, 20, 3, share=True, encoded=False)
    conf = feeds["mbox_conf_flatten"].reshape(2, 20, 3)
    conf[1] = np.array([0.9, 0.05, 0.05], dtype=np.float32)
    feeds["mbox_conf_flatten"] = conf.reshape(2, -1)
    param = "nms_param { nms_threshold: 0.45 }\nconfidence_threshold: 0.1"
    got = run(convert_text(deploy(2, 20, 3, param)), feeds)["detection_out"]
    want = reference(feeds, num_classes=3, nms_threshold=0.45, confidence_threshold=0.1)
    assert_rows(got, want, "one empty image", box_atol=0)
    assert set(got[0, 0, :, 0]) == {0}


def _corner_feeds(boxes: list[list[float]], scores: list[list[float]], loc: list[list[float]] | None = None
                  ) -> dict[str, np.ndarray]:
    """One image, CORNER with variance_encoded_in_target: decoded box = prior + loc (loc zero: the prior)."""
    prior = np.array(boxes, dtype=np.float32)
    offsets = np.zeros_like(prior) if loc is None else np.array(loc, dtype=np.float32)
    variance = np.ones_like(prior)
    return {"mbox_loc": offsets.reshape(1, -1), "mbox_conf_flatten": np.array(scores, dtype=np.float32).reshape(1, -1),
            "mbox_priorbox": np.stack([prior.reshape(-1), variance.reshape(-1)])[None]}


def test_overlap_equal_to_the_threshold_is_kept() -> None:
    """JaccardOverlap exactly 0.5 at nms_threshold 0.5 keeps the box (Caffe: overlap <= threshold keeps);
    one ulp above 0.5 suppresses it."""
    above = float(np.nextafter(np.float32(0.5), np.float32(1)))
    feeds = _corner_feeds([[0, 0, 1, 1], [0, 0, 1, 0.5], [0, 0, 1, above]],
                          [[0.1, 0.9, 0.9], [0.1, 0.8, 0.001], [0.1, 0.001, 0.8]])
    param = "nms_param { nms_threshold: 0.5 }\nvariance_encoded_in_target: true\nconfidence_threshold: 0.01"
    got = run(convert_text(deploy(1, 3, 3, param)), feeds)["detection_out"]
    want = reference(feeds, num_classes=3, nms_threshold=0.5, variance_encoded_in_target=True,
                     confidence_threshold=0.01)
    assert_rows(got, want, "threshold boundary", box_atol=0)
    assert [(int(r[1]), float(r[2])) for r in got[0, 0]] == [(1, np.float32(0.9)), (1, np.float32(0.8)),
                                                             (2, np.float32(0.9))]


def test_equal_scores_are_visited_in_prior_order() -> None:
    """Six boxes in a chain (each overlaps the next 0.67, the one after 0.43), all scored 0.7: Caffe's
    stable sort visits them 0..5, keeping 0, 2, 4; visiting them another way keeps other boxes."""
    boxes = [[0.2 * i, 0, 0.2 * i + 1, 1] for i in range(6)]
    feeds = _corner_feeds(boxes, [[0.3, 0.7]] * 6)
    param = "nms_param { nms_threshold: 0.5 }\nvariance_encoded_in_target: true"
    got = run(convert_text(deploy(1, 6, 2, param)), feeds)["detection_out"]
    want = reference(feeds, num_classes=2, nms_threshold=0.5, variance_encoded_in_target=True)
    assert_rows(got, want, "ties", box_atol=0)
    assert got[0, 0, :, 3].tolist() == [0, np.float32(0.4), np.float32(0.8)]


def test_top_k_cut_through_equal_scores_keeps_the_first_priors() -> None:
    """top_k 3 over scores 0.9, then four 0.7: stable_sort keeps the 0.9 and the first two 0.7 (priors 1, 2)."""
    boxes = [[0.2 * i, 0, 0.2 * i + 0.1, 0.1] for i in range(6)]  # apart: NMS keeps everything
    feeds = _corner_feeds(boxes, [[0.5, 0.5], [0.3, 0.7], [0.3, 0.7], [0.3, 0.7], [0.3, 0.7], [0.1, 0.9]])
    param = "nms_param { nms_threshold: 0.5 top_k: 3 }\nvariance_encoded_in_target: true"
    got = run(convert_text(deploy(1, 6, 2, param)), feeds)["detection_out"]
    assert_rows(got, reference(feeds, num_classes=2, nms_threshold=0.5, top_k=3, variance_encoded_in_target=True),
                "top_k ties", box_atol=0)
    assert got[0, 0, :, 3].tolist() == [np.float32(1.0), np.float32(0.2), np.float32(0.4)]


def test_inverted_boxes_overlap_nothing() -> None:
    """Decoded boxes with xmax < xmin have size 0 and overlap 0 in Caffe, so they are never suppressed and
    suppress nothing (ONNX NMS alone would swap their corners: box 1 would then equal box 0)."""
    boxes = [[0.1, 0.1, 0.5, 0.5]] * 3
    loc = [[0, 0, 0, 0], [0.4, 0.4, -0.4, -0.4], [0.4, 0, -0.4, 0]]  # box 1 inverted both ways, box 2 in x
    feeds = _corner_feeds(boxes, [[0.1, 0.9, 0.5], [0.1, 0.8, 0.9], [0.1, 0.7, 0.6]], loc)
    param = "nms_param { nms_threshold: 0.3 }\nvariance_encoded_in_target: true"
    got = run(convert_text(deploy(1, 3, 3, param)), feeds)["detection_out"]
    want = reference(feeds, num_classes=3, nms_threshold=0.3, variance_encoded_in_target=True)
    assert want.shape[2] == 6  # every box kept in both classes (swapped corners would make box 1 suppress box 0)
    assert_rows(got, want, "inverted boxes", box_atol=0)


# OpenCV's DetectionOutput: CORNER and CENTER_SIZE (it decodes CORNER_SIZE as CORNER), priors of one channel
# when variance_encoded_in_target, background_label_id and keep_top_k required.
CV_CASES = [(code, encoded, share) for code in ("CORNER", "CENTER_SIZE") for encoded in (False, True)
            for share in (True, False)]


@pytest.mark.parametrize(("code", "encoded", "share"), CV_CASES)
def test_matches_opencv(code: str, encoded: bool, share: bool, tmp_path) -> None:
    batch, priors, classes, nms = 2, 36, 4, 0.45
    channels = 1 if encoded else 2
    feeds = make_inputs(31 + len(code) + 2 * encoded + share, batch, priors, classes, share=share, encoded=encoded,
                        prior_channels=channels)
    param = f"""
        background_label_id: 0
        nms_param {{
          nms_threshold: {nms}
          top_k: 15
        }}
        code_type: {code}
        variance_encoded_in_target: {"true" if encoded else "false"}
        keep_top_k: 18
        confidence_threshold: 0.05
    """
    text = deploy(batch, priors, classes, param, share=share, prior_channels=channels)
    (tmp_path / "deploy.prototxt").write_text(text)
    net = cv2.dnn.readNetFromCaffe(str(tmp_path / "deploy.prototxt"))
    for name, value in feeds.items():
        net.setInput(value, name)
    cv_rows = net.forward("detection_out").reshape(-1, 7)
    cv_rows = cv_rows[cv_rows[:, 2] > 0]  # OpenCV pads to keep_top_k x N rows with zeros
    got = run(convert_text(text), feeds)["detection_out"].reshape(-1, 7)

    def by_image_label_score(rows: np.ndarray) -> np.ndarray:
        return rows[np.lexsort((-rows[:, 2], rows[:, 1], rows[:, 0]))]

    assert got.shape == cv_rows.shape, f"{got.shape[0]} rows, OpenCV has {cv_rows.shape[0]}"
    got_sorted, cv_sorted = by_image_label_score(got), by_image_label_score(cv_rows)
    assert_close(got_sorted[:, :3], cv_sorted[:, :3], "image/label/score vs OpenCV", atol=0, rtol=0)
    assert_close(got_sorted[:, 3:], cv_sorted[:, 3:], "boxes vs OpenCV", atol=1e-5, rtol=0)
    assert_close(got_sorted, by_image_label_score(got), "Caffe's order is image, label, score", atol=0, rtol=0)


def test_fourth_bottom_image_is_ignored() -> None:
    """The SSD fork's optional 4th bottom is the image visualize draws on; the top does not depend on it."""
    extra = 'input: "data"\ninput_shape {\n  dim: 2\n  dim: 3\n  dim: 8\n  dim: 8\n}\n'
    text = deploy(2, 20, 3, "nms_param { nms_threshold: 0.45 }\nkeep_top_k: 10", extra=extra)
    text = text.replace('  bottom: "mbox_priorbox"\n', '  bottom: "mbox_priorbox"\n  bottom: "data"\n')
    feeds = make_inputs(9, 2, 20, 3, share=True, encoded=False)
    got = run(convert_text(text), {**feeds, "data": np.zeros((2, 3, 8, 8), np.float32)})["detection_out"]
    assert_rows(got, reference(feeds, num_classes=3, nms_threshold=0.45, keep_top_k=10), "4 bottoms", box_atol=0)


SSD_TRAIN_TEST = """name: "VGG_VOC0712_SSD_head"
layer {
  name: "data"
  type: "Input"
  top: "mbox_loc"
  top: "mbox_conf"
  top: "mbox_priorbox"
  input_param {
    shape { dim: 2 dim: 80 }
    shape { dim: 2 dim: 20 dim: 3 }
    shape { dim: 1 dim: 2 dim: 80 }
  }
}
layer {
  name: "mbox_conf_softmax"
  type: "Softmax"
  bottom: "mbox_conf"
  top: "mbox_conf_softmax"
  softmax_param {
    axis: 2
  }
}
layer {
  name: "mbox_conf_flatten"
  type: "Flatten"
  bottom: "mbox_conf_softmax"
  top: "mbox_conf_flatten"
  flatten_param {
    axis: 1
  }
}
layer {
  name: "detection_out"
  type: "DetectionOutput"
  bottom: "mbox_loc"
  bottom: "mbox_conf_flatten"
  bottom: "mbox_priorbox"
  top: "detection_out"
  include {
    phase: TEST
  }
  detection_output_param {
    num_classes: 3
    share_location: true
    background_label_id: 0
    nms_param {
      nms_threshold: 0.45
      top_k: 400
    }
    save_output_param {
      output_directory: "/home/user/data/VOCdevkit/results/VOC2007/SSD_300x300/Main"
      output_name_prefix: "comp4_det_test_"
      output_format: "VOC"
      label_map_file: "data/VOC0712/labelmap_voc.prototxt"
      name_size_file: "data/VOC0712/test_name_size.txt"
      num_test_image: 4952
    }
    code_type: CENTER_SIZE
    keep_top_k: 200
    confidence_threshold: 0.01
  }
}
"""


def test_train_phase_leaves_it_out_and_test_phase_runs_it() -> None:
    """DetectionOutput is TEST-only (include { phase: TEST }): a TRAIN conversion excludes it and works."""
    train = convert_text(SSD_TRAIN_TEST, phase=caffe_pb2.TRAIN)
    assert "DetectionOutput" not in {n.name for n in train.model.graph.node}
    assert "detection_out" not in {o.name for o in train.model.graph.output}
    test = convert_text(SSD_TRAIN_TEST)
    assert "detection_out" in {o.name for o in test.model.graph.output}
    onnx.checker.check_model(test.to_proto(), full_check=True)
    feeds = make_inputs(12, 2, 20, 3, share=True, encoded=False)
    logits = rng(13).normal(size=(2, 20, 3)).astype(np.float32)
    got = run(test, {"mbox_loc": feeds["mbox_loc"], "mbox_conf": logits,
                     "mbox_priorbox": feeds["mbox_priorbox"]})["detection_out"]
    e = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    conf = (e / e.sum(-1, keepdims=True)).astype(np.float32).reshape(2, -1)
    want = detection_output(feeds["mbox_loc"], conf, feeds["mbox_priorbox"], num_classes=3, nms_threshold=0.45,
                            top_k=400, code_type=CENTER_SIZE, keep_top_k=200, confidence_threshold=0.01)
    assert got.shape == want.shape
    assert_close(got, want, "SSD head", atol=1e-6, rtol=1e-6)  # the softmax is onnxruntime's here


def test_round_trips_through_to_caffe(tmp_path) -> None:
    src = tmp_path / "deploy.prototxt"
    src.write_text(SSD_TRAIN_TEST)
    first = convert_files(src)
    first.save(tmp_path / "m.onnx")
    convert_to_caffe_files(tmp_path / "m.onnx", tmp_path / "back.prototxt", tmp_path / "back.caffemodel")
    assert net_without_blobs(load_net(tmp_path / "back.prototxt")) == net_without_blobs(load_net(src))
    assert convert_files(tmp_path / "back.prototxt", tmp_path / "back.caffemodel").model.graph == first.model.graph
    handler = get_handler("DetectionOutput")
    assert handler is not None and handler.fork == "ssd"


@pytest.mark.parametrize(("param", "message"), [
    ("", "Must specify num_classes"),
    ("num_classes: 3 nms_param { eta: 0.9 }", "adaptive NMS"),
    ("num_classes: 3 nms_param { eta: 1.5 }", "0 < eta <= 1"),
    ("num_classes: 3 nms_param { nms_threshold: -0.1 }", "nms_threshold must be non negative"),
    ("num_classes: 3 normalized_bbox: false", "OpenCV's extension"),
    ("num_classes: 4", "Number of priors must match number of confidence predictions"),
    ("num_classes: 3 share_location: false", "Number of priors must match number of location predictions"),
])
def test_refuses_what_caffe_refuses_or_cannot_convert(param: str, message: str) -> None:
    text = (f'layer {{ name: "in" type: "Input" top: "loc" top: "conf" top: "prior" input_param {{ shape {{ dim: 1 '
            f'dim: 40 }} shape {{ dim: 1 dim: 30 }} shape {{ dim: 1 dim: 2 dim: 40 }} }} }}\n'
            f'layer {{ name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "prior" top: "out" '
            f'detection_output_param {{ {param} }} }}\n')
    with pytest.raises(LayerError, match=r"layer 'det' \(DetectionOutput\)") as err:
        convert_text(text)
    assert message in str(err.value)


def test_refuses_an_arm_bottom_and_old_opsets() -> None:
    text = deploy(1, 10, 3, "nms_param { nms_threshold: 0.45 }", extra='input: "arm_conf"\ninput_shape {\n  dim: 1\n'
                  '  dim: 20\n}\n').replace('  bottom: "mbox_priorbox"\n', '  bottom: "mbox_priorbox"\n  bottom: "arm_conf"\n')
    with pytest.raises(LayerError, match="not an image.*RefineDet"):
        convert_text(text)
    with pytest.raises(LayerError, match="needs ONNX opset 11"):
        convert_text(deploy(1, 10, 3, ""), opset=10)
