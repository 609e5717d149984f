"""Upsample: SegNet's unpooling (alexgkendall/caffe-segnet upsample_layer.cpp).

The second bottom is a MAX Pooling layer's mask top: for every pooled value, the offset
h·W + w of its argmax within its (n, c) plane, as float.  UpsampleLayer zeroes a top of
(N, C, H', W') and writes each bottom value at its mask offset in the same plane; its
backward gathers the top diff at those offsets.  Here that is one ScatterElements over
the flattened planes, whose gradient with respect to the written values is exactly that
gather, so the layer trains.

The output size is upsample_h × upsample_w when both are given, else H·scale_h − pad_out_h
by W·scale_w − pad_out_w (scale_h = scale_w = scale unless scale_h/scale_w are given), with
LayerSetUp's checks.  Differences left to the backends, none of which a SegNet mask produces:
an offset outside the top fails at run time in ONNX Runtime as Caffe's LOG(FATAL) does; an
offset of -1 (a pooling window that held no input) writes to the plane's last position
where Caffe writes one value before the plane; when two values share an offset (overlapping
pooling windows) Caffe's CPU loop keeps the later one, ONNX leaves the choice open.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


def upsample_size(p: caffe_pb2.UpsampleParameter, height: int, width: int, ctx: LayerContext) -> tuple[int, int]:
    """UpsampleLayer's top height and width (LayerSetUp's checks, then Reshape's rule)."""
    has = p.HasField
    if not ((has("upsample_h") and has("upsample_w")) or (not has("scale") and has("scale_h") and has("scale_w"))
            or (not has("scale_h") and not has("scale_w"))):
        raise ctx.error("upsample_h & upsample_w are required, else (DEPRECATED) scale OR scale_h & scale_w are "
                        f"required (got {', '.join(f.name for f, _ in p.ListFields()) or 'none'})")
    if has("upsample_h") and has("upsample_w"):
        if p.upsample_h <= 1 or p.upsample_w <= 1:
            raise ctx.error(f"upsample_h {p.upsample_h} and upsample_w {p.upsample_w} must both be > 1")
        return p.upsample_h, p.upsample_w
    scale_h, scale_w = (p.scale_h, p.scale_w) if has("scale_h") else (p.scale, p.scale)
    if scale_h <= 1 or scale_w <= 1:
        raise ctx.error(f"scale {[scale_h, scale_w]!r} must be > 1 on both axes")
    for axis, pad_out, scale in (("h", p.pad_out_h, scale_h), ("w", p.pad_out_w, scale_w)):
        if pad_out and scale != 2:
            raise ctx.error(f"pad_out_{axis} requires scale_{axis} == 2 (got {scale}), otherwise the output size is "
                            f"ill-defined; give upsample_h and upsample_w instead")
    return height * scale_h - int(p.pad_out_h), width * scale_w - int(p.pad_out_w)


@register_layer("Upsample", bottoms=2, tops=1, fork="segnet")
def convert_upsample(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Upsample: a zero (N, C, H', W') top with each bottom value written at its max-pooling mask offset h·W' + w."""
    num, channels, height, width = check_mask_bottoms(layer, ctx)
    out_h, out_w = upsample_size(layer.upsample_param, height, width, ctx)
    scatter_at_mask(ctx, (num, channels, height, width), out_h, out_w)


def check_mask_bottoms(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> tuple[int, int, int, int]:
    """The (N, C, H, W) of a data bottom and the max-pooling mask bottom beside it (same shape), for
    `scatter_at_mask`; SegNet's Upsample and DeconvNet's Unpooling read the mask alike."""
    shape, mask_shape = ctx.input_shapes
    if len(shape) != 4:
        raise ctx.error(f"Input must have 4 axes, corresponding to (num, channels, height, width); bottom "
                        f"{layer.bottom[0]!r} has shape {list(shape)}")
    if len(mask_shape) != 4:
        raise ctx.error(f"Input mask must have 4 axes, corresponding to (num, channels, height, width); bottom "
                        f"{layer.bottom[1]!r} has shape {list(mask_shape)}")
    if tuple(shape) != tuple(mask_shape):
        raise ctx.error(f"the mask {layer.bottom[1]!r} {list(mask_shape)} must have the shape of the input "
                        f"{layer.bottom[0]!r} {list(shape)}: pass the second top of the Pooling layer that made it")
    if ctx.options.opset < 11:
        raise ctx.error(f"needs ONNX opset 11 or later for ScatterElements (got --opset {ctx.options.opset}); "
                        "use --opset 11 or higher")
    num, channels, height, width = shape
    return num, channels, height, width


def scatter_at_mask(ctx: LayerContext, shape: tuple[int, int, int, int], out_h: int, out_w: int) -> None:
    """Top 0: a zero (N, C, out_h, out_w) with each value of bottom 0 written at its bottom-1 mask offset
    h·out_w + w in its own (n, c) plane (the batch size stays dynamic)."""
    num, channels, height, width = shape
    ctx.check_count((num, channels, out_h, out_w), f"top {ctx.layer.top[0]!r}")
    x, mask = ctx.inputs
    flat_in, flat_out = (num, channels, height * width), (num, channels, out_h * out_w)
    values = ctx.reshape(x, shape, flat_in)
    offsets = ctx.reshape(ctx.node("Cast", [mask], to=TensorProto.INT64), shape, flat_in)  # C++'s int cast truncates
    # A zero top of the bottom's batch size (kept dynamic): (N, C) from the input's shape, then the plane.
    batch_channels = ctx.node("Slice", [ctx.node("Shape", [x]), ctx.const(np.array([0], np.int64), "start"),
                                        ctx.const(np.array([2], np.int64), "end")])
    top_shape = ctx.node("Concat", [batch_channels, ctx.const(np.array([out_h * out_w], np.int64), "plane")], axis=0)
    zeros = ctx.node("ConstantOfShape", [top_shape], value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    scattered = ctx.node("ScatterElements", [zeros, offsets, values], axis=2)
    ctx.reshape(scattered, flat_out, (num, channels, out_h, out_w), output=ctx.outputs[0])
    ctx.set_output_shape(0, (num, channels, out_h, out_w))
