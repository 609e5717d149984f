"""A numpy transcription of the SSD fork's DetectionOutputLayer::Forward_cpu (weiliu89/caffe, ssd branch,
src/caffe/layers/detection_output_layer.cpp and src/caffe/util/bbox_util.cpp), for parity tests.

Written from the C++ semantics, loop for loop, with Caffe's float/double arithmetic:
GetLocPredictions, GetConfidenceScores, GetPriorBBoxes, DecodeBBoxesAll (clip_bbox false),
GetMaxScoreIndex (strict > threshold, std::stable_sort descending, top_k), ApplyNMSFast
(JaccardOverlap on normalised boxes with their decode-time size, keep when overlap <= the
adaptive threshold, eta), keep_top_k (std::sort by score: ties are unordered in C++, here they
stay in label, then kept order), and the output rows (or one [i, -1, ...] row per image when
nothing is kept).  Slow (pure Python loops), for small test inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

f32 = np.float32
FLT_MAX = float(np.finfo(np.float32).max)
CORNER, CENTER_SIZE, CORNER_SIZE = 1, 2, 3  # PriorBoxParameter.CodeType


@dataclass
class BBox:
    """NormalizedBBox: corners as float32 and the size set at decode time."""

    xmin: np.float32
    ymin: np.float32
    xmax: np.float32
    ymax: np.float32
    size: np.float32 | None = None


def bbox_size(b: BBox) -> np.float32:
    """BBoxSize(bbox, normalized=true): 0 for an inverted box, else the stored size or width * height."""
    if b.xmax < b.xmin or b.ymax < b.ymin:
        return f32(0)
    if b.size is not None:
        return b.size
    return f32((b.xmax - b.xmin) * (b.ymax - b.ymin))


def jaccard_overlap(b1: BBox, b2: BBox) -> np.float32:
    """JaccardOverlap(bbox1, bbox2, normalized=true): IntersectBBox, then I / (A1 + A2 - I) in float."""
    if b2.xmin > b1.xmax or b2.xmax < b1.xmin or b2.ymin > b1.ymax or b2.ymax < b1.ymin:
        return f32(0)
    iw = f32(min(b1.xmax, b2.xmax) - max(b1.xmin, b2.xmin))
    ih = f32(min(b1.ymax, b2.ymax) - max(b1.ymin, b2.ymin))
    if iw > 0 and ih > 0:
        inter = f32(iw * ih)
        return f32(inter / f32(f32(bbox_size(b1) + bbox_size(b2)) - inter))
    return f32(0)


def decode_bbox(prior: BBox, var: np.ndarray, code_type: int, variance_encoded_in_target: bool,
                loc: np.ndarray) -> BBox:
    """DecodeBBox: float arithmetic as the C++ writes it; `/ 2.` and ::exp are double, stored back to float."""
    lx, ly, lw, lh = (f32(v) for v in loc)
    v0, v1, v2, v3 = (f32(v) for v in var)
    if code_type == CORNER:
        if variance_encoded_in_target:
            out = [prior.xmin + lx, prior.ymin + ly, prior.xmax + lw, prior.ymax + lh]
        else:
            out = [prior.xmin + v0 * lx, prior.ymin + v1 * ly, prior.xmax + v2 * lw, prior.ymax + v3 * lh]
    elif code_type == CENTER_SIZE:
        pw, ph = f32(prior.xmax - prior.xmin), f32(prior.ymax - prior.ymin)
        assert pw > 0 and ph > 0, "CHECK_GT(prior_width, 0)"
        pcx = f32(np.float64(f32(prior.xmin + prior.xmax)) / 2.0)
        pcy = f32(np.float64(f32(prior.ymin + prior.ymax)) / 2.0)
        if variance_encoded_in_target:
            cx, cy = f32(lx * pw + pcx), f32(ly * ph + pcy)
            w = f32(np.exp(np.float64(lw)) * np.float64(pw))
            h = f32(np.exp(np.float64(lh)) * np.float64(ph))
        else:
            cx, cy = f32(v0 * lx * pw + pcx), f32(v1 * ly * ph + pcy)
            w = f32(np.exp(np.float64(f32(v2 * lw))) * np.float64(pw))
            h = f32(np.exp(np.float64(f32(v3 * lh))) * np.float64(ph))
        out = [np.float64(cx) - np.float64(w) / 2.0, np.float64(cy) - np.float64(h) / 2.0,
               np.float64(cx) + np.float64(w) / 2.0, np.float64(cy) + np.float64(h) / 2.0]
    elif code_type == CORNER_SIZE:
        pw, ph = f32(prior.xmax - prior.xmin), f32(prior.ymax - prior.ymin)
        assert pw > 0 and ph > 0, "CHECK_GT(prior_width, 0)"
        if variance_encoded_in_target:
            out = [prior.xmin + lx * pw, prior.ymin + ly * ph, prior.xmax + lw * pw, prior.ymax + lh * ph]
        else:
            out = [prior.xmin + v0 * lx * pw, prior.ymin + v1 * ly * ph, prior.xmax + v2 * lw * pw,
                   prior.ymax + v3 * lh * ph]
    else:
        raise ValueError(f"Unknown LocLossType {code_type}")
    box = BBox(*(f32(v) for v in out))
    box.size = bbox_size(box)
    return box


def get_max_score_index(scores: np.ndarray, threshold: float, top_k: int) -> list[tuple[np.float32, int]]:
    """GetMaxScoreIndex: (score, index) with score > threshold, stable-sorted descending, first top_k."""
    pairs = [(f32(s), i) for i, s in enumerate(scores) if f32(s) > f32(threshold)]
    pairs.sort(key=lambda t: -float(t[0]))  # Python's sort is stable, as std::stable_sort
    if -1 < top_k < len(pairs):
        pairs = pairs[:top_k]
    return pairs


def apply_nms_fast(boxes: list[BBox], scores: np.ndarray, score_threshold: float, nms_threshold: float,
                   eta: float, top_k: int) -> list[int]:
    """ApplyNMSFast: greedy, keep a box when its overlap with every kept box is <= the adaptive threshold."""
    adaptive = f32(nms_threshold)
    kept: list[int] = []
    for _, idx in get_max_score_index(scores, score_threshold, top_k):
        keep = all(jaccard_overlap(boxes[idx], boxes[k]) <= adaptive for k in kept)
        if keep:
            kept.append(idx)
        if keep and eta < 1 and adaptive > 0.5:
            adaptive = f32(adaptive * f32(eta))
    return kept


def detection_output(loc: np.ndarray, conf: np.ndarray, prior: np.ndarray, *, num_classes: int,
                     share_location: bool = True, background_label_id: int = 0, code_type: int = CORNER,
                     variance_encoded_in_target: bool = False, keep_top_k: int = -1,
                     confidence_threshold: float | None = None, nms_threshold: float = 0.3,
                     top_k: int | None = None, eta: float = 1.0) -> np.ndarray:
    """DetectionOutputLayer::Forward_cpu: the [1, 1, K, 7] top for bottoms loc [N, P·L·4], conf [N, P·C],
    prior [1, 2, P·4]."""
    num = loc.shape[0]
    num_loc_classes = 1 if share_location else num_classes
    num_priors = prior.shape[2] // 4
    assert num_priors * num_loc_classes * 4 == loc.reshape(num, -1).shape[1]
    assert num_priors * num_classes == conf.reshape(num, -1).shape[1]
    threshold = -FLT_MAX if confidence_threshold is None else confidence_threshold
    top_k = -1 if top_k is None else top_k
    flat = prior.reshape(-1).astype(np.float32)
    priors = []
    for i in range(num_priors):  # GetPriorBBoxes
        b = BBox(*flat[i * 4:i * 4 + 4])
        b.size = bbox_size(b)
        priors.append(b)
    variances = [flat[(num_priors + i) * 4:(num_priors + i) * 4 + 4] if flat.size >= 8 * num_priors
                 else np.ones(4, np.float32) for i in range(num_priors)]

    rows: list[list[float]] = []
    for i in range(num):
        locs = loc[i].reshape(num_priors, num_loc_classes, 4).astype(np.float32)
        scores = conf[i].reshape(num_priors, num_classes).astype(np.float32)
        decoded: dict[int, list[BBox]] = {}
        for c in range(num_loc_classes):  # DecodeBBoxesAll (background's own boxes are not decoded)
            label = -1 if share_location else c
            if not share_location and label == background_label_id:
                # The CPU code also skips label -1 when background_label_id is -1 with share_location, then
                # LOG(FATAL)s finding no boxes; Forward_gpu's decode kernel skips only a per-class background.
                continue
            decoded[label] = [decode_bbox(priors[p], variances[p], code_type, variance_encoded_in_target, locs[p, c])
                              for p in range(num_priors)]
        indices: dict[int, list[int]] = {}
        num_det = 0
        for c in range(num_classes):
            if c == background_label_id:
                continue
            boxes = decoded[-1 if share_location else c]
            indices[c] = apply_nms_fast(boxes, scores[:, c], threshold, nms_threshold, eta, top_k)
            num_det += len(indices[c])
        if -1 < keep_top_k < num_det:
            pairs = [(scores[idx, c], c, idx) for c in sorted(indices) for idx in indices[c]]
            pairs.sort(key=lambda t: -float(t[0]))  # C++ std::sort: order among equal scores unspecified
            new: dict[int, list[int]] = {}
            for _, c, idx in pairs[:keep_top_k]:
                new.setdefault(c, []).append(idx)
            indices = new
        for c in sorted(indices):
            boxes = decoded[-1 if share_location else c]
            for idx in indices[c]:
                b = boxes[idx]
                rows.append([i, c, scores[idx, c], b.xmin, b.ymin, b.xmax, b.ymax])
    if not rows:  # "Couldn't find any detections": one fake row per image
        rows = [[i, -1, -1, -1, -1, -1, -1] for i in range(num)]
    return np.array(rows, dtype=np.float32).reshape(1, 1, -1, 7)


def pairwise_overlaps(loc: np.ndarray, prior: np.ndarray, *, num_classes: int, share_location: bool,
                      code_type: int, variance_encoded_in_target: bool) -> np.ndarray:
    """Every JaccardOverlap between two decoded boxes of one image and one location class (for checking
    that test data keeps clear of the NMS threshold)."""
    num_loc_classes = 1 if share_location else num_classes
    num_priors = prior.shape[2] // 4
    flat = prior.reshape(-1).astype(np.float32)
    priors = [BBox(*flat[i * 4:i * 4 + 4]) for i in range(num_priors)]
    out = []
    for i in range(loc.shape[0]):
        locs = loc[i].reshape(num_priors, num_loc_classes, 4)
        for c in range(num_loc_classes):
            boxes = [decode_bbox(priors[p], flat[(num_priors + p) * 4:(num_priors + p) * 4 + 4], code_type,
                                 variance_encoded_in_target, locs[p, c]) for p in range(num_priors)]
            out += [jaccard_overlap(a, b) for n, a in enumerate(boxes) for b in boxes[n + 1:]]
    return np.array(out, dtype=np.float32)
