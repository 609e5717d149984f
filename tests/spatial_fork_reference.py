"""Numpy transcriptions of the forks' spatial layers, written from their C++ and nothing else.

- SegNet's UpsampleLayer (alexgkendall/caffe-segnet upsample_layer.cpp): Reshape's size rule,
  Forward_cpu's scatter loop and Backward_cpu's gather loop.
- SegNet's BNLayer (bn_layer.cpp): LEARN (batch statistics, var = E[x²] − E[x]², eps 1e-9)
  and INFERENCE forwards, and Backward_cpu's data and parameter diffs.
- PSPNet's BNLayer (hszhao/PSPNet bn_layer.cpp): stored or batch statistics, eps, and the
  frozen and training backwards.
- DeepLab/PSPNet's InterpLayer (interp_layer.cpp, util/interp.cpp): the size rules and
  caffe_cpu_interp2 / caffe_cpu_interp2_backward, float32 coordinates as in the C++.
"""
from __future__ import annotations

import numpy as np

# --- Upsample -------------------------------------------------------------------------------


def upsample_size(height: int, width: int, scale: tuple[int, int] = (2, 2), pad_out: tuple[bool, bool] = (False, False),
                  upsample: tuple[int, int] | None = None) -> tuple[int, int]:
    """UpsampleLayer::Reshape: upsample_h/w when given, else H·scale_h − pad_out_h by W·scale_w − pad_out_w."""
    if upsample is not None:
        return upsample
    return height * scale[0] - int(pad_out[0]), width * scale[1] - int(pad_out[1])


