"""PSROIPooling: R-FCN's position-sensitive ROI pooling (daijifeng001/caffe-rfcn psroi_pooling_layer).

Caffe's arithmetic: a ROI (batch, x1, y1, x2, y2) is rounded first (C's round(), half away from
zero) and then scaled in float: start = round(x1)·scale, end = (round(x2) + 1)·scale; its size
is max(end - start, 0.1); bin p of group_size covers [floor(p·bin + start), ceil((p+1)·bin +
start)) with the float bin = size / group_size, clipped to the map; output (d, ph, pw) is the
mean of input channel (d·group_size + ph)·group_size + pw over its bin, an empty bin 0.

ONNX has no such op, so it is built from plain ones.  The bin bounds use the same float
operations as the C++ (a product, then a sum, then floor/ceil: exact, as Forward_cpu computes
them; the CUDA build may fuse p·bin + start into one FMA, which can move a bound that lands
within one float ulp of an integer), and C's rounding is rebuilt exactly (ONNX Round is half to
even).  The sums are two MatMuls with 0/1 bin masks, first over the columns then over the rows
(each ROI's mask is zero outside its own image), so they match Caffe's sequential float sum up to
float rounding (about 1e-7 relative), not bit for bit; a NaN or infinite feature anywhere in an
image reaches every ROI of that image through the zero mask entries.  The construction is
differentiable: the trainer spreads each top diff / bin area over its bin, as the R-FCN GPU
backward does (the CPU Backward is NOT_IMPLEMENTED there).
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.layers.roi_pooling import check_features, rois_2d
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


def _f32(ctx: LayerContext, value: float | np.ndarray, hint: str) -> str:
    return ctx.const(np.asarray(value, dtype=np.float32), hint)


def round_half_away(ctx: LayerContext, v: str) -> str:
    """C's round() of float values, exactly: floor(|v|), plus 1 where the fraction is >= 0.5, signed back.

    (ONNX Round is half to even, and floor(v + 0.5) is wrong for 0.49999997.)
    """
    mag = ctx.node("Abs", [v])
    whole = ctx.node("Floor", [mag])
    up = ctx.node("Cast", [ctx.node("GreaterOrEqual", [ctx.node("Sub", [mag, whole]), _f32(ctx, 0.5, "half")])],
                  to=TensorProto.FLOAT)
    rounded = ctx.node("Add", [whole, up])
    return ctx.node("Where", [ctx.node("Less", [v, _f32(ctx, 0, "zero")]), ctx.node("Neg", [rounded]), rounded])


def _unsqueeze(ctx: LayerContext, x: str, axes: list[int]) -> str:
    return ctx.node("Unsqueeze", [x, ctx.const(np.array(axes, dtype=np.int64), "axes")])


def _axis_mask(ctx: LayerContext, start: str, end: str, group: int, limit: int) -> tuple[str, str]:
    """Along one axis, for [R] starts/ends: the bins' 0/1 mask [R, group, limit] and their lengths [R, group]."""
    size = ctx.node("Max", [ctx.node("Sub", [end, start]), _f32(ctx, 0.1, "min_size")])
    bin_size = _unsqueeze(ctx, ctx.node("Div", [size, _f32(ctx, group, "group")]), [1])  # [R, 1]
    start = _unsqueeze(ctx, start, [1])
    p = np.arange(group, dtype=np.float32)
    lo = ctx.node("Floor", [ctx.node("Add", [ctx.node("Mul", [_f32(ctx, p, "p"), bin_size]), start])])
    hi = ctx.node("Ceil", [ctx.node("Add", [ctx.node("Mul", [_f32(ctx, p + 1, "p1"), bin_size]), start])])
    zero, top = _f32(ctx, 0, "zero"), _f32(ctx, limit, "limit")
    lo = ctx.node("Min", [ctx.node("Max", [lo, zero]), top])
    hi = ctx.node("Min", [ctx.node("Max", [hi, zero]), top])
    pos = _f32(ctx, np.arange(limit), "positions")
    inside = ctx.node("And", [ctx.node("GreaterOrEqual", [pos, _unsqueeze(ctx, lo, [2])]),
                              ctx.node("Less", [pos, _unsqueeze(ctx, hi, [2])])])
    return ctx.node("Cast", [inside], to=TensorProto.FLOAT), ctx.node("Sub", [hi, lo])


