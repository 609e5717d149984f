"""Numpy references for the R-CNN family's layers, written from the forks' own sources.

Each follows its source loop by loop and number type by number type, independently of the
converter's vectorised ONNX construction, so a parity test compares two derivations:

- ROIPoolingLayer::Forward_cpu / Backward_cpu (rbgirshick/caffe-fast-rcnn): C `round` (half away
  from zero) of the float product coordinate·spatial_scale, roi size max(end - start + 1, 1),
  float bin size, bin [floor(p·bin), ceil((p+1)·bin)) shifted and clipped to the map, max from
  -FLT_MAX with `>` (the first maximum wins the argmax), empty bins 0; the backward pass gives
  each top diff to its argmax.
- PSROIPoolingForward_cpu (daijifeng001/caffe-rfcn): round() of the raw coordinate, then ·scale;
  the end gets +1 before the scaling; roi size max(·, 0.1); bin bounds floor/ceil of
  p·bin + start, clipped; the mean over the bin (summed in float, in h then w order), empty 0;
  the GPU backward pass spreads top_diff / bin_area over the bin.
- py-faster-rcnn's rpn/proposal_layer.py with generate_anchors.py, bbox_transform.py and the
  GPU NMS kernel (nms_kernel.cu, the default `USE_GPU_NMS`): float64 anchors with numpy's
  half-to-even `np.round`, float32 box arithmetic with +1 widths, clipping, the min-size filter
  scaled by im_info[2], a descending score sort, pre_nms_topN, greedy NMS suppressing IoU > thresh
  (areas with +1), post_nms_topN.
"""
from __future__ import annotations

import math

import numpy as np

f32 = np.float32
FLT_MAX = float(np.finfo(np.float32).max)


def c_round(v: float) -> int:
    """C's round(): half away from zero (exact in double for a float argument of moderate size)."""
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def roi_bins(start: int, end: int, pooled: int, limit: int) -> list[tuple[int, int]]:
    """ROIPooling's [start, end) bins along one axis (float bin size, clipped to [0, limit])."""
    size = max(end - start + 1, 1)
    bin_size = f32(size) / f32(pooled)
    out = []
    for p in range(pooled):
        lo = math.floor(f32(p) * bin_size)
        hi = math.ceil(f32(p + 1) * bin_size)
        out.append((min(max(lo + start, 0), limit), min(max(hi + start, 0), limit)))
    return out


def roi_pool(x: np.ndarray, rois: np.ndarray, pooled_h: int, pooled_w: int,
             scale: float) -> tuple[np.ndarray, np.ndarray]:
    """ROIPoolingLayer::Forward_cpu: (top [R, C, ph, pw], argmax [R, C, ph, pw] as flat h·W + w, -1 for none)."""
    n, c, height, width = x.shape
    rois = rois.reshape(-1, 5).astype(np.float32)
    scale = f32(scale)
    top = np.full((len(rois), c, pooled_h, pooled_w), -FLT_MAX, dtype=np.float32)
    arg = np.full(top.shape, -1, dtype=np.int64)
    for r, roi in enumerate(rois):
        b = int(roi[0])  # `int roi_batch_ind = bottom_rois[0]`: truncation
        assert 0 <= b < n, "Caffe CHECKs the batch index"
        sw, sh, ew, eh = (c_round(float(roi[k] * scale)) for k in range(1, 5))
        hbins = roi_bins(sh, eh, pooled_h, height)
        wbins = roi_bins(sw, ew, pooled_w, width)
        for ph, (hs, he) in enumerate(hbins):
            for pw, (ws, we) in enumerate(wbins):
                if he <= hs or we <= ws:
                    top[r, :, ph, pw] = 0
                    continue
                for h in range(hs, he):
                    for w in range(ws, we):
                        v = x[b, :, h, w]
                        better = v > top[r, :, ph, pw]
                        top[r, better, ph, pw] = v[better]
                        arg[r, better, ph, pw] = h * width + w
    return top, arg


