"""Interp: DeepLab v2 / PSPNet bilinear resize (interp_layer.cpp with caffe_cpu_interp2).

The input is first cropped to its effective size H + pad_beg + pad_end (both pads ≤ 0, as
the layer requires; the crop starts at -pad_beg on both axes), then resampled with
aligned corners: output row h reads input row h·(H_eff − 1)/(H_out − 1) (0 when H_out is 1),
interpolated linearly between the two rows around it, and likewise for columns.  That is
ONNX Resize in linear mode with coordinate_transformation_mode align_corners; equal sizes
copy.  The output size is, by the one spec given: zoom_factor z (H_eff + (H_eff − 1)(z − 1)),
shrink_factor s ((H_eff − 1)/s + 1), height and width, or the second bottom's height and
width.  The backward is the interpolation's adjoint, which the trainer's Resize kernel
gives through autograd; the second bottom gets no gradient, as in Caffe.
"""
from __future__ import annotations

import numpy as np

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


def interp_size(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> tuple[int, int, int, int]:
    """(H_eff, W_eff, H_out, W_out) as InterpLayer's LayerSetUp and Reshape compute them, with their checks."""
    p = layer.interp_param
    height, width = ctx.input_shapes[0][2:]
    given = {"zoom_factor": p.HasField("zoom_factor"), "shrink_factor": p.HasField("shrink_factor"),
             "height and width": p.HasField("height") and p.HasField("width"),
             "a second bottom": len(layer.bottom) == 2}
    if sum(given.values()) != 1:
        named = [k for k, v in given.items() if v] or ["none"]
        raise ctx.error("Output dimension specified either by zoom factor or shrink factor or the 2nd bottom or "
                        f"explicitly: give exactly one (got {', '.join(named)})")
    if p.pad_beg > 0 or p.pad_end > 0:
        raise ctx.error(f"Only supports non-pos padding (cropping) for now: pad_beg {p.pad_beg}, pad_end {p.pad_end}")
    h_eff, w_eff = height + p.pad_beg + p.pad_end, width + p.pad_beg + p.pad_end
    if p.HasField("zoom_factor"):
        if p.zoom_factor < 1:
            raise ctx.error(f"Zoom factor must be positive (zoom_factor {p.zoom_factor})")
        out_h, out_w = h_eff + (h_eff - 1) * (p.zoom_factor - 1), w_eff + (w_eff - 1) * (p.zoom_factor - 1)
    elif p.HasField("shrink_factor"):
        if p.shrink_factor < 1:
            raise ctx.error(f"Shrink factor must be positive (shrink_factor {p.shrink_factor})")
        # C++ divides ints toward zero; h_eff − 1 is negative only when the check below fails anyway
        out_h, out_w = int((h_eff - 1) / p.shrink_factor) + 1, int((w_eff - 1) / p.shrink_factor) + 1
    elif p.HasField("height") and p.HasField("width"):
        out_h, out_w = p.height, p.width
    else:
        legacy = (*ctx.input_shapes[1], 1, 1, 1, 1)  # Blob::height()/width() read 1 past the last axis
        out_h, out_w = legacy[2], legacy[3]
    if h_eff <= 0 or w_eff <= 0:
        raise ctx.error(f"height should be positive: the {height}x{width} input cropped by pad_beg {p.pad_beg} and "
                        f"pad_end {p.pad_end} is {h_eff}x{w_eff}")
    if out_h <= 0 or out_w <= 0:
        raise ctx.error(f"height should be positive: the output would be {out_h}x{out_w}")
    return h_eff, w_eff, out_h, out_w


@register_layer("Interp", bottoms=(1, 2), tops=1, fork="deeplab")
def convert_interp(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Interp: bilinear resize with aligned corners ((H_in − 1)/(H_out − 1)) of the input cropped by pad_beg/pad_end."""
    p = layer.interp_param
    shape = ctx.input_shapes[0]
    if len(shape) != 4:
        raise ctx.error(f"input shape {list(shape)!r} has {len(shape)} axes; Interp needs (N, C, H, W)")
    if ctx.options.opset < 11:
        raise ctx.error(f"needs ONNX opset 11 or later for Resize with aligned corners (got --opset "
                        f"{ctx.options.opset}); use --opset 11 or higher")
    num, channels, height, width = shape
    h_eff, w_eff, out_h, out_w = interp_size(layer, ctx)
    ctx.check_count((num, channels, out_h, out_w), f"top {layer.top[0]!r}")
    x, out = ctx.inputs[0], ctx.outputs[0]
    copy = (h_eff, w_eff) == (out_h, out_w)
    if (h_eff, w_eff) != (height, width):
        begin = -p.pad_beg  # caffe_cpu_interp2 reads from (-pad_beg, -pad_beg) on both axes
        x = ctx.node("Slice", [x, ctx.const(np.array([begin, begin], np.int64), "starts"),
                               ctx.const(np.array([begin + h_eff, begin + w_eff], np.int64), "ends"),
                               ctx.const(np.array([2, 3], np.int64), "axes")], [out] if copy else None)
    elif copy:
        ctx.node("Identity", [x], [out])
    if not copy:
        _resize(ctx, x, (out_h, out_w), out)
    ctx.set_output_shape(0, (num, channels, out_h, out_w))


def _resize(ctx: LayerContext, x: str, size: tuple[int, int], out: str) -> None:
    """ONNX Resize of axes 2 and 3 to `size`, linear with aligned corners, the batch kept dynamic."""
    attrs = {"mode": "linear", "coordinate_transformation_mode": "align_corners"}
    spatial = ctx.const(np.array(size, np.int64), "size")
    if ctx.options.opset >= 18:
        ctx.node("Resize", [x, "", "", spatial], [out], axes=[2, 3], **attrs)
        return
    batch_channels = ctx.node("Slice", [ctx.node("Shape", [x]), ctx.const(np.array([0], np.int64), "start"),
                                        ctx.const(np.array([2], np.int64), "end")])
    sizes = ctx.node("Concat", [batch_channels, spatial], axis=0)
    if ctx.options.opset >= 13:
        ctx.node("Resize", [x, "", "", sizes], [out], **attrs)
    else:  # opsets 11-12 require the roi and scales inputs, empty when sizes is given
        empty = ctx.const(np.zeros(0, np.float32), "empty")
        ctx.node("Resize", [x, empty, empty, sizes], [out], **attrs)
