"""Unpooling: DeconvNet's unpooling (HyeonwooNoh/caffe unpooling_layer.cpp / .cu; V1 type UNPOOLING).

DeconvNet's Caffe has only V1 nets, so its layer is `layers { type: UNPOOLING unpooling_param {...} }`,
upgraded here to the type "Unpooling".  The top is (N, C, H', W') with H' × W' = unpool_size or
unpool_h × unpool_w (LayerSetUp requires one of them, so Reshape's fallback size never applies),
and the windows are [ph·stride, ph·stride + kernel) with pad 0 (the only pad LayerSetUp allows):

- MAX with a mask bottom (DeconvNet's decoder, the second top of a MAX Pooling layer): each
  value is written at its mask offset h·W' + w in its (n, c) plane of a zero top, exactly as
  SegNet's Upsample does, so the Upsample scatter is reused (its gradient is the gather the
  C++ backward does).
- MAX without a mask: each value goes to its window's corner (min(ph·stride, H'−1), min(pw·stride,
  W'−1)); a constant Gather, where a position written twice (a top smaller than the windows
  reach) keeps the later value as the C++ loop does.  The backward then gives the overwritten
  value no gradient, where Caffe gives it that position's diff.
- AVE / TILE (at most one bottom): each value, divided by its window's area clipped to the top
  (AVE) or not (TILE), is added over its window: a depthwise ConvTranspose with a ones kernel,
  cut or zero-padded to H' × W'.  This is the GPU forward; the CPU forward adds onto whatever the
  top held before (zeros only on the first pass), which no backend reproduces.  Caffe's TILE
  backward divides by the window area although the forward does not, so a trained TILE layer's
  gradient (autograd's, the true one) differs from Caffe's by that factor; and a window starting
  past the top (a top smaller than (H−1)·stride + 1) gets gradient 0 where Caffe divides 0 by 0.
"""
from __future__ import annotations

import numpy as np

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.layers.upsample import check_mask_bottoms, scatter_at_mask
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2

U = caffe_pb2.UnpoolingParameter


def unpool_geometry(p: caffe_pb2.UnpoolingParameter, ctx: LayerContext) -> tuple[tuple[int, int], tuple[int, int],
                                                                             tuple[int, int]]:
    """UnpoolingLayer::LayerSetUp's checks; returns (kernel, stride, unpooled size), each (h, w)."""
    has = p.HasField
    if has("kernel_size") == (has("kernel_h") and has("kernel_w")):
        raise ctx.error("Filter size is kernel_size OR kernel_h and kernel_w; not both (give one of them)")
    if not ((not has("pad") and has("pad_h") and has("pad_w")) or (not has("pad_h") and not has("pad_w"))):
        raise ctx.error("pad is pad OR pad_h and pad_w are required")
    if not ((not has("stride") and has("stride_h") and has("stride_w")) or (not has("stride_h") and not has("stride_w"))):
        raise ctx.error("Stride is stride OR stride_h and stride_w are required")
    if not ((not has("unpool_size") and has("unpool_h") and has("unpool_w"))
            or (has("unpool_size") and not has("unpool_h") and not has("unpool_w"))):
        raise ctx.error("Unpool is unpool_size OR unpool_h and unpool_w are required (the size of the top, usually "
                        "the size of the Pooling layer's bottom whose mask it reads)")
    kernel = (p.kernel_size, p.kernel_size) if has("kernel_size") else (p.kernel_h, p.kernel_w)
    if min(kernel) == 0:
        raise ctx.error(f"Filter dimensions cannot be zero (kernel {list(kernel)!r})")
    pad = (p.pad_h, p.pad_w) if has("pad_h") else (p.pad, p.pad)
    if any(pad):
        raise ctx.error(f"currently, only zero padding is allowed (pad {list(pad)!r})")
    stride = (p.stride_h, p.stride_w) if has("stride_h") else (p.stride, p.stride)
    if min(stride) == 0:
        raise ctx.error(f"stride {list(stride)!r} must be > 0")
    size = (p.unpool_size, p.unpool_size) if has("unpool_size") else (p.unpool_h, p.unpool_w)
    if min(size) == 0:
        raise ctx.error(f"the unpooled size {list(size)!r} must be > 0")
    return kernel, stride, size