def roi_pool_backward(x_shape: tuple[int, ...], rois: np.ndarray, argmax: np.ndarray,
                      top_diff: np.ndarray) -> np.ndarray:
    """ROIPoolingLayer::Backward_cpu: every top diff is added to its bin's argmax (none for empty bins)."""
    n, c, height, width = x_shape
    dx = np.zeros(x_shape, dtype=np.float32).reshape(n, c, height * width)
    for r, roi in enumerate(rois.reshape(-1, 5)):
        b = int(roi[0])
        for ch in range(c):
            for idx, diff in zip(argmax[r, ch].ravel(), top_diff[r, ch].ravel()):
                if idx >= 0:
                    dx[b, ch, idx] += diff
    return dx.reshape(x_shape)


def psroi_bins(start: np.float32, bin_size: np.float32, pooled: int, limit: int) -> list[tuple[int, int]]:
    """PSROIPooling's [start, end) bins along one axis: floor/ceil of p·bin + start, clipped."""
    out = []
    for p in range(pooled):
        lo = math.floor(f32(f32(p) * bin_size) + start)
        hi = math.ceil(f32(f32(p + 1) * bin_size) + start)
        out.append((min(max(lo, 0), limit), min(max(hi, 0), limit)))
    return out


def _psroi_geometry(roi: np.ndarray, scale: np.float32, group: int, height: int,
                    width: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    start_w = f32(c_round(float(roi[1]))) * scale
    start_h = f32(c_round(float(roi[2]))) * scale
    end_w = f32(c_round(float(roi[3])) + 1.0) * scale
    end_h = f32(c_round(float(roi[4])) + 1.0) * scale
    roi_w = max(f32(end_w - start_w), f32(0.1))
    roi_h = max(f32(end_h - start_h), f32(0.1))
    return (psroi_bins(start_h, f32(roi_h / f32(group)), group, height),
            psroi_bins(start_w, f32(roi_w / f32(group)), group, width))


def psroi_pool(x: np.ndarray, rois: np.ndarray, output_dim: int, group: int, scale: float) -> np.ndarray:
    """PSROIPoolingForward_cpu: top [R, output_dim, group, group]."""
    _, _, height, width = x.shape
    rois = rois.reshape(-1, 5).astype(np.float32)
    top = np.zeros((len(rois), output_dim, group, group), dtype=np.float32)
    for r, roi in enumerate(rois):
        b = int(roi[0])
        hbins, wbins = _psroi_geometry(roi, f32(scale), group, height, width)
        for ph, (hs, he) in enumerate(hbins):
            for pw, (ws, we) in enumerate(wbins):
                if he <= hs or we <= ws:
                    continue
                channels = [(d * group + ph) * group + pw for d in range(output_dim)]
                acc = np.zeros(output_dim, dtype=np.float32)
                for h in range(hs, he):
                    for w in range(ws, we):
                        acc = acc + x[b, channels, h, w]
                top[r, :, ph, pw] = acc / f32((he - hs) * (we - ws))
    return top


def psroi_pool_backward(x_shape: tuple[int, ...], rois: np.ndarray, output_dim: int, group: int, scale: float,
                        top_diff: np.ndarray) -> np.ndarray:
    """PSROIPoolingBackwardAtomic: each top diff / bin_area is added over its bin of its mapped channel."""
    _, _, height, width = x_shape
    dx = np.zeros(x_shape, dtype=np.float64)
    for r, roi in enumerate(rois.reshape(-1, 5).astype(np.float32)):
        b = int(roi[0])
        hbins, wbins = _psroi_geometry(roi, f32(scale), group, height, width)
        for ph, (hs, he) in enumerate(hbins):
            for pw, (ws, we) in enumerate(wbins):
                if he <= hs or we <= ws:
                    continue
                area = (he - hs) * (we - ws)
                for d in range(output_dim):
                    dx[b, (d * group + ph) * group + pw, hs:he, ws:we] += top_diff[r, d, ph, pw] / area
    return dx.astype(np.float32)


# --- py-faster-rcnn's proposal layer ------------------------------------------------------------------------------

def _whctrs(anchor: np.ndarray) -> tuple[float, float, float, float]:
    w = anchor[2] - anchor[0] + 1
    h = anchor[3] - anchor[1] + 1
    return w, h, anchor[0] + 0.5 * (w - 1), anchor[1] + 0.5 * (h - 1)


def _mkanchors(ws: np.ndarray, hs: np.ndarray, x_ctr: float, y_ctr: float) -> np.ndarray:
    ws, hs = ws[:, None], hs[:, None]
    return np.hstack((x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1), x_ctr + 0.5 * (ws - 1), y_ctr + 0.5 * (hs - 1)))


