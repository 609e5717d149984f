"""Convolution, pooling, normalisation and softmax ops (Caffe's vision layers land here)."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from caffeonnx.trainer.ops import Kernel, NodeSpec, register_op

Tensor = torch.Tensor

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _torch_pads(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """ONNX per-axis (begin, end) pads as F.pad's list (last axis first)."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


def _resolve_pads(node: NodeSpec, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                  dilations: Sequence[int]) -> tuple[list[int], list[int]]:
    """(begin, end) pads of a conv/pool from `pads` or `auto_pad` (SAME_UPPER/SAME_LOWER/VALID)."""
    nd = len(kernel)
    auto = node.attr("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        p = node.attr("pads") or [0] * (2 * nd)
        return list(p[:nd]), list(p[nd:])
    if auto == "VALID":
        return [0] * nd, [0] * nd
    begin, end = [], []
    for i in range(nd):
        out = math.ceil(spatial[i] / strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - spatial[i])
        small = total // 2
        begin.append(small if auto == "SAME_UPPER" else total - small)
        end.append(total - small if auto == "SAME_UPPER" else small)
    return begin, end


def _conv_geometry(node: NodeSpec, w: Tensor) -> tuple[int, list[int], list[int], list[int]]:
    """Spatial rank, kernel, strides and dilations of a Conv/ConvTranspose (ONNX defaults from the weight)."""
    nd = w.dim() - 2
    kernel = list(node.attr("kernel_shape") or w.shape[2:])
    return nd, kernel, list(node.attr("strides") or [1] * nd), list(node.attr("dilations") or [1] * nd)


@register_op("Conv")
def conv(node: NodeSpec) -> Kernel:
    """Conv: N-D grouped, strided, dilated convolution with ONNX begin/end pads (Caffe Convolution)."""
    group = int(node.attr("group", 1))

    def run(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        nd, kernel, strides, dilations = _conv_geometry(node, w)
        begin, end = _resolve_pads(node, x.shape[2:], kernel, strides, dilations)
        if begin != end:
            x = F.pad(x, _torch_pads(begin, end))
            begin = [0] * nd
        return _CONV[nd](x, w, b, strides, begin, dilations, group)

    return run


@register_op("ConvTranspose")
def conv_transpose(node: NodeSpec) -> Kernel:
    """ConvTranspose: the gradient of Conv as a layer (Caffe Deconvolution), with output_shape/pads."""
    group = int(node.attr("group", 1))

    def run(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        nd, kernel, strides, dilations = _conv_geometry(node, w)
        out_pad = list(node.attr("output_padding") or [0] * nd)
        out_shape = node.attr("output_shape")
        auto = node.attr("auto_pad", "NOTSET")
        if out_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
            spatial = x.shape[2:]
            target = list(out_shape)[-nd:] if out_shape is not None else [spatial[i] * strides[i] for i in range(nd)]
            begin, end = [], []
            for i in range(nd):
                total = strides[i] * (spatial[i] - 1) + out_pad[i] + (kernel[i] - 1) * dilations[i] + 1 - target[i]
                if auto == "SAME_UPPER":
                    begin.append(total // 2)
                    end.append(total - total // 2)
                else:
                    begin.append(total - total // 2)
                    end.append(total // 2)
        elif auto == "VALID":
            begin, end = [0] * nd, [0] * nd
        else:
            p = node.attr("pads") or [0] * (2 * nd)
            begin, end = list(p[:nd]), list(p[nd:])
        if begin == end and min(begin) >= 0:
            return _CONV_T[nd](x, w, b, strides, begin, out_pad, group, dilations)
        y = _CONV_T[nd](x, w, b, strides, 0, out_pad, group, dilations)
        index = [slice(None), slice(None)] + [slice(bi, y.shape[2 + i] - ei) for i, (bi, ei) in enumerate(zip(begin, end))]
        return y[tuple(index)]

    return run


def _pool_geometry(node: NodeSpec, x: Tensor) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    kernel = list(node.attr("kernel_shape"))
    nd = len(kernel)
    strides = list(node.attr("strides") or [1] * nd)
    dilations = list(node.attr("dilations") or [1] * nd)
    begin, end = _resolve_pads(node, x.shape[2:], kernel, strides, dilations)
    return kernel, strides, dilations, begin, end


def _torch_pad_ok(begin: list[int], end: list[int], kernel: list[int], dilations: list[int]) -> bool:
    """Whether torch's pooling can take these pads itself (symmetric, at most half the window)."""
    return begin == end and all(p <= ((k - 1) * d + 1) // 2 for p, k, d in zip(begin, kernel, dilations))


@register_op("MaxPool")
def max_pool(node: NodeSpec) -> Kernel:
    """MaxPool: window maxima (ceil_mode as Caffe's MAX pooling); Indices flat over N·C·spatial."""
    ceil = bool(node.attr("ceil_mode", 0))
    want_indices = len(node.outputs) > 1 and node.outputs[1] != ""

    def run(x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        kernel, strides, dilations, begin, end = _pool_geometry(node, x)
        nd = len(kernel)
        size, before = list(x.shape[2:]), list(begin)
        if not _torch_pad_ok(begin, end, kernel, dilations):
            x = F.pad(x, _torch_pads(begin, end), value=float("-inf"))
            begin = [0] * nd
        if not want_indices:
            return _MAX_POOL[nd](x, kernel, strides, begin, dilations, ceil_mode=ceil)
        y, idx = _MAX_POOL[nd](x, kernel, strides, begin, dilations, ceil_mode=ceil, return_indices=True)
        if list(x.shape[2:]) != size:  # indices of the padded input: back to the input's own positions
            rest, flat = idx, torch.zeros_like(idx)
            for d in reversed(range(nd)):
                flat = flat + (rest % x.shape[2 + d] - before[d]) * math.prod(size[d + 1:])
                rest = rest // x.shape[2 + d]
            idx = flat
        plane = math.prod(size)
        base = torch.arange(x.shape[0] * x.shape[1], device=x.device).reshape(x.shape[0], x.shape[1], *[1] * nd)
        return y, idx + base * plane

    return run


@register_op("AveragePool")
def average_pool(node: NodeSpec) -> Kernel:
    """AveragePool: window means, padding counted or not (count_include_pad), ceil_mode supported."""
    ceil = bool(node.attr("ceil_mode", 0))
    include_pad = bool(node.attr("count_include_pad", 0))

    def run(x: Tensor) -> Tensor:
        kernel, strides, dilations, begin, end = _pool_geometry(node, x)
        nd = len(kernel)
        if any(d != 1 for d in dilations):
            raise NotImplementedError(f"AveragePool node {node.name!r}: dilations {dilations} are not supported")
        pool = _AVG_POOL[nd]
        if _torch_pad_ok(begin, end, kernel, dilations):
            return pool(x, kernel, strides, begin, ceil_mode=ceil, count_include_pad=include_pad)
        xp = F.pad(x, _torch_pads(begin, end))
        if include_pad:
            return pool(xp, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
        ones = F.pad(torch.ones_like(x[:1, :1]), _torch_pads(begin, end))
        return pool(xp, kernel, strides, 0, ceil_mode=ceil) / pool(ones, kernel, strides, 0, ceil_mode=ceil)

    return run


@register_op("GlobalAveragePool", "GlobalMaxPool")
def global_pool(node: NodeSpec) -> Kernel:
    """GlobalAveragePool / GlobalMaxPool: one value per (sample, channel), spatial dims kept as 1."""
    mean = node.op_type == "GlobalAveragePool"

    def run(x: Tensor) -> Tensor:
        dims = list(range(2, x.dim()))
        return x.mean(dim=dims, keepdim=True) if mean else x.amax(dim=dims, keepdim=True)

    return run


@register_op("LRN")
def lrn(node: NodeSpec) -> Kernel:
    """LRN: x / (bias + alpha/size · Σ x² over a channel window)^beta (Caffe ACROSS_CHANNELS)."""
    size = int(node.attr("size"))
    alpha, beta, bias = float(node.attr("alpha", 1e-4)), float(node.attr("beta", 0.75)), float(node.attr("bias", 1.0))
    lo = (size - 1) // 2
    hi = size - 1 - lo

    def run(x: Tensor) -> Tensor:
        sq = x * x
        channels = x.shape[1]
        padded = F.pad(sq.transpose(1, -1), (lo, hi)).transpose(1, -1)
        window = padded.narrow(1, 0, channels)
        for j in range(1, size):
            window = window + padded.narrow(1, j, channels)
        return x / (bias + (alpha / size) * window) ** beta

    return run


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (x.dim() - 2)


@register_op("BatchNormalization")
def batch_normalization(node: NodeSpec) -> Kernel:
    """BatchNormalization (inference): (x − mean)/√(var + ε)·scale + B per channel."""
    eps = float(node.attr("epsilon", 1e-5))
    if node.attr("training_mode", 0):
        raise NotImplementedError(f"BatchNormalization node {node.name!r}: training_mode=1 is not supported")

    def run(x: Tensor, scale: Tensor, b: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        s = _channel_shape(x)
        inv = torch.rsqrt(var.reshape(s) + eps)
        return (x - mean.reshape(s)) * inv * scale.reshape(s) + b.reshape(s)

    return run


@register_op("InstanceNormalization")
def instance_normalization(node: NodeSpec) -> Kernel:
    """InstanceNormalization: per (sample, channel) standardisation, then scale and B."""
    eps = float(node.attr("epsilon", 1e-5))
    return lambda x, scale, b: F.instance_norm(x, weight=scale, bias=b, eps=eps)


@register_op("MeanVarianceNormalization")
def mean_variance_normalization(node: NodeSpec) -> Kernel:
    """MeanVarianceNormalization: (x − E[x]) / (√(E[x²] − E[x]²) + 1e-9) over `axes`."""
    axes = list(node.attr("axes") or [0, 2, 3])

    def run(x: Tensor) -> Tensor:
        mean = x.mean(dim=axes, keepdim=True)
        var = (x * x).mean(dim=axes, keepdim=True) - mean * mean
        return (x - mean) / (torch.sqrt(var) + 1e-9)

    return run


@register_op("LayerNormalization")
def layer_normalization(node: NodeSpec) -> Kernel:
    """LayerNormalization: standardise over the axes from `axis` on, then scale and B."""
    axis, eps = int(node.attr("axis", -1)), float(node.attr("epsilon", 1e-5))

    def run(x: Tensor, scale: Tensor, b: Tensor | None = None) -> Tensor:
        a = axis + x.dim() if axis < 0 else axis
        dims = list(range(a, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        y = (x - mean) / torch.sqrt(var + eps) * scale
        return y if b is None else y + b

    return run


@register_op("LpNormalization")
def lp_normalization(node: NodeSpec) -> Kernel:
    """LpNormalization: x divided by its L1 or L2 norm along `axis`."""
    axis, p = int(node.attr("axis", -1)), int(node.attr("p", 2))
    return lambda x: x / torch.linalg.vector_norm(x, ord=p, dim=axis, keepdim=True)


def _softmax_like(node: NodeSpec, fn: Callable[..., Tensor]) -> Kernel:
    if node.opset >= 13:
        axis = int(node.attr("axis", -1))
        return lambda x: fn(x, dim=axis)
    axis = int(node.attr("axis", 1))

    def run(x: Tensor) -> Tensor:
        a = axis + x.dim() if axis < 0 else axis
        flat = x.reshape(math.prod(x.shape[:a]), -1)
        return fn(flat, dim=1).reshape(x.shape)

    return run


@register_op("Softmax")
def softmax(node: NodeSpec) -> Kernel:
    """Softmax along `axis` (Caffe Softmax; before opset 13 over the flattened trailing axes)."""
    return _softmax_like(node, torch.softmax)


@register_op("LogSoftmax")
def log_softmax(node: NodeSpec) -> Kernel:
    """LogSoftmax along `axis`."""
    return _softmax_like(node, torch.log_softmax)


@register_op("Hardmax")
def hardmax(node: NodeSpec) -> Kernel:
    """Hardmax: one-hot of the first maximum along `axis`."""
    axis = int(node.attr("axis", -1))

    def run(x: Tensor) -> Tensor:
        idx = torch.argmax(x, dim=axis, keepdim=True)
        return torch.zeros_like(x).scatter_(axis, idx, 1.0)

    return run
