"""Resize: DenseBox's bilinear resize layer (yangyi02/densebox resize_layer.cpp, carried unchanged by
happynear/caffe-windows and inisis/caffe), with util_img's BiLinearResizeMat / GetBiLinearResizeMatRules.

Output size: with is_pyramid_test false (the default) resize_param's height × width; with it true
int(out_height_scale · H) × int(out_width_scale · W), the product taken in float as the C++ does.

Sampling: top row h reads input row fh = h · (H / H_out) (the ratio in float), interpolating
between rows floor(fh) and floor(fh) + 1 with weights 1 − frac and frac, and likewise for
columns.  That is ONNX's "asymmetric" coordinate mapping with scale H_out / H, except at the
far edge: where floor(fh) + 1 is past the last row, the C++ drops that neighbour's term and
keeps the weight 1 − frac on the last row instead of clamping, so an upscaled top fades
towards zero along its last rows and columns (2 → 4 gives x0, (x0 + x1)/2, x1, x1/2).  Dropping
the term is reading a zero row below the input, so the graph pads the input with one zero row
and column (bottom and right), resizes with asymmetric linear sampling at the scales H_out / H
and W_out / W, and slices the H_out × W_out top out of the (≥ H_out × W_out) result.

The backward (scatter of the top diff with the same four locations and weights, the locs_
blobs) is that interpolation's adjoint, which the trainer's Resize kernel gives through
autograd; the pad's and slice's gradients drop what fell on the zero row.

Only this Resize is converted.  Other forks registered unrelated layers under the same type name
(MSRCCS/Caffe's square resize with function_type, Lamply/caffe's nearest resize_ratio,
pva-mobilenet-v2's resize_layer_param); their fields are not in this schema, so such a prototxt
fails to parse with the field named.
"""
from __future__ import annotations

import math

import numpy as np

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


def _scaled(scale: float, size: int) -> float:
    """int(out_*_scale * size) as ResizeLayer computes it (float times int, in float), before truncation."""
    with np.errstate(over="ignore"):  # a product past float's range is refused by the caller
        return float(np.float32(scale) * np.float32(size))


def resize_size(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> tuple[int, int]:
    """(H_out, W_out) as ResizeLayer's LayerSetUp checks and Reshape computes them."""
    p = layer.resize_param
    height, width = ctx.input_shapes[0][2:]
    if not p.is_pyramid_test:
        for name in ("height", "width"):
            if not p.HasField(name):
                raise ctx.error(f"output {name} is required: with is_pyramid_test false (the default) the top is "
                                "resize_param's height x width; give both, or is_pyramid_test: true with "
                                "out_height_scale and out_width_scale")
        out_h, out_w = p.height, p.width
    else:
        for name in ("out_height_scale", "out_width_scale"):
            if not p.HasField(name):
                raise ctx.error(f"output {name.replace('out_', '').replace('_', ' ')} is required: with "
                                "is_pyramid_test: true the top is int(out_height_scale * H) x int(out_width_scale "
                                "* W); give both scales")
        scaled = (_scaled(p.out_height_scale, height), _scaled(p.out_width_scale, width))
        if not all(math.isfinite(s) and abs(s) < 2**31 for s in scaled):
            raise ctx.error(f"out_height_scale {p.out_height_scale!r} and out_width_scale {p.out_width_scale!r} on "
                            f"the {height}x{width} input give a top of {scaled[0]:g} x {scaled[1]:g}, which no int "
                            "holds; check the scales")
        out_h, out_w = int(scaled[0]), int(scaled[1])  # C++'s int() truncates toward zero
    if out_h <= 0 or out_w <= 0:
        how = ("height and width" if not p.is_pyramid_test else
               f"out_height_scale {p.out_height_scale:g} and out_width_scale {p.out_width_scale:g} on the "
               f"{height}x{width} input")
        raise ctx.error(f"the output would be {out_h}x{out_w} (from {how}); each side must be at least 1")
    return out_h, out_w


@register_layer("Resize", bottoms=1, tops=1, fork="caffe-windows")
def convert_resize(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Resize: bilinear resize sampling input row h · H/H_out (the far neighbour dropped past the edge), same for columns."""
    shape = ctx.input_shapes[0]
    if len(shape) != 4:
        raise ctx.error(f"input shape {list(shape)!r} has {len(shape)} axes; Resize needs (N, C, H, W)")
    if ctx.options.opset < 11:
        raise ctx.error(f"needs ONNX opset 11 or later for Resize with asymmetric coordinates (got --opset "
                        f"{ctx.options.opset}); use --opset 11 or higher")
    num, channels, height, width = shape
    out_h, out_w = resize_size(layer, ctx)
    ctx.check_count((num, channels, out_h, out_w), f"top {layer.top[0]!r}")
    x, out = ctx.inputs[0], ctx.outputs[0]
    if (out_h, out_w) == (height, width):  # the sampling positions are the input's own: a copy
        ctx.node("Identity", [x], [out])
    else:
        # one zero row and column stand for the neighbours the C++ drops past the edge
        padded = ctx.node("Pad", [x, ctx.const(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads")])
        scales = ctx.const(np.array([1, 1, out_h / height, out_w / width], np.float32), "scales")
        roi = "" if ctx.options.opset >= 13 else ctx.const(np.zeros(0, np.float32), "roi")
        resized = ctx.node("Resize", [padded, roi, scales], mode="linear",
                           coordinate_transformation_mode="asymmetric")
        # (H + 1) · H_out/H ≥ H_out + H_out/H rows come out: keep the first H_out x W_out
        ctx.node("Slice", [resized, ctx.const(np.array([0, 0], np.int64), "starts"),
                           ctx.const(np.array([out_h, out_w], np.int64), "ends"),
                           ctx.const(np.array([2, 3], np.int64), "axes")], [out])
    ctx.set_output_shape(0, (num, channels, out_h, out_w))