@register_layer("PSROIPooling", bottoms=2, tops=1, fork="rfcn")
def convert_psroi_pooling(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """PSROIPooling: per ROI, bin (ph, pw) of group_size² averages its own channel (d·G + ph)·G + pw over the bin (empty bins 0)."""
    p = layer.psroi_pooling_param
    missing = [f for f in ("spatial_scale", "output_dim", "group_size") if not p.HasField(f)]
    if missing:
        raise ctx.error(f"psroi_pooling_param is missing required field(s) {missing!r}; R-FCN's caffe.proto requires "
                        "all three, e.g. psroi_pooling_param { spatial_scale: 0.0625 output_dim: 21 group_size: 7 }")
    if p.output_dim <= 0 or p.group_size <= 0:
        raise ctx.error(f"output_dim and group_size must be > 0 (got output_dim {p.output_dim!r}, group_size "
                        f"{p.group_size!r})")
    if ctx.options.opset < 13:  # Unsqueeze with an axes input, GreaterOrEqual
        raise ctx.error(f"needs ONNX opset 13 or later (got --opset {ctx.options.opset}); use --opset 13 or higher")
    _, channels, height, width = check_features(ctx)
    dim, group = int(p.output_dim), int(p.group_size)
    if channels != dim * group * group:
        raise ctx.error(f"input channel number does not match layer parameters: bottom {layer.bottom[0]!r} has "
                        f"{channels} channels, output_dim·group_size² is {dim}·{group}² = {dim * group * group}")
    rois, num = rois_2d(ctx)

    batch = ctx.node("Cast", [ctx.node("Gather", [rois, ctx.const(np.array(0, dtype=np.int64), "col0")], axis=1)],
                     to=TensorProto.INT64)  # `int roi_batch_ind = bottom_rois[0]`: truncation
    corners = round_half_away(ctx, ctx.node("Gather", [rois, ctx.const(np.array([1, 2, 3, 4], dtype=np.int64),
                                                                           "cols")], axis=1))
    scale = _f32(ctx, p.spatial_scale, "scale")
    starts = ctx.node("Mul", [corners, scale])  # round(x1)·scale, round(y1)·scale
    ends = ctx.node("Mul", [ctx.node("Add", [corners, _f32(ctx, 1, "one")]), scale])  # (round(x2) + 1)·scale

    def column(v: str, k: int) -> str:
        return ctx.node("Gather", [v, ctx.const(np.array(k, dtype=np.int64), f"c{k}")], axis=1)

    h_mask, h_len = _axis_mask(ctx, column(starts, 1), column(ends, 3), group, height)  # [R, G, H], [R, G]
    w_mask, w_len = _axis_mask(ctx, column(starts, 0), column(ends, 2), group, width)  # [R, G, W], [R, G]

    # each ROI's column mask only on its own image: [N, G(pw), W, R]
    first = ctx.const(np.array([0], dtype=np.int64), "first")
    images = ctx.node("Range", [ctx.const(np.array(0, dtype=np.int64), "start"),
                                ctx.node("Squeeze", [ctx.node("Gather", [ctx.node("Shape", [ctx.inputs[0]]), first]),
                                                     first]),
                                ctx.const(np.array(1, dtype=np.int64), "delta")])
    own = ctx.node("Cast", [ctx.node("Equal", [_unsqueeze(ctx, images, [1]), _unsqueeze(ctx, batch, [0])])],
                   to=TensorProto.FLOAT)  # [N, R]
    w_cols = ctx.node("Mul", [_unsqueeze(ctx, ctx.node("Transpose", [w_mask], perm=[1, 2, 0]), [0]),
                              _unsqueeze(ctx, own, [1, 2])])  # [N, G, W, R]
    # x [N, D·G·G, H, W] -> [N, G(pw), D·G(ph)·H, W]; sum over each column bin: [N, G(pw), D·G·H, R]
    x = ctx.node("Reshape", [ctx.inputs[0], ctx.const(np.array([-1, dim, group, group, height, width], dtype=np.int64),
                                                      "split")])
    x = ctx.node("Reshape", [ctx.node("Transpose", [x], perm=[0, 3, 1, 2, 4, 5]),
                             ctx.const(np.array([-1, group, dim * group * height, width], dtype=np.int64), "rows")])
    col_sums = ctx.reduce("ReduceSum", ctx.node("MatMul", [x, w_cols]), [0])  # [G(pw), D·G(ph)·H, R]
    # -> [R, G(ph), G(pw)·D, H], then sum over each row bin with the [R, G(ph), H, 1] mask
    col_sums = ctx.node("Reshape", [col_sums, ctx.const(np.array([group, dim, group, height, -1], dtype=np.int64),
                                                        "sums")])
    col_sums = ctx.node("Reshape", [ctx.node("Transpose", [col_sums], perm=[4, 2, 0, 1, 3]),
                                    ctx.const(np.array([-1, group, group * dim, height], dtype=np.int64), "by_row")])
    sums = ctx.node("MatMul", [col_sums, _unsqueeze(ctx, h_mask, [3])])  # [R, G(ph), G(pw)·D, 1]
    sums = ctx.node("Transpose", [ctx.node("Reshape", [sums, ctx.const(np.array([-1, group, group, dim], dtype=np.int64),
                                                                       "pooled")])], perm=[0, 3, 1, 2])  # [R, D, G, G]
    area = _unsqueeze(ctx, ctx.node("Mul", [_unsqueeze(ctx, h_len, [2]), _unsqueeze(ctx, w_len, [1])]), [1])
    empty = ctx.node("LessOrEqual", [area, _f32(ctx, 0, "zero")])  # a bin empty in either axis has area <= 0
    safe = ctx.node("Where", [empty, _f32(ctx, 1, "one"), area])
    ctx.node("Where", [empty, _f32(ctx, 0, "zero"), ctx.node("Div", [sums, safe])], [ctx.outputs[0]])
    ctx.set_output_shape(0, (num, dim, group, group))