def generate_anchors(base_size: int = 16, ratios: tuple[float, ...] = (0.5, 1, 2),
                     scales: tuple[float, ...] = (8, 16, 32)) -> np.ndarray:
    """generate_anchors.py: ratio enumeration (np.round, half to even) of the base box, then scale enumeration."""
    base = np.array([1, 1, base_size, base_size]) - 1
    w, h, x_ctr, y_ctr = _whctrs(base)
    ws = np.round(np.sqrt(w * h / np.asarray(ratios, dtype=np.float64)))
    hs = np.round(ws * np.asarray(ratios, dtype=np.float64))
    ratio_anchors = _mkanchors(ws, hs, x_ctr, y_ctr)
    out = []
    for anchor in ratio_anchors:
        w, h, x_ctr, y_ctr = _whctrs(anchor)
        out.append(_mkanchors(w * np.asarray(scales, dtype=np.float64), h * np.asarray(scales, dtype=np.float64),
                              x_ctr, y_ctr))
    return np.vstack(out)


def _expf(v: np.ndarray) -> np.ndarray:
    """exp of float32 values, correctly rounded (glibc's expf of py-faster-rcnn's days; numpy >= 1.17's SIMD
    float32 exp is an ulp off for many inputs and depends on the CPU's vector extensions)."""
    return np.exp(v.astype(np.float64)).astype(np.float32)


