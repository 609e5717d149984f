"""Window geometry shared by the Conv / ConvTranspose / pooling emitters and shape preparation.

ONNX places windows with a begin pad and an end pad per spatial axis; Caffe has one pad,
used at both ends.  Windows start at i·stride - begin_pad in both, so Caffe reproduces
ONNX's windows with pad = begin_pad; what differs is how many windows each computes.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    """One spatial axis of an ONNX conv/pool: input size, kernel, stride, dilation and pads."""

    size: int
    kernel: int
    stride: int
    dilation: int
    pad_begin: int
    pad_end: int

    @property
    def extent(self) -> int:
        """Dilated kernel extent d·(k-1)+1."""
        return self.dilation * (self.kernel - 1) + 1


def resolve_pads(
    auto_pad: str, pads: Sequence[int], sizes: Sequence[int], kernels: Sequence[int], strides: Sequence[int],
    dilations: Sequence[int],
) -> list[tuple[int, int]]:
    """(begin, end) pad per axis for Conv/pooling, with ONNX's auto_pad SAME_UPPER/SAME_LOWER/VALID."""
    n = len(sizes)
    if auto_pad in ("", "NOTSET"):
        full = list(pads) if pads else [0] * (2 * n)
        return [(full[a], full[a + n]) for a in range(n)]
    if auto_pad == "VALID":
        return [(0, 0)] * n
    out = []
    for size, k, s, d in zip(sizes, kernels, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + d * (k - 1) + 1 - size, 0)
        small, big = total // 2, total - total // 2
        out.append((small, big) if auto_pad == "SAME_UPPER" else (big, small))
    return out


def onnx_pool_size(w: Window, ceil: bool) -> int:
    """ONNX Runtime's pooled size; in ceil mode a last window starting past the begin pad + input is dropped."""
    span = w.size + w.pad_begin + w.pad_end - w.extent
    if not ceil:
        return span // w.stride + 1
    out = -(-span // w.stride) + 1
    if (out - 1) * w.stride >= w.size + w.pad_begin:
        out -= 1
    return out


def caffe_pool_size(size: int, kernel: int, stride: int, pad: int, ceil: bool) -> int:
    """Caffe's PoolingLayer::Reshape: ceil/floor of float (in + 2p - k) / s, plus one, then its pad clip."""
    q = np.float32(size + 2 * pad - kernel) / np.float32(stride)
    out = int(math.ceil(q) if ceil else math.floor(q)) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def onnx_ave_divisor(w: Window, count: int, include_pad: bool) -> np.ndarray:
    """ONNX AveragePool's divisor per output position of one axis (window clipped to the padded input)."""
    start = np.arange(count) * w.stride - w.pad_begin
    if include_pad:
        return np.minimum(start + w.kernel, w.size + w.pad_end) - start
    return np.minimum(start + w.kernel, w.size) - np.maximum(start, 0)


def caffe_ave_divisor(w: Window, count: int) -> np.ndarray:
    """Caffe's AVE divisor per output position of one axis: window end clipped to in + pad (pad = begin pad)."""
    start = np.arange(count) * w.stride - w.pad_begin
    return np.minimum(start + w.kernel, w.size + w.pad_begin) - start
