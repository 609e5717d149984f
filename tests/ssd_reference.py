"""Numpy references for the SSD fork's PriorBox and Normalize layers, written from weiliu89/caffe (ssd branch).

These follow the C++ loop by loop and number type by number type, independently of the converter's
vectorised code, so a parity test compares two derivations of the same Caffe semantics:

- PriorBoxLayer::Forward_cpu: per cell (h, w), per min_size s: the min_size square, the
  sqrt(min_size·max_size) square, then one box per aspect ratio other than 1 (min_size·√ar by
  min_size/√ar).  min_size and max_size are read into `int`s (truncated), centres are float,
  the corner arithmetic is double stored to float.  OpenCV's additions (explicit width/height
  lists, several offset_h/offset_w pairs: one prior per box per offset) are followed as
  opencv/opencv modules/dnn/src/layers/prior_box_layer.cpp does.
- NormalizeLayer::Forward_cpu: norm = sqrt(Σx² + eps) (eps inside the root, added once) over the
  channels at each position, or over C·H·W with across_spatial; top = x / norm · scale.
  Backward_cpu as Caffe writes it (which, with a per-channel scale, multiplies the whole
  normalisation diff by the channel's own scale: see `normalize_backward`).
"""
from __future__ import annotations

import math

import numpy as np

from caffeonnx.proto import caffe_pb2

f32 = np.float32


def _aspect_ratios(p: caffe_pb2.PriorBoxParameter) -> list[float]:
    """LayerSetUp's list: 1, then each new ratio (|ar - known| >= 1e-6) and, with flip, 1/ar (as float)."""
    ratios = [1.0]
    for ar in p.aspect_ratio:
        ar = float(f32(ar))
        if any(abs(ar - known) < 1e-6 for known in ratios):
            continue
        ratios.append(ar)
        if p.flip:
            ratios.append(float(f32(1.0 / ar)))
    return ratios


def _boxes(p: caffe_pb2.PriorBoxParameter) -> list[tuple[float, float]]:
    """(width, height) of each prior of one cell, in the order Forward_cpu writes them (float values)."""
    if len(p.width):  # OpenCV: explicit sizes, taken as they are
        return [(float(f32(w)), float(f32(h))) for w, h in zip(p.width, p.height)]
    out = []
    for s in range(len(p.min_size)):
        min_size = int(p.min_size[s])  # `int min_size_ = min_sizes_[s];`
        out.append((float(f32(min_size)), float(f32(min_size))))
        if len(p.max_size):
            max_size = int(p.max_size[s])
            side = float(f32(math.sqrt(min_size * max_size)))
            out.append((side, side))
        for ar in _aspect_ratios(p):
            if abs(ar - 1.0) < 1e-6:
                continue
            out.append((float(f32(min_size * math.sqrt(ar))), float(f32(min_size / math.sqrt(ar)))))
    return out


