"""Numpy references of Caffe's spatial forwards: im2col convolution, col2im deconvolution, pooling loops.

Written from BVLC Caffe's BaseConvolutionLayer / im2col_nd / col2im_nd and PoolingLayer
(Forward_cpu, and Forward_gpu's StoPoolForwardTest for STOCHASTIC), independently of the
converter: sizes are recomputed here the way Caffe computes them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

FLT_MAX = float(np.finfo(np.float32).max)


def conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """ConvolutionLayer::compute_output_shape, with C++'s truncating integer division."""
    num = size + 2 * p - (d * (k - 1) + 1)
    return int(num / s) + 1


def deconv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """DeconvolutionLayer::compute_output_shape."""
    return s * (size - 1) + d * (k - 1) + 1 - 2 * p


def _col_index(in_size: Sequence[int], out_size: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
               pad: Sequence[int], dilation: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """im2col_nd's map: (kernel offset, output position) -> flat image index, and whether it is inside."""
    n = len(in_size)
    coords = []
    for a in range(n):
        c = np.arange(out_size[a])[None, :] * stride[a] - pad[a] + np.arange(kernel[a])[:, None] * dilation[a]
        shape = [1] * (2 * n)
        shape[a], shape[n + a] = kernel[a], out_size[a]
        coords.append(c.reshape(shape))
    full = np.broadcast_shapes(*(c.shape for c in coords))
    coords = [np.broadcast_to(c, full) for c in coords]
    valid = np.ones(full, bool)
    for a, c in enumerate(coords):
        valid &= (c >= 0) & (c < in_size[a])
    flat = np.ravel_multi_index(tuple(np.clip(c, 0, in_size[a] - 1) for a, c in enumerate(coords)), tuple(in_size))
    k, o = math.prod(kernel), math.prod(out_size)
    return flat.reshape(k, o), valid.reshape(k, o)


def caffe_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: Sequence[int], pad: Sequence[int],
               dilation: Sequence[int], group: int) -> np.ndarray:
    """Caffe's Convolution forward (channel axis 1): im2col per image, one GEMM per group, plus bias."""
    num, channels, *in_size = x.shape
    kernel = w.shape[2:]
    out_size = [conv_out_size(*a) for a in zip(in_size, kernel, stride, pad, dilation)]
    idx, valid = _col_index(in_size, out_size, kernel, stride, pad, dilation)
    m = w.shape[0]
    wmat = w.reshape(group, m // group, -1).astype(np.float64)
    top = np.zeros((num, m, math.prod(out_size)))
    for n in range(num):
        planes = x[n].reshape(channels, -1).astype(np.float64)
        col = np.where(valid, planes[:, idx], 0.0).reshape(group, -1, idx.shape[1])  # (g, C/g*K, O)
        top[n] = np.concatenate([wmat[g] @ col[g] for g in range(group)])
    if b is not None:
        top += b.reshape(1, -1, 1)
    return top.reshape(num, m, *out_size).astype(np.float32)


def caffe_deconv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: Sequence[int], pad: Sequence[int],
                 dilation: Sequence[int], group: int) -> np.ndarray:
    """Caffe's Deconvolution forward: col = Wᵀ·x per group, then col2im (accumulating) into the top."""
    num, channels, *in_size = x.shape
    kernel = w.shape[2:]
    m = w.shape[1] * group
    out_size = [deconv_out_size(*a) for a in zip(in_size, kernel, stride, pad, dilation)]
    idx, valid = _col_index(out_size, in_size, kernel, stride, pad, dilation)
    wmat = w.reshape(group, channels // group, -1).astype(np.float64)  # (g, C/g, M/g*K)
    top = np.zeros((num, m, math.prod(out_size)))
    for n in range(num):
        xin = x[n].reshape(group, channels // group, -1).astype(np.float64)
        col = np.concatenate([wmat[g].T @ xin[g] for g in range(group)]).reshape(m, *idx.shape)  # (M, K, I)
        for c in range(m):
            np.add.at(top[n, c], idx[valid], col[c][valid])
    if b is not None:
        top += b.reshape(1, -1, 1)
    return top.reshape(num, m, *out_size).astype(np.float32)


def pooled_size(size: int, k: int, s: int, p: int, ceil: bool) -> int:
    """PoolingLayer::Reshape's size before the clip: ceil/floor of float (size + 2p - k) / s, plus one."""
    q = np.float32(size + 2 * p - k) / np.float32(s)
    return int(np.ceil(q) if ceil else np.floor(q)) + 1


def caffe_pool(x: np.ndarray, method: str, kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int],
               ceil: bool = True, global_pooling: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Caffe's Pooling forward (MAX / AVE on CPU, STOCHASTIC at TEST on GPU); returns (top, MAX mask)."""
    num, channels, height, width = x.shape
    if global_pooling:
        kernel = (height, width)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    oh, ow = pooled_size(height, kh, sh, ph, ceil), pooled_size(width, kw, sw, pw, ceil)
    if ph or pw:
        if (oh - 1) * sh >= height + ph:
            oh -= 1
        if (ow - 1) * sw >= width + pw:
            ow -= 1
    xd = x.astype(np.float64)
    top = np.zeros((num, channels, oh, ow))
    mask = np.full((num, channels, oh, ow), -1.0)
    for i in range(oh):
        for j in range(ow):
            if method == "MAX":
                hs, ws = i * sh - ph, j * sw - pw
                he, we = min(hs + kh, height), min(ws + kw, width)
                hs, ws = max(hs, 0), max(ws, 0)
                top[:, :, i, j] = -FLT_MAX
                if he > hs and we > ws:
                    # Scanning h then w with a strict '>' from -FLT_MAX keeps the first maximum.
                    window = xd[:, :, hs:he, ws:we].reshape(num, channels, -1)
                    first = window.argmax(axis=2)
                    best = np.take_along_axis(window, first[..., None], axis=2)[..., 0]
                    found = best > -FLT_MAX
                    rows, cols = hs + first // (we - ws), ws + first % (we - ws)
                    top[:, :, i, j] = np.where(found, best, -FLT_MAX)
                    mask[:, :, i, j] = np.where(found, rows * width + cols, -1)
            elif method == "AVE":
                hs, ws = i * sh - ph, j * sw - pw
                he, we = min(hs + kh, height + ph), min(ws + kw, width + pw)
                pool_size = (he - hs) * (we - ws)
                hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, height), min(we, width)
                total = xd[:, :, hs:he, ws:we].sum(axis=(2, 3)) if he > hs and we > ws else np.zeros((num, channels))
                with np.errstate(invalid="ignore", divide="ignore"):
                    top[:, :, i, j] = total / np.float64(pool_size)
            elif method == "STOCHASTIC":
                hs, ws = i * sh, j * sw
                he, we = min(hs + kh, height), min(ws + kw, width)
                window = xd[:, :, hs:max(he, hs), ws:max(we, ws)]
                cumsum, cumvalues = window.sum(axis=(2, 3)), (window * window).sum(axis=(2, 3))
                with np.errstate(invalid="ignore", divide="ignore"):
                    top[:, :, i, j] = np.where(cumsum > 0, cumvalues / cumsum, 0.0)
            else:
                raise ValueError(f"unknown pooling method {method!r}")
    return top.astype(np.float32), mask.astype(np.float32)