def bbox_transform_inv(boxes: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """bbox_transform.py: widths with +1, centre x1 + w/2, exp of the size deltas, corners ctr ± w/2 (float32)."""
    boxes = boxes.astype(deltas.dtype, copy=False)
    widths = boxes[:, 2] - boxes[:, 0] + f32(1.0)
    heights = boxes[:, 3] - boxes[:, 1] + f32(1.0)
    ctr_x = boxes[:, 0] + f32(0.5) * widths
    ctr_y = boxes[:, 1] + f32(0.5) * heights
    pred_ctr_x = deltas[:, 0] * widths + ctr_x
    pred_ctr_y = deltas[:, 1] * heights + ctr_y
    pred_w = _expf(deltas[:, 2]) * widths
    pred_h = _expf(deltas[:, 3]) * heights
    return np.stack([pred_ctr_x - f32(0.5) * pred_w, pred_ctr_y - f32(0.5) * pred_h,
                     pred_ctr_x + f32(0.5) * pred_w, pred_ctr_y + f32(0.5) * pred_h], axis=1)


def clip_boxes(boxes: np.ndarray, im_shape: np.ndarray) -> np.ndarray:
    """bbox_transform.py's clip_boxes: x into [0, cols - 1], y into [0, rows - 1]."""
    out = boxes.copy()
    out[:, 0::2] = np.maximum(np.minimum(out[:, 0::2], im_shape[1] - f32(1)), f32(0))
    out[:, 1::2] = np.maximum(np.minimum(out[:, 1::2], im_shape[0] - f32(1)), f32(0))
    return out


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """nms_kernel.cu's devIoU of box `a` with each row of `b`, float arithmetic with +1 sides."""
    left, right = np.maximum(a[0], b[:, 0]), np.minimum(a[2], b[:, 2])
    top, bottom = np.maximum(a[1], b[:, 1]), np.minimum(a[3], b[:, 3])
    width = np.maximum(right - left + f32(1), f32(0))
    height = np.maximum(bottom - top + f32(1), f32(0))
    inter = width * height
    area_a = (a[2] - a[0] + f32(1)) * (a[3] - a[1] + f32(1))
    area_b = (b[:, 2] - b[:, 0] + f32(1)) * (b[:, 3] - b[:, 1] + f32(1))
    return inter / (area_a + area_b - inter)


def nms(boxes: np.ndarray, thresh: float, limit: int = 0) -> tuple[list[int], float]:
    """Greedy NMS over score-sorted boxes, as the GPU kernel's mask pass decides it: keep each box no kept
    box suppressed, suppressing the later ones with IoU > thresh (float), until `limit` are kept (> 0);
    also the closest any deciding IoU came to thresh."""
    thresh = f32(thresh)
    boxes = boxes.astype(np.float32)
    keep: list[int] = []
    alive = np.ones(len(boxes), dtype=bool)
    margin = math.inf
    for i in range(len(boxes)):
        if not alive[i] or len(keep) == limit > 0:
            continue
        keep.append(i)
        later = np.flatnonzero(alive[i + 1:]) + i + 1
        overlaps = iou(boxes[i], boxes[later])
        assert overlaps.dtype == np.float32
        if len(later):
            margin = min(margin, float(np.min(np.abs(overlaps.astype(np.float64) - float(thresh)))))
        alive[later[overlaps > thresh]] = False
    return keep, margin


def proposal(cls_prob: np.ndarray, bbox_pred: np.ndarray, im_info: np.ndarray, *, feat_stride: int = 16,
             anchors: np.ndarray | None = None, pre_nms_topn: int = 6000, post_nms_topn: int = 300,
             nms_thresh: float = 0.7, min_size: float = 16) -> tuple[np.ndarray, np.ndarray, float]:
    """ProposalLayer.forward: (rois [R, 5], scores [R, 1], margin).

    `margin` is how close a decision came to flipping: the smallest |IoU - nms_thresh| NMS met and
    |side - min_size·scale| over the boxes, so a test can tell ulp-level differences cannot matter.
    """
    anchors = generate_anchors() if anchors is None else anchors
    a = anchors.shape[0]
    scores = cls_prob[:, a:, :, :]
    info = im_info.reshape(-1)[:3].astype(np.float32)
    height, width = scores.shape[-2:]
    shift_x, shift_y = np.meshgrid(np.arange(0, width) * feat_stride, np.arange(0, height) * feat_stride)
    shifts = np.vstack((shift_x.ravel(), shift_y.ravel(), shift_x.ravel(), shift_y.ravel())).transpose()
    all_anchors = (anchors.reshape((1, a, 4)) + shifts.reshape((1, -1, 4)).transpose((1, 0, 2))).reshape((-1, 4))
    deltas = bbox_pred.transpose((0, 2, 3, 1)).reshape((-1, 4)).astype(np.float32)
    scores = scores.transpose((0, 2, 3, 1)).reshape((-1, 1)).astype(np.float32)
    boxes = clip_boxes(bbox_transform_inv(all_anchors, deltas), info[:2])
    limit = f32(f32(min_size) * info[2])
    ws = boxes[:, 2] - boxes[:, 0] + f32(1)
    hs = boxes[:, 3] - boxes[:, 1] + f32(1)
    keep = np.where((ws >= limit) & (hs >= limit))[0]
    side_margin = float(np.min(np.abs(np.concatenate([ws, hs]).astype(np.float64) - float(limit)), initial=math.inf))
    boxes, scores = boxes[keep], scores[keep]
    order = scores.ravel().argsort(kind="stable")[::-1]
    if pre_nms_topn > 0:
        order = order[:pre_nms_topn]
    boxes, scores = boxes[order], scores[order]
    kept, margin = nms(boxes, nms_thresh, post_nms_topn)  # then keep[:post_nms_topN]
    margin = min(margin, side_margin)
    boxes, scores = boxes[kept], scores[kept]
    rois = np.hstack((np.zeros((len(boxes), 1), dtype=np.float32), boxes.astype(np.float32)))
    return rois, scores, margin
