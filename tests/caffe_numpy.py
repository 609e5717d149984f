"""A small numpy interpreter of Caffe's TEST-phase forward pass, independent of caffeonnx's converter.

Written from BVLC Caffe's layer sources (Forward_cpu of each layer, LayerSetUp/Reshape for
the shape rules) for the layer types the foreign-ONNX converter writes, so a converted
prototxt + caffemodel can be run without Caffe and without going back through ONNX.
Arithmetic is float64, results are stored as float32 like Caffe's blobs.

The segmentation forks' layers (SegNet's Upsample and BN, PSPNet's BN, DeepLab/PSPNet's
Interp) call the numpy transcriptions of their C++ in tests/spatial_fork_reference.py.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

from caffeonnx.proto import caffe_pb2
from tests import spatial_fork_reference as fork

Blobs = dict[str, np.ndarray]
Forward = Callable[[caffe_pb2.LayerParameter, list[np.ndarray], list[np.ndarray]], list[np.ndarray]]
_LAYERS: dict[str, Forward] = {}


def layer(*types: str) -> Callable[[Forward], Forward]:
    """Register a forward function for Caffe layer `types`."""

    def decorate(fn: Forward) -> Forward:
        for t in types:
            _LAYERS[t] = fn
        return fn
    return decorate


def forward(net: caffe_pb2.NetParameter, weights: dict[str, list[np.ndarray]], feeds: Blobs,
            layer_tops: dict[str, list[np.ndarray]] | None = None) -> Blobs:
    """Run every layer in order; returns every blob by name (the last write of an in-place blob).

    `layer_tops`, when given, receives each layer's own tops by layer name: an in-place
    layer's write is otherwise lost to the next layer that writes the same blob.
    """
    blobs: Blobs = {name: np.asarray(feeds[name], dtype=np.float32) for name in net.input}  # legacy `input:` fields
    for lay in net.layer:
        if lay.type == "Input":
            for top in lay.top:
                blobs[top] = np.asarray(feeds[top], dtype=np.float32)
            continue
        if lay.type not in _LAYERS:
            raise NotImplementedError(f"caffe_numpy has no forward for layer type {lay.type!r} ({lay.name!r})")
        bottoms = []
        for b in lay.bottom:
            assert b in blobs, f"layer {lay.name!r}: bottom {b!r} is produced by no earlier layer"
            bottoms.append(blobs[b].astype(np.float64))
        params = [np.asarray(p, dtype=np.float64) for p in weights.get(lay.name, [])]
        tops = _LAYERS[lay.type](lay, bottoms, params)
        assert len(tops) == len(lay.top), f"layer {lay.name!r}: {len(tops)} results for {len(lay.top)} tops"
        tops = [np.asarray(value, dtype=np.float32) for value in tops]
        blobs.update(zip(lay.top, tops))
        if layer_tops is not None:
            layer_tops[lay.name] = tops
    return blobs


def _axis(axis: int, ndim: int) -> int:
    assert -ndim <= axis < ndim, f"axis {axis} out of range for {ndim} axes"
    return axis % ndim


# --- fully connected and convolution ---------------------------------------------------
@layer("InnerProduct")
def _inner_product(lay, bottoms, params):
    p = lay.inner_product_param
    x = bottoms[0]
    axis = _axis(p.axis, x.ndim)
    flat = x.reshape(math.prod(x.shape[:axis]), -1)
    w = params[0] if p.transpose else params[0].T  # K x N
    y = flat @ w
    if p.bias_term:
        y = y + params[1].reshape(1, -1)
    return [y.reshape(*x.shape[:axis], p.num_output)]


def _spatial(values: Sequence[int], h: int, w: int, has_hw: bool, n: int, default: int) -> list[int]:
    """Caffe's repeated kernel/stride/pad/dilation (one value for all axes, or one per axis; or *_h/*_w)."""
    if has_hw:
        return [h, w]
    if not values:
        return [default] * n
    return list(values) * n if len(values) == 1 else list(values)