def prior_box(p: caffe_pb2.PriorBoxParameter, feature_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """PriorBoxLayer's top, shape (1, 2, H·W·num_priors·4): corners (xmin, ymin, xmax, ymax), then variances."""
    layer_h, layer_w = feature_hw
    if p.HasField("img_h") or p.HasField("img_w"):
        img_h, img_w = p.img_h, p.img_w
    elif p.HasField("img_size"):
        img_h = img_w = p.img_size
    else:
        img_h, img_w = image_hw
    if p.HasField("step_h") or p.HasField("step_w"):
        step_h, step_w = f32(p.step_h), f32(p.step_w)
    elif p.HasField("step"):
        step_h = step_w = f32(p.step)
    else:
        step_h, step_w = f32(img_h) / f32(layer_h), f32(img_w) / f32(layer_w)
    if len(p.offset_h):
        offsets = [(f32(oy), f32(ox)) for oy, ox in zip(p.offset_h, p.offset_w)]
    else:
        offsets = [(f32(p.offset), f32(p.offset))]
    boxes = _boxes(p)
    coords: list[float] = []
    for h in range(layer_h):
        for w in range(layer_w):
            for box_w, box_h in boxes:
                for off_y, off_x in offsets:
                    cx = float((f32(w) + off_x) * step_w)  # float arithmetic
                    cy = float((f32(h) + off_y) * step_h)
                    coords += [(cx - box_w / 2.0) / img_w, (cy - box_h / 2.0) / img_h,
                               (cx + box_w / 2.0) / img_w, (cy + box_h / 2.0) / img_h]
    top = np.zeros((1, 2, len(coords)), dtype=np.float32)
    top[0, 0] = np.array(coords, dtype=np.float64).astype(np.float32)
    if p.clip:
        top[0, 0] = np.minimum(np.maximum(top[0, 0], f32(0)), f32(1))
    variance = list(p.variance) or [0.1]
    if len(variance) == 1:
        top[0, 1] = f32(variance[0])
    else:
        top[0, 1] = np.tile(np.array(variance, dtype=np.float32), len(coords) // 4)
    return top


def num_priors(p: caffe_pb2.PriorBoxParameter) -> int:
    """Priors per feature-map cell."""
    return len(_boxes(p)) * max(1, len(p.offset_h))


def _norm_view(x: np.ndarray) -> np.ndarray:
    """x as (num, channels, spatial) with Caffe's legacy accessors (missing axes read 1)."""
    n, c = x.shape[:2]
    return x.reshape(n, c, -1).astype(np.float64)


def normalize(x: np.ndarray, scale: np.ndarray, across_spatial: bool, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """NormalizeLayer::Forward_cpu; returns the top and the norm (per num, or per num and position)."""
    v = _norm_view(x)
    eps = float(f32(eps))
    if across_spatial:
        norm = np.sqrt((v * v).sum(axis=(1, 2), keepdims=True) + eps)
    else:
        norm = np.sqrt((v * v).sum(axis=1, keepdims=True) + eps)
    s = np.asarray(scale, dtype=np.float64).reshape(1, -1, 1)  # one value, or one per channel
    return (v / norm * s).reshape(x.shape), norm


def normalize_backward(x: np.ndarray, scale: np.ndarray, dy: np.ndarray, across_spatial: bool,
                       eps: float) -> tuple[np.ndarray, np.ndarray]:
    """NormalizeLayer::Backward_cpu: (bottom diff, scale diff).

    bottom diff = scale_c · (dy - x·Σ(x·dy)/norm²) / norm, the Σ over the norm's extent; the
    scale diff sums top·dy/scale over everything a scale value multiplies.  With one shared
    scale this is the exact derivative; with per-channel scales the exact one has Σ(x·scale·dy)
    where Caffe has scale_c·Σ(x·dy), so the two agree only where the scales are equal.
    """
    v, g = _norm_view(x), _norm_view(dy)
    y, norm = normalize(x, scale, across_spatial, eps)
    axes = (1, 2) if across_spatial else 1
    s = np.asarray(scale, dtype=np.float64).reshape(1, -1, 1)
    dx = (g - v * (v * g).sum(axis=axes, keepdims=True) / norm**2) / norm * s
    t = _norm_view(y) * g / s
    dscale = t.sum() if np.asarray(scale).size == 1 else t.sum(axis=(0, 2))
    return dx.reshape(x.shape), np.asarray(dscale).reshape(np.shape(scale))


def normalize_exact_backward(x: np.ndarray, scale: np.ndarray, dy: np.ndarray, across_spatial: bool,
                             eps: float) -> np.ndarray:
    """The exact derivative of Forward_cpu's top with respect to the bottom (what autograd gives)."""
    v, g = _norm_view(x), _norm_view(dy)
    _, norm = normalize(x, scale, across_spatial, eps)
    axes = (1, 2) if across_spatial else 1
    gs = g * np.asarray(scale, dtype=np.float64).reshape(1, -1, 1)
    return ((gs - v * (v * gs).sum(axis=axes, keepdims=True) / norm**2) / norm).reshape(x.shape)