@register_layer("Unpooling", bottoms=(1, 2), tops=1, fork="deconvnet")
def convert_unpooling(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Unpooling: a zero top with each value at its max-pooling mask offset (MAX), or spread over its window (AVE, TILE)."""
    p = layer.unpooling_param
    kernel, stride, (out_h, out_w) = unpool_geometry(p, ctx)
    if ctx.options.opset < 11:
        raise ctx.error(f"needs ONNX opset 11 or later (ScatterElements, Pad with computed pads; got --opset "
                        f"{ctx.options.opset}); use --opset 11 or higher")
    if p.unpool != U.MAX and len(layer.bottom) > 1:
        raise ctx.error(f"Unpooling Layer takes at most 1 bottom blob(s) as input with unpool {U.UnpoolMethod.Name(p.unpool)} "
                        f"(only MAX reads a pooling mask); it has {len(layer.bottom)}")
    if len(layer.bottom) == 2:
        shape = check_mask_bottoms(layer, ctx)
        scatter_at_mask(ctx, shape, out_h, out_w)
        return
    shape = tuple(ctx.input_shapes[0])
    if len(shape) != 4:
        raise ctx.error(f"Input must have 4 axes, corresponding to (num, channels, height, width); bottom "
                        f"{layer.bottom[0]!r} has shape {list(shape)}")
    num, channels, height, width = shape
    ctx.check_count((num, channels, out_h, out_w), f"top {layer.top[0]!r}")
    if p.unpool == U.MAX:
        _corner_unpool(ctx, (num, channels, height, width), stride, (out_h, out_w))
    else:
        _window_unpool(ctx, (num, channels, height, width), kernel, stride, (out_h, out_w), p.unpool == U.AVE)
    ctx.set_output_shape(0, (num, channels, out_h, out_w))


def _corner_unpool(ctx: LayerContext, shape: tuple[int, int, int, int], stride: tuple[int, int],
                   out: tuple[int, int]) -> None:
    """MAX without a mask: value (ph, pw) at (min(ph·stride_h, H'−1), min(pw·stride_w, W'−1)), later ones winning."""
    num, channels, height, width = shape
    out_h, out_w = out
    source = np.zeros(out_h * out_w, np.int64)  # the value each top position takes, within the flattened plane
    written = np.zeros(out_h * out_w, bool)
    for ph in range(height):
        for pw in range(width):
            position = min(ph * stride[0], out_h - 1) * out_w + min(pw * stride[1], out_w - 1)
            source[position], written[position] = ph * width + pw, True
    flat = ctx.reshape(ctx.inputs[0], shape, (num, channels, height * width))
    gathered = ctx.node("Gather", [flat, ctx.const(source, "source")], axis=2)
    # Where, not a multiplication by 0/1: an infinite value must not turn the empty positions into NaN
    top = ctx.node("Where", [ctx.const(written, "written"), gathered, ctx.const(np.float32(0), "zero")])
    ctx.reshape(top, (num, channels, out_h * out_w), (num, channels, out_h, out_w), output=ctx.outputs[0])


def _window_unpool(ctx: LayerContext, shape: tuple[int, int, int, int], kernel: tuple[int, int],
                   stride: tuple[int, int], out: tuple[int, int], average: bool) -> None:
    """AVE / TILE: Σ over the windows holding a top position of value (÷ window area clipped to the top, for AVE)."""
    _, channels, height, width = shape
    x = ctx.inputs[0]
    if average:
        # pool_size of window (ph, pw): its extent inside the top on each axis (pad 0); a window starting past
        # the top reaches only positions cut off below, so any nonzero divisor does there
        extent = [np.array([min(i * s + k, o) - i * s for i in range(n)], np.float32)
                  for n, k, s, o in ((height, kernel[0], stride[0], out[0]), (width, kernel[1], stride[1], out[1]))]
        area = np.outer(*extent)
        area[area <= 0] = 1
        x = ctx.node("Div", [x, ctx.const(area.reshape(1, 1, height, width), "pool_size")])
    # the ConvTranspose reaches (n − 1)·stride + kernel on each axis: zero-pad or cut (negative pad) to the top's size
    ends = [o - ((n - 1) * s + k) for n, k, s, o in ((height, kernel[0], stride[0], out[0]),
                                                     (width, kernel[1], stride[1], out[1]))]
    ones = ctx.const(np.ones((channels, 1, *kernel), np.float32), "kernel")
    spread = ctx.node("ConvTranspose", [x, ones], None if any(ends) else [ctx.outputs[0]],
                      kernel_shape=list(kernel), strides=list(stride), group=channels)
    if any(ends):
        ctx.node("Pad", [spread, ctx.const(np.array([0, 0, 0, 0, 0, 0, *ends], np.int64), "pads")], [ctx.outputs[0]])