def _conv_geometry(p: caffe_pb2.ConvolutionParameter, n: int):
    kernel = _spatial(p.kernel_size, p.kernel_h, p.kernel_w, p.HasField("kernel_h"), n, 0)
    stride = _spatial(p.stride, p.stride_h, p.stride_w, p.HasField("stride_h"), n, 1)
    pad = _spatial(p.pad, p.pad_h, p.pad_w, p.HasField("pad_h"), n, 0)
    dilation = _spatial(p.dilation, 0, 0, False, n, 1)
    return kernel, stride, pad, dilation


@layer("Convolution")
def _convolution(lay, bottoms, params):
    """Direct convolution: for every kernel offset, a strided view of the zero-padded input times the weights."""
    p = lay.convolution_param
    x, w = bottoms[0], params[0]
    n = x.ndim - 2
    kernel, stride, pad, dilation = _conv_geometry(p, n)
    group = p.group
    padded = np.pad(x, [(0, 0), (0, 0)] + [(q, q) for q in pad])
    out = [(x.shape[2 + a] + 2 * pad[a] - (dilation[a] * (kernel[a] - 1) + 1)) // stride[a] + 1 for a in range(n)]
    cin, cout = x.shape[1] // group, w.shape[0] // group
    y = np.zeros((x.shape[0], w.shape[0], *out))
    for offset in itertools.product(*(range(k) for k in kernel)):
        window = tuple(slice(o * d, o * d + (size - 1) * s + 1, s)
                       for o, d, s, size in zip(offset, dilation, stride, out))
        patch = padded[(slice(None), slice(None), *window)]
        for g in range(group):
            wg = w[(slice(g * cout, (g + 1) * cout), slice(None), *offset)]  # (cout, cin)
            y[:, g * cout:(g + 1) * cout] += np.einsum("oc,nc...->no...", wg, patch[:, g * cin:(g + 1) * cin])
    if p.bias_term:
        y += params[1].reshape(1, -1, *([1] * n))
    return [y]


@layer("Deconvolution")
def _deconvolution(lay, bottoms, params):
    """Transposed convolution: every input position scatters weights·x into the full output, then `pad` is cropped."""
    p = lay.convolution_param
    x, w = bottoms[0], params[0]
    n = x.ndim - 2
    kernel, stride, pad, dilation = _conv_geometry(p, n)
    group = p.group
    cin, cout = x.shape[1] // group, w.shape[1]
    full = [stride[a] * (x.shape[2 + a] - 1) + dilation[a] * (kernel[a] - 1) + 1 for a in range(n)]
    y = np.zeros((x.shape[0], cout * group, *full))
    for offset in itertools.product(*(range(k) for k in kernel)):
        window = tuple(slice(o * d, o * d + (size - 1) * s + 1, s)
                       for o, d, s, size in zip(offset, dilation, stride, x.shape[2:]))
        for g in range(group):
            wg = w[(slice(g * cin, (g + 1) * cin), slice(None), *offset)]  # (cin, cout)
            y[(slice(None), slice(g * cout, (g + 1) * cout), *window)] += np.einsum(
                "co,nc...->no...", wg, x[:, g * cin:(g + 1) * cin])
    y = y[(slice(None), slice(None), *(slice(q, f - q) for q, f in zip(pad, full)))]
    if p.bias_term:
        y = y + params[1].reshape(1, -1, *([1] * n))
    return [y]


@layer("Pooling")
def _pooling(lay, bottoms, params):
    """PoolingLayer::Forward_cpu MAX/AVE, with Reshape's output size (ceil or round_mode FLOOR, pad clip)."""
    p = lay.pooling_param
    x = bottoms[0]
    num, ch, height, width = x.shape
    if p.global_pooling:
        kh, kw = height, width
    else:
        kh, kw = (p.kernel_h, p.kernel_w) if p.HasField("kernel_h") else (p.kernel_size, p.kernel_size)
    sh, sw = (p.stride_h, p.stride_w) if p.HasField("stride_h") else (p.stride, p.stride)
    ph, pw = (p.pad_h, p.pad_w) if p.HasField("pad_h") else (p.pad, p.pad)
    rnd = math.floor if p.round_mode == caffe_pb2.PoolingParameter.FLOOR else math.ceil
    oh = int(rnd(np.float32(height + 2 * ph - kh) / np.float32(sh))) + 1
    ow = int(rnd(np.float32(width + 2 * pw - kw) / np.float32(sw))) + 1
    if ph or pw:
        oh -= (oh - 1) * sh >= height + ph
        ow -= (ow - 1) * sw >= width + pw
    y = np.zeros((num, ch, oh, ow))
    mask = np.full((num, ch, oh, ow), -1.0)
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * sh - ph, j * sw - pw
            if p.pool == caffe_pb2.PoolingParameter.MAX:
                he, we = min(hs + kh, height), min(ws + kw, width)
                hs, ws = max(hs, 0), max(ws, 0)
                window = x[:, :, hs:he, ws:we].reshape(num, ch, -1)
                # Caffe scans h then w and replaces on a strictly greater value: the first maximum wins
                first = window.argmax(axis=2)
                y[:, :, i, j] = np.take_along_axis(window, first[..., None], axis=2)[..., 0]
                mask[:, :, i, j] = (hs + first // (we - ws)) * width + ws + first % (we - ws)
            else:
                he, we = min(hs + kh, height + ph), min(ws + kw, width + pw)
                size = (he - hs) * (we - ws)
                hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, height), min(we, width)
                y[:, :, i, j] = x[:, :, hs:he, ws:we].sum(axis=(2, 3)) / size
    if len(lay.top) > 1:  # the MAX mask top: the argmax's offset h·W + w in its (n, c) plane, as float
        assert p.pool == caffe_pb2.PoolingParameter.MAX, f"layer {lay.name!r}: a mask top needs MAX pooling"
        return [y, mask]
    return [y]


# --- normalisation and affine ------------------------------------------------------------
@layer("BatchNorm")
def _batch_norm(lay, bottoms, params):
    p = lay.batch_norm_param
    # Caffe's BatchNorm uses the stored statistics in TEST unless use_global_stats says otherwise
    assert not p.HasField("use_global_stats") or p.use_global_stats, \
        "caffe_numpy runs BatchNorm with global statistics only"
    x = bottoms[0]
    s = params[2][0]
    factor = 0.0 if s == 0 else 1.0 / s
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    mean, var = (params[0] * factor).reshape(shape), (params[1] * factor).reshape(shape)
    return [(x - mean) / np.sqrt(var + p.eps)]


def _broadcast(x: np.ndarray, v: np.ndarray, axis: int) -> np.ndarray:
    """v laid along x's axes [axis, axis + v.ndim), as Caffe's Scale/Bias do."""
    assert x.shape[axis:axis + v.ndim] == v.shape, f"operand {v.shape} does not match {x.shape} from axis {axis}"
    return v.reshape((1,) * axis + v.shape + (1,) * (x.ndim - axis - v.ndim))


@layer("Scale")
def _scale(lay, bottoms, params):
    p = lay.scale_param
    x = bottoms[0]
    axis = _axis(p.axis, x.ndim) if x.ndim else 0
    operand = bottoms[1] if len(bottoms) > 1 else params[0]
    y = x * _broadcast(x, operand, axis)
    if p.bias_term:
        y = y + _broadcast(x, params[-1], axis)
    return [y]


@layer("Bias")
def _bias(lay, bottoms, params):
    x = bottoms[0]
    operand = bottoms[1] if len(bottoms) > 1 else params[0]
    return [x + _broadcast(x, operand, _axis(lay.bias_param.axis, x.ndim))]


@layer("LRN")
def _lrn(lay, bottoms, params):
    p = lay.lrn_param
    assert p.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS
    x = bottoms[0]
    half = (p.local_size - 1) // 2
    sq = np.pad(x * x, [(0, 0), (half, half), (0, 0), (0, 0)])
    window = sum(sq[:, c:c + x.shape[1]] for c in range(p.local_size))
    return [x / (p.k + p.alpha / p.local_size * window) ** p.beta]


# --- neurons -----------------------------------------------------------------------------
@layer("ReLU")
def _relu(lay, bottoms, params):
    x = bottoms[0]
    return [np.maximum(x, 0) + lay.relu_param.negative_slope * np.minimum(x, 0)]


@layer("PReLU")
def _prelu(lay, bottoms, params):
    x, a = bottoms[0], params[0]
    slope = a.reshape(()) if lay.prelu_param.channel_shared else a.reshape((1, -1) + (1,) * (x.ndim - 2))
    return [np.maximum(x, 0) + slope * np.minimum(x, 0)]


@layer("Sigmoid", "TanH", "AbsVal", "BNLL", "ELU")
def _neuron(lay, bottoms, params):
    x = bottoms[0]
    if lay.type == "Sigmoid":
        return [1.0 / (1.0 + np.exp(-x))]
    if lay.type == "TanH":
        return [np.tanh(x)]
    if lay.type == "AbsVal":
        return [np.abs(x)]
    if lay.type == "BNLL":
        return [np.where(x > 0, x + np.log1p(np.exp(-np.abs(x))), np.log1p(np.exp(np.minimum(x, 0))))]
    return [np.where(x > 0, x, lay.elu_param.alpha * (np.exp(np.minimum(x, 0)) - 1))]


@layer("Exp", "Log")
def _exp_log(lay, bottoms, params):
    p = lay.exp_param if lay.type == "Exp" else lay.log_param
    base = math.e if p.base == -1 else p.base
    z = p.shift + p.scale * bottoms[0]
    return [base ** z] if lay.type == "Exp" else [np.log(z) / math.log(base)]


@layer("Power")
def _power(lay, bottoms, params):
    p = lay.power_param
    with np.errstate(divide="ignore", invalid="ignore"):
        return [(p.shift + p.scale * bottoms[0]) ** p.power]


@layer("Clip")
def _clip(lay, bottoms, params):
    return [np.clip(bottoms[0], lay.clip_param.min, lay.clip_param.max)]


@layer("Softmax")
def _softmax(lay, bottoms, params):
    x = bottoms[0]
    axis = _axis(lay.softmax_param.axis, x.ndim)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return [e / e.sum(axis=axis, keepdims=True)]


@layer("Eltwise")
def _eltwise(lay, bottoms, params):
    p = lay.eltwise_param
    if p.operation == caffe_pb2.EltwiseParameter.PROD:
        return [math.prod(bottoms[1:], start=bottoms[0])]
    if p.operation == caffe_pb2.EltwiseParameter.MAX:
        return [np.maximum.reduce(bottoms)]
    coeff = list(p.coeff) or [1.0] * len(bottoms)
    return [sum(c * b for c, b in zip(coeff, bottoms))]


@layer("Reduction")
def _reduction(lay, bottoms, params):
    """ReductionLayer: reduce every axis from `axis` on (they are dropped), times coeff."""
    p = lay.reduction_param
    x = bottoms[0]
    axis = _axis(p.axis, x.ndim)
    flat = x.reshape(*x.shape[:axis], -1)
    R = caffe_pb2.ReductionParameter
    values = {R.SUM: flat, R.MEAN: flat, R.ASUM: np.abs(flat), R.SUMSQ: flat * flat}[p.operation]
    reduced = values.mean(axis=-1) if p.operation == R.MEAN else values.sum(axis=-1)
    return [reduced * p.coeff]


# --- data movement -----------------------------------------------------------------------
@layer("Concat")
def _concat(lay, bottoms, params):
    return [np.concatenate(bottoms, axis=_axis(lay.concat_param.axis, bottoms[0].ndim))]


@layer("Slice")
def _slice(lay, bottoms, params):
    p = lay.slice_param
    x = bottoms[0]
    axis = _axis(p.axis, x.ndim)
    points = list(p.slice_point) or [x.shape[axis] // len(lay.top) * i for i in range(1, len(lay.top))]
    return np.split(x, points, axis=axis)


@layer("Split")
def _split(lay, bottoms, params):
    return [bottoms[0].copy() for _ in lay.top]


@layer("Dropout")
def _dropout(lay, bottoms, params):
    """DropoutLayer in TEST: a copy of the bottom."""
    return [bottoms[0].copy()]


@layer("Silence")
def _silence(lay, bottoms, params):
    return []


@layer("Flatten")
def _flatten(lay, bottoms, params):
    x = bottoms[0]
    start = _axis(lay.flatten_param.axis, x.ndim)
    end = _axis(lay.flatten_param.end_axis, x.ndim)
    return [x.reshape(*x.shape[:start], -1, *x.shape[end + 1:])]


@layer("Reshape")
def _reshape(lay, bottoms, params):
    """ReshapeLayer: dims replace axes [axis, axis + num_axes); 0 copies the input dim, -1 is inferred."""
    p = lay.reshape_param
    x = bottoms[0]
    start = _axis(p.axis, x.ndim + 1) if p.axis >= 0 else p.axis + x.ndim + 1
    end = x.ndim if p.num_axes == -1 else start + p.num_axes
    dims = [x.shape[start + i] if d == 0 else d for i, d in enumerate(p.shape.dim)]
    return [x.reshape(*x.shape[:start], *dims, *x.shape[end:])]


@layer("Permute")
def _permute(lay, bottoms, params):
    x = bottoms[0]
    order = list(lay.permute_param.order)
    order += [a for a in range(x.ndim) if a not in order]
    return [x.transpose(order)]


# --- MobileNet and sub-pixel forks (inisis/caffe, micronet-caffe, gait_extractor) ---------------------
@layer("ReLU6")
def _relu6(lay, bottoms, params):
    """inisis/caffe ReLU6Layer: min(max(x, 0) + negative_slope·min(x, 0), threshold)."""
    x, p = bottoms[0], lay.relu6_param
    return [np.minimum(np.maximum(x, 0) + p.negative_slope * np.minimum(x, 0), p.threshold)]


@layer("HardSwish")
def _hard_swish(lay, bottoms, params):
    """micronet-caffe HardSwishLayer: x·min(max(x + 3, 0), 6)/6."""
    x = bottoms[0]
    return [x * np.minimum(np.maximum(x + 3, 0), 6) / 6]


@layer("HardSigmoid")
def _hard_sigmoid(lay, bottoms, params):
    """inisis/synopsys-caffe HardSigmoidLayer: max(0, min(1, alpha·x + beta)), either spelling of the param."""
    assert not (lay.HasField("hardsigmoid_param") and lay.HasField("hard_sigmoid_param")), lay.name
    p = lay.hard_sigmoid_param if lay.HasField("hard_sigmoid_param") else lay.hardsigmoid_param
    return [np.maximum(0, np.minimum(1, p.alpha * bottoms[0] + p.beta))]


@layer("PixelShuffle")
def _pixel_shuffle(lay, bottoms, params):
    """inisis/caffe PixelShuffleLayer: top (n, c, h·r + i, w·r + j) = bottom (n, c·r² + i·r + j, h, w)."""
    use = lay.pixel_shuffle_param if lay.HasField("pixel_shuffle_param") else lay.pixelshuffle_param
    r = use.upscale_factor
    assert r > 0, f"layer {lay.name!r}: upscale_factor must be given"
    n, ch, h, w = bottoms[0].shape
    out = np.empty((n, ch // (r * r), h * r, w * r))
    for c in range(ch // (r * r)):
        for i in range(r):
            for j in range(r):
                out[:, c, i::r, j::r] = bottoms[0][:, c * r * r + i * r + j]
    return [out]


# --- segmentation forks (SegNet, DeepLab/PSPNet) ---------------------------------------------
_SEGNET_BN = ("bn_mode", "scale_filler", "shift_filler")
_PSPNET_BN = ("slope_filler", "bias_filler", "momentum", "eps", "frozen", "engine")


@layer("BN")
def _bn(lay, bottoms, params):
    """SegNet's BN (scale, shift; INFERENCE or LEARN) or PSPNet's (slope, bias, mean, variance; TEST uses the stored ones).

    Told apart by the bn_param fields set (none: SegNet's, whose bn_mode defaults to LEARN),
    and checked against the number of blobs each fork's layer owns.
    """
    p = lay.bn_param
    x = bottoms[0]
    legacy = (*x.shape, 1, 1, 1)[:4]  # BN reads num/channels/height/width
    x4 = x.reshape(legacy)
    if any(p.HasField(f) for f in _PSPNET_BN):
        assert not any(p.HasField(f) for f in _SEGNET_BN), f"layer {lay.name!r} mixes SegNet and PSPNet BN fields"
        assert len(params) == 4, f"PSPNet BN {lay.name!r} owns 4 blobs, the caffemodel has {len(params)}"
        slope, bias, mean, var = params
        top = fork.pspnet_bn_forward(x4, slope, bias, mean, var, p.eps, stored=True)["top"]
        return [top.reshape(x.shape)]
    assert len(params) == 2, f"SegNet BN {lay.name!r} owns 2 blobs, the caffemodel has {len(params)}"
    learn = p.bn_mode == caffe_pb2.BNParameter.LEARN
    out = fork.segnet_bn_forward(x4, params[0], params[1], learn)
    extra = [out["mean"], out["var"]] if learn else []
    return [out["top"], *extra[:len(lay.top) - 1]]


@layer("Upsample")
def _upsample(lay, bottoms, params):
    """SegNet's UpsampleLayer: each bottom value written at its max-pooling mask offset in a zero top."""
    p = lay.upsample_param
    x, mask = bottoms
    scale = (p.scale_h, p.scale_w) if p.HasField("scale_h") else (p.scale, p.scale)
    given = (p.upsample_h, p.upsample_w) if p.HasField("upsample_h") and p.HasField("upsample_w") else None
    out_h, out_w = fork.upsample_size(x.shape[2], x.shape[3], scale, (p.pad_out_h, p.pad_out_w), given)
    return [fork.upsample_forward(x.astype(np.float32), mask, out_h, out_w)]


@layer("Interp")
def _interp(lay, bottoms, params):
    """DeepLab/PSPNet's InterpLayer: bilinear resize with aligned corners, sized by exactly one spec."""
    p = lay.interp_param
    x = bottoms[0]
    specs = {"zoom": p.HasField("zoom_factor"), "shrink": p.HasField("shrink_factor"),
             "size": p.HasField("height") and p.HasField("width"), "bottom": len(bottoms) == 2}
    assert sum(specs.values()) == 1, f"layer {lay.name!r}: give exactly one output size spec ({specs})"
    size = None
    if specs["size"]:
        size = (p.height, p.width)
    elif specs["bottom"]:
        size = tuple((*bottoms[1].shape, 1, 1)[2:4])  # the second bottom's legacy height and width
    out_h, out_w = fork.interp_size(x.shape[2], x.shape[3], zoom=p.zoom_factor if specs["zoom"] else None,
                                    shrink=p.shrink_factor if specs["shrink"] else None, size=size,
                                    pad_beg=p.pad_beg, pad_end=p.pad_end)
    return [fork.interp_forward(x, out_h, out_w, p.pad_beg, p.pad_end)]