def upsample_forward(x: np.ndarray, mask: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Forward_cpu: a zero top; per (n, c) plane, top[int(mask[i])] = bottom[i] in order i = 0, 1, ..."""
    num, channels, height, width = x.shape
    top = np.zeros((num, channels, out_h * out_w), np.float32)
    for n in range(num):
        for c in range(channels):
            src, idx = x[n, c].reshape(-1), mask[n, c].reshape(-1)
            for i in range(height * width):
                k = int(idx[i])  # static_cast<int>
                assert 0 <= k < out_h * out_w, f"upsample top index {k} out of range"
                top[n, c, k] = src[i]
    return top.reshape(num, channels, out_h, out_w)


def upsample_backward(top_diff: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Backward_cpu: bottom_diff[i] = top_diff[int(mask[i])] within each plane."""
    num, channels = mask.shape[:2]
    flat = top_diff.reshape(num, channels, -1)
    out = np.zeros(mask.shape, np.float32)
    for n in range(num):
        for c in range(channels):
            out[n, c] = flat[n, c][mask[n, c].astype(np.int64)]
    return out


# --- BN (SegNet) ----------------------------------------------------------------------------

SEGNET_EPS = np.float32(1e-9)


def _per_channel(x: np.ndarray) -> np.ndarray:
    """Caffe's two gemv passes: the spatial mean of each (n, c) plane, then the mean over n."""
    return x.mean(axis=(2, 3)).mean(axis=0).reshape(1, -1, 1, 1)


def segnet_bn_forward(x: np.ndarray, scale: np.ndarray, shift: np.ndarray, learn: bool) -> dict[str, np.ndarray]:
    """Forward_cpu in float64: top, and in LEARN the batch mean and variance tops and x_norm."""
    xd, s, b = x.astype(np.float64), scale.astype(np.float64), shift.astype(np.float64)
    if not learn:
        return {"top": s * xd + b}
    mean = _per_channel(xd)
    var = _per_channel(xd * xd) - mean * mean
    std = np.sqrt(var + SEGNET_EPS)
    x_norm = (xd - mean) / std
    return {"top": x_norm * s + b, "mean": mean, "var": var, "x_norm": x_norm, "std": std}


def segnet_bn_backward(x: np.ndarray, scale: np.ndarray, top_diff: np.ndarray, learn: bool) -> dict[str, np.ndarray]:
    """Backward_cpu: bottom diff and the scale/shift diffs (sums over n, h, w)."""
    dy, s = top_diff.astype(np.float64), scale.astype(np.float64)
    shift_diff = dy.sum(axis=(0, 2, 3)).reshape(1, -1, 1, 1)
    if not learn:
        return {"bottom": dy * s, "scale": (x * dy).sum(axis=(0, 2, 3)).reshape(1, -1, 1, 1), "shift": shift_diff}
    fwd = segnet_bn_forward(x, scale, np.zeros_like(scale), True)
    x_norm, std = fwd["x_norm"], fwd["std"]
    m = x.shape[0] * x.shape[2] * x.shape[3]
    scaled = dy * s  # buffer_blob_: scale · top_diff
    # bottom = x_norm · Σ(scaled · x_norm) + Σ scaled, then scaled − that / m, then / std
    bottom = x_norm * (scaled * x_norm).sum(axis=(0, 2, 3), keepdims=True) + scaled.sum(axis=(0, 2, 3), keepdims=True)
    bottom = (scaled - bottom / m) / std
    return {"bottom": bottom, "scale": (x_norm * dy).sum(axis=(0, 2, 3)).reshape(1, -1, 1, 1), "shift": shift_diff}


# --- BN (PSPNet) ----------------------------------------------------------------------------


def pspnet_bn_forward(x: np.ndarray, slope: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray,
                      eps: float, stored: bool) -> dict[str, np.ndarray]:
    """Forward_cpu: (x − mean)·(var + eps)^−½·slope + bias, statistics stored (TEST/frozen) or the batch's."""
    xd = x.astype(np.float64)
    if not stored:
        mean = _per_channel(xd)
        var = _per_channel((xd - mean) ** 2)
    inv_std = (var.astype(np.float64) + np.float32(eps)) ** -0.5
    x_norm = (xd - mean) * inv_std
    return {"top": x_norm * slope + bias, "x_norm": x_norm, "inv_std": inv_std}


def pspnet_bn_backward(x: np.ndarray, slope: np.ndarray, var: np.ndarray, eps: float, top_diff: np.ndarray,
                       frozen: bool) -> np.ndarray:
    """Backward_cpu's bottom diff: slope·inv_std·dy when frozen, else the batch-statistics formula."""
    dy = top_diff.astype(np.float64)
    if frozen:
        return dy * slope * (var.astype(np.float64) + np.float32(eps)) ** -0.5
    xd = x.astype(np.float64)
    mean = _per_channel(xd)
    inv_std = (_per_channel((xd - mean) ** 2) + np.float32(eps)) ** -0.5  # x_inv_std_ saved by the forward
    x_norm = (xd - mean) * inv_std
    m = x.shape[0] * x.shape[2] * x.shape[3]
    scaled = dy * slope
    bottom = x_norm * (x_norm * scaled).sum(axis=(0, 2, 3), keepdims=True) + scaled.sum(axis=(0, 2, 3), keepdims=True)
    return (scaled - bottom / m) * inv_std


# --- Interp ---------------------------------------------------------------------------------


def interp_size(height: int, width: int, *, zoom: int | None = None, shrink: int | None = None,
                size: tuple[int, int] | None = None, pad_beg: int = 0, pad_end: int = 0) -> tuple[int, int]:
    """InterpLayer::Reshape's output size on the effective (cropped) input."""
    h, w = height + pad_beg + pad_end, width + pad_beg + pad_end
    if zoom is not None:
        return h + (h - 1) * (zoom - 1), w + (w - 1) * (zoom - 1)
    if shrink is not None:
        return (h - 1) // shrink + 1, (w - 1) // shrink + 1
    assert size is not None
    return size


def _taps(n_in: int, n_out: int) -> list[tuple[int, int, np.float32, np.float32]]:
    """Per output index: (i0, step to i1, weight of i0, weight of i1), float32 as caffe_cpu_interp2 computes."""
    ratio = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
    taps = []
    for o in range(n_out):
        r = np.float32(ratio * np.float32(o))
        i0 = int(r)
        lam1 = np.float32(r - np.float32(i0))
        taps.append((i0, 1 if i0 < n_in - 1 else 0, np.float32(1) - lam1, lam1))
    return taps


def interp_forward(x: np.ndarray, out_h: int, out_w: int, pad_beg: int = 0, pad_end: int = 0) -> np.ndarray:
    """InterpLayer::Forward_cpu: crop from (−pad_beg, −pad_beg), then caffe_cpu_interp2 (copy when sizes match)."""
    h_eff, w_eff = x.shape[2] + pad_beg + pad_end, x.shape[3] + pad_beg + pad_end
    src = x[:, :, -pad_beg:-pad_beg + h_eff, -pad_beg:-pad_beg + w_eff].astype(np.float32)
    if (h_eff, w_eff) == (out_h, out_w):
        return src.copy()
    top = np.zeros((*x.shape[:2], out_h, out_w), np.float32)
    for h2, (h1, hp, h0l, h1l) in enumerate(_taps(h_eff, out_h)):
        for w2, (w1, wp, w0l, w1l) in enumerate(_taps(w_eff, out_w)):
            top[:, :, h2, w2] = (h0l * (w0l * src[:, :, h1, w1] + w1l * src[:, :, h1, w1 + wp])
                                 + h1l * (w0l * src[:, :, h1 + hp, w1] + w1l * src[:, :, h1 + hp, w1 + wp]))
    return top


def interp_backward(top_diff: np.ndarray, in_shape: tuple[int, ...], pad_beg: int = 0, pad_end: int = 0) -> np.ndarray:
    """InterpLayer::Backward_cpu: a zero bottom diff, the cropped region accumulating caffe_cpu_interp2_backward."""
    out_h, out_w = top_diff.shape[2:]
    h_eff, w_eff = in_shape[2] + pad_beg + pad_end, in_shape[3] + pad_beg + pad_end
    diff = np.zeros(in_shape, np.float64)
    region = diff[:, :, -pad_beg:-pad_beg + h_eff, -pad_beg:-pad_beg + w_eff]
    dy = top_diff.astype(np.float64)
    if (h_eff, w_eff) == (out_h, out_w):
        region += dy
        return diff
    for h2, (h1, hp, h0l, h1l) in enumerate(_taps(h_eff, out_h)):
        for w2, (w1, wp, w0l, w1l) in enumerate(_taps(w_eff, out_w)):
            g = dy[:, :, h2, w2]
            region[:, :, h1, w1] += h0l * w0l * g
            region[:, :, h1, w1 + wp] += h0l * w1l * g
            region[:, :, h1 + hp, w1] += h1l * w0l * g
            region[:, :, h1 + hp, w1 + wp] += h1l * w1l * g
    return diff
