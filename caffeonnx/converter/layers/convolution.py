"""Convolution and Deconvolution: Caffe's im2col convolutions as ONNX Conv / ConvTranspose.

Geometry follows BaseConvolutionLayer::LayerSetUp: kernel/stride/pad given once or once
per spatial axis (or as *_h/*_w for 2-D), dilation once or per axis, `axis` the channel
axis (the axes before it are folded into the batch).  The weight blob is
[num_output, C/group, k...] for Convolution and [C, num_output/group, k...] for
Deconvolution, which are exactly ONNX's Conv and ConvTranspose layouts.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.fillers import constant_filler
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2

# ONNX Runtime implements Conv / ConvTranspose for 1, 2 and 3 spatial axes.
_MAX_SPATIAL_AXES = 3


@dataclass(frozen=True)
class ConvGeometry:
    """Per-spatial-axis kernel, stride, pad and dilation of one Caffe convolution."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    pad: tuple[int, ...]
    dilation: tuple[int, ...]

    @property
    def extent(self) -> tuple[int, ...]:
        """Dilated kernel extent d·(k-1)+1 per axis."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation))


def _per_axis(
    ctx: LayerContext,
    values: Sequence[int],
    name: str,
    n: int,
    default: int | None,
    hw: tuple[bool, bool, int, int],
) -> tuple[int, ...]:
    """One ConvolutionParameter field expanded to `n` axes as Caffe does (repeated or *_h/*_w)."""
    has_h, has_w, h, w = hw
    prefix = name.removesuffix("_size")
    if has_h or has_w:
        if n != 2:
            raise ctx.error(f"{prefix}_h & {prefix}_w can only be used for 2D convolution (this one has {n} "
                            "spatial axes)")
        if len(values):
            raise ctx.error(f"Either {name} or {prefix}_h/w should be specified; not both (got {name}: "
                            f"{list(values)!r})")
        return (h, w)
    allowed = (1, n) if default is None else (0, 1, n)
    if len(values) not in allowed:
        raise ctx.error(
            f"{name} must be specified once, or once per spatial dimension ({name} specified {len(values)} "
            f"times; {n} spatial dims)"
        )
    if not len(values):
        assert default is not None
        return (default,) * n
    return tuple(int(values[0 if len(values) == 1 else i]) for i in range(n))


def conv_geometry(p: caffe_pb2.ConvolutionParameter, n: int, ctx: LayerContext) -> ConvGeometry:
    """Kernel, stride, pad and dilation of a ConvolutionParameter for `n` spatial axes (Caffe's checks)."""
    kernel = _per_axis(ctx, p.kernel_size, "kernel_size", n, None,
                       (p.HasField("kernel_h"), p.HasField("kernel_w"), p.kernel_h, p.kernel_w))
    stride = _per_axis(ctx, p.stride, "stride", n, 1,
                       (p.HasField("stride_h"), p.HasField("stride_w"), p.stride_h, p.stride_w))
    pad = _per_axis(ctx, p.pad, "pad", n, 0, (p.HasField("pad_h"), p.HasField("pad_w"), p.pad_h, p.pad_w))
    dilation = _per_axis(ctx, p.dilation, "dilation", n, 1, (False, False, 0, 0))
    for name, values in (("kernel size", kernel), ("stride", stride), ("dilation", dilation)):
        if any(v <= 0 for v in values):
            raise ctx.error(f"{name} {list(values)!r} has a zero entry; every spatial axis needs a positive {name}")
    return ConvGeometry(kernel, stride, pad, dilation)


def _conv_output(ctx: LayerContext, size: int, k_ext: int, stride: int, pad: int) -> int:
    """ConvolutionLayer::compute_output_shape: (in + 2p - ext) / s + 1 with C++ truncating division."""
    num = size + 2 * pad - k_ext
    out = (num // stride if num >= 0 else -(-num // stride)) + 1
    if out <= 0:
        raise ctx.error(
            f"input size {size} with pad {pad} is smaller than the dilated kernel extent {k_ext}: the output "
            "would be empty; enlarge the input or the pad"
        )
    return out


def _deconv_output(ctx: LayerContext, size: int, k_ext: int, stride: int, pad: int) -> int:
    """DeconvolutionLayer::compute_output_shape: s·(in-1) + ext - 2p."""
    out = stride * (size - 1) + k_ext - 2 * pad
    if out <= 0:
        raise ctx.error(f"pad {pad} crops away the whole output (input size {size}, kernel extent {k_ext}, "
                        f"stride {stride}); lower the pad")
    return out


def _convert(layer: caffe_pb2.LayerParameter, ctx: LayerContext, transposed: bool) -> None:
    """Shared body of Convolution (transposed=False) and Deconvolution (transposed=True)."""
    p = layer.convolution_param
    shape = ctx.input_shapes[0]
    axis = ctx.axis(p.axis, len(shape))
    n = len(shape) - axis - 1
    if not 1 <= n <= _MAX_SPATIAL_AXES:
        raise ctx.error(
            f"input shape {list(shape)!r} with channel axis {axis} has {n} spatial axes; ONNX convolutions "
            f"here support 1 to {_MAX_SPATIAL_AXES}"
        )
    for i, other in enumerate(ctx.input_shapes[1:], 1):
        if other != shape:
            raise ctx.error(f"All inputs must have the same shape: bottom 0 is {list(shape)!r}, bottom {i} is "
                            f"{list(other)!r}")
    geo = conv_geometry(p, n, ctx)
    channels, num_output, group = shape[axis], p.num_output, p.group
    if num_output <= 0:
        raise ctx.error("convolution_param.num_output must be set and positive")
    if group <= 0 or channels % group or num_output % group:
        raise ctx.error(
            f"group {group!r} must divide both the input channels ({channels}) and num_output ({num_output})"
        )
    if transposed:
        w_shape = (channels, num_output // group, *geo.kernel)
        spatial = tuple(_deconv_output(ctx, *a) for a in zip(shape[axis + 1:], geo.extent, geo.stride, geo.pad))
        end_pads = geo.pad
    else:
        w_shape = (num_output, channels // group, *geo.kernel)
        spatial = tuple(_conv_output(ctx, *a) for a in zip(shape[axis + 1:], geo.extent, geo.stride, geo.pad))
        # ONNX floors the output size; when Caffe's truncation rounded a negative
        # numerator up to one window, the end pad is widened to hold that window.
        end_pads = tuple(
            max(pd, (o - 1) * s + e - size - pd)
            for o, s, e, size, pd in zip(spatial, geo.stride, geo.extent, shape[axis + 1:], geo.pad)
        )
    w_filler = p.weight_filler if p.HasField("weight_filler") else constant_filler(0.0)
    b_filler = p.bias_filler if p.HasField("bias_filler") else constant_filler(0.0)
    w = ctx.param(0, w_shape, "weight", w_filler)
    b = [ctx.param(1, (num_output,), "bias", b_filler)] if p.bias_term else []

    lead = shape[:axis]
    folded = (math.prod(lead), channels, *shape[axis + 1:])
    out_shape = (*lead, num_output, *spatial)
    attrs: dict[str, object] = {"kernel_shape": list(geo.kernel), "strides": list(geo.stride),
                                 "pads": [*geo.pad, *end_pads], "dilations": list(geo.dilation), "group": group}
    op = "ConvTranspose" if transposed else "Conv"
    for i, x in enumerate(ctx.inputs):
        if axis == 1:
            ctx.node(op, [x, w, *b], [ctx.outputs[i]], **attrs)
        else:
            y = ctx.node(op, [ctx.reshape(x, shape, folded), w, *b], **attrs)
            ctx.reshape(y, (folded[0], num_output, *spatial), out_shape, ctx.outputs[i])
        ctx.set_output_shape(i, out_shape)


@register_layer("Convolution", bottoms=(1, None), tops=(1, None), equal=True, params=True)
def convert_convolution(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Convolution: y = W ⋆ x + b, N-D, with pad/stride/dilation/group; weight [M, C/g, k...]."""
    _convert(layer, ctx, transposed=False)


@register_layer("Deconvolution", bottoms=(1, None), tops=(1, None), equal=True, params=True)
def convert_deconvolution(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Deconvolution: the transposed convolution (gradient of Convolution); weight [C, M/g, k...]."""
    _convert(layer, ctx, transposed=True)
