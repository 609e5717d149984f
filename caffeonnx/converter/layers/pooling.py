"""Pooling: Caffe's MAX / AVE / STOCHASTIC (test-time) pooling with its exact border rules.

Caffe (PoolingLayer::Reshape / Forward) sizes the output with ceil (default) or floor,
drops a last window that would start in the end padding (only when some pad is
non-zero), clips MAX windows to the input, and divides an AVE window's sum over the
input by the window size clipped to [-pad, in + pad).  ONNX's ceil_mode and
count_include_pad differ from this at the borders, so every pool here runs in ONNX
floor mode over end pads chosen to give exactly Caffe's windows, border averages are
rescaled by a constant [OH, OW] factor (it broadcasts over any batch size), and windows
lying wholly outside the input (pad 0, CEIL, stride > kernel) are appended with the
value Caffe gives them (-FLT_MAX for MAX, 0/size for AVE, 0 for STOCHASTIC).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.forks import ceil_rounding
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2

P = caffe_pb2.PoolingParameter
# Caffe starts every MAX window at -FLT_MAX, so a window holding no input yields it.
_LOWEST = float(-np.finfo(np.float32).max)


@dataclass(frozen=True)
class PoolGeometry:
    """Caffe's 2-D pooling windows: input size, kernel, stride, pad and output size per axis (h, w)."""

    size: tuple[int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]
    out: tuple[int, int]

    @property
    def inside(self) -> tuple[int, int]:
        """Windows per axis that start inside the input (Caffe's clip makes that all of them when pad > 0)."""
        h, w = (min(o, -(-(n + p) // s)) for n, s, p, o in zip(self.size, self.stride, self.pad, self.out))
        return h, w

    @property
    def outside(self) -> tuple[int, int]:
        """Trailing windows per axis that hold no input at all (pad 0, CEIL, stride > kernel)."""
        h, w = (o - i for o, i in zip(self.out, self.inside))
        return h, w

    @property
    def end_pad(self) -> tuple[int, int]:
        """End pads making a floor-mode ONNX pool produce exactly the `inside` windows (always < kernel)."""
        h, w = (
            max(0, (i - 1) * s + k - n - p)
            for n, k, s, p, i in zip(self.size, self.kernel, self.stride, self.pad, self.inside)
        )
        return h, w

    def ave_divisor(self) -> np.ndarray:
        """Caffe's AVE divisor per output position: (hend - hstart)·(wend - wstart), ends clipped to in + pad."""
        sides = []
        for n, k, s, p, o in zip(self.size, self.kernel, self.stride, self.pad, self.out):
            start = np.arange(o) * s - p
            sides.append(np.minimum(start + k, n + p) - start)
        return np.outer(sides[0], sides[1])


def _pooled_size(size: int, kernel: int, stride: int, pad: int, ceil: bool) -> int:
    """Caffe's pooled size: ceil/floor of float32 (in + 2p - k) / s, plus one."""
    q = np.float32(size + 2 * pad - kernel) / np.float32(stride)
    return int(math.ceil(q) if ceil else math.floor(q)) + 1


def pool_geometry(p: caffe_pb2.PoolingParameter, size: tuple[int, int], ctx: LayerContext) -> PoolGeometry:
    """The windows of a PoolingParameter on an input of spatial `size`, with Caffe's setup checks."""
    has_kernel = p.HasField("kernel_size"), p.HasField("kernel_h"), p.HasField("kernel_w")
    if p.global_pooling:
        if any(has_kernel):
            raise ctx.error("With Global_pooling: true Filter size cannot specified; drop kernel_size/kernel_h/kernel_w")
        kernel = size
    else:
        if has_kernel[0] and has_kernel[1] and has_kernel[2]:
            raise ctx.error("Filter size is kernel_size OR kernel_h and kernel_w; not both")
        if not has_kernel[0] and not (has_kernel[1] and has_kernel[2]):
            raise ctx.error("For non-square filters both kernel_h and kernel_w are required (or give kernel_size)")
        kernel = (p.kernel_size, p.kernel_size) if has_kernel[0] else (p.kernel_h, p.kernel_w)
    for name in ("pad", "stride"):
        has_hw = p.HasField(f"{name}_h"), p.HasField(f"{name}_w")
        if any(has_hw) and (p.HasField(name) or not all(has_hw)):
            raise ctx.error(f"{name} is {name} OR {name}_h and {name}_w are required (got "
                            f"{name}_h set: {has_hw[0]}, {name}_w set: {has_hw[1]}, {name} set: {p.HasField(name)})")
    pad = (p.pad_h, p.pad_w) if p.HasField("pad_h") else (p.pad, p.pad)
    stride = (p.stride_h, p.stride_w) if p.HasField("stride_h") else (p.stride, p.stride)
    if min(kernel) <= 0:
        raise ctx.error(f"Filter dimensions cannot be zero (kernel {list(kernel)!r})")
    if min(stride) <= 0:
        raise ctx.error(f"stride {list(stride)!r} has a zero entry; Caffe divides by it")
    if p.global_pooling and (pad != (0, 0) or stride != (1, 1)):
        raise ctx.error(f"With Global_pooling: true; only pad = 0 and stride = 1 (got pad {list(pad)!r}, "
                        f"stride {list(stride)!r})")
    if pad != (0, 0):
        if p.pool not in (P.AVE, P.MAX):
            raise ctx.error("Padding implemented only for average and max pooling; set pad to 0 for STOCHASTIC")
        if pad[0] >= kernel[0] or pad[1] >= kernel[1]:
            raise ctx.error(f"pad {list(pad)!r} must be smaller than the kernel {list(kernel)!r}")
    if p.HasField("ceil_mode") and p.HasField("round_mode"):
        raise ctx.error("pooling_param sets both round_mode (BVLC) and ceil_mode (forks), which share field 13 in "
                        "Caffe's binary format; keep one of them")
    ceil = ceil_rounding(p)
    out = [_pooled_size(n, k, s, pd, ceil) for n, k, s, pd in zip(size, kernel, stride, pad)]
    if pad != (0, 0):  # a last window starting in the end padding is dropped, on both axes
        out = [o - 1 if (o - 1) * s >= n + pd else o for o, s, n, pd in zip(out, stride, size, pad)]
    if min(out) <= 0:
        raise ctx.error(
            f"kernel {list(kernel)!r} is larger than the padded input {[n + 2 * pd for n, pd in zip(size, pad)]!r}: "
            f"the output would be empty (size {out!r}); use a smaller kernel or CEIL rounding"
        )
    ctx.check_count(out, "pooled output")  # before ave_divisor makes an array of that size
    return PoolGeometry(size, kernel, stride, pad, (out[0], out[1]))


def _pool(ctx: LayerContext, op: str, x: str, geo: PoolGeometry, outputs: list[str] | None, **attrs: object) -> str:
    """A floor-mode ONNX pool over Caffe's windows that start inside the input."""
    return ctx.node(op, [x], outputs, kernel_shape=list(geo.kernel), strides=list(geo.stride),
                    pads=[*geo.pad, *geo.end_pad], **attrs)


def _add_outside(ctx: LayerContext, y: str, geo: PoolGeometry, value: float, output: str | None = None) -> str:
    """Append the windows lying wholly outside the input, which hold Caffe's empty-window `value`.

    Padding the pool's output rather than its input keeps every pool pad below the kernel, as
    ONNX Runtime requires (it would also fuse a zero Pad placed before a pool into its pads).
    """
    spec = np.array([0, 0, 0, 0, 0, 0, *geo.outside], dtype=np.int64)
    return ctx.node("Pad", [y, ctx.const(spec, "pads"), ctx.const(np.float32(value), "fill")],
                    [output] if output else None)


@register_layer("Pooling", bottoms=1, tops=(1, 2))
def convert_pooling(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Pooling: MAX / AVE (Caffe's border divisor) / STOCHASTIC at test time (Σx²/Σx) over 2-D windows."""
    p = layer.pooling_param
    shape = ctx.input_shapes[0]
    if len(shape) != 4:
        raise ctx.error(f"input shape {list(shape)!r} has {len(shape)} axes; Caffe's Pooling needs (N, C, H, W)")
    max_tops = 2 if p.pool == P.MAX else 1
    if len(layer.top) > max_tops:
        raise ctx.error(f"{P.PoolMethod.Name(p.pool)} pooling has at most {max_tops} top(s), got {len(layer.top)}")
    if p.pool == P.STOCHASTIC and ctx.options.phase == caffe_pb2.TRAIN:
        raise ctx.error("STOCHASTIC pooling samples random positions in the TRAIN phase, which ONNX cannot "
                        "reproduce; convert the TEST phase (it pools with weights x/Σx) or use MAX")
    geo = pool_geometry(p, (shape[2], shape[3]), ctx)
    x, out = ctx.inputs[0], ctx.outputs[0]
    global_single = p.global_pooling and len(layer.top) == 1
    outside = any(geo.outside)
    pooled = None if outside else [out]  # where a pool writes when nothing follows it
    if p.pool == P.MAX:
        if global_single:
            ctx.node("GlobalMaxPool", [x], [out])
        elif len(layer.top) == 1:
            y = _pool(ctx, "MaxPool", x, geo, pooled)
            if outside:
                _add_outside(ctx, y, geo, _LOWEST, out)
        else:
            names = [ctx.builder.unique(f"{ctx.name}/max") if outside else out, ctx.builder.unique(f"{ctx.name}/index")]
            _pool(ctx, "MaxPool", x, geo, names)
            # Caffe's mask is the argmax's offset h·W + w within its (n, c) plane, as float, -1 if empty.
            plane = ctx.node("Mod", [names[1], ctx.const(np.array(shape[2] * shape[3], dtype=np.int64), "plane")])
            mask = ctx.node("Cast", [plane], None if outside else [ctx.outputs[1]], to=TensorProto.FLOAT)
            if outside:
                _add_outside(ctx, names[0], geo, _LOWEST, out)
                _add_outside(ctx, mask, geo, -1.0, ctx.outputs[1])
            ctx.set_output_shape(1, (*shape[:2], *geo.out))
    elif p.pool == P.AVE:
        if global_single:
            ctx.node("GlobalAveragePool", [x], [out])
        else:
            # The pool averages full k_h·k_w windows of zero-padded input, i.e. sum/(k_h·k_w);
            # Caffe divides the sum by the clipped window instead (0/0 is NaN there, as in Caffe).
            with np.errstate(divide="ignore"):
                factor = (geo.kernel[0] * geo.kernel[1] / geo.ave_divisor()).astype(np.float32)
            scaled = not np.all(factor == 1)
            avg = _pool(ctx, "AveragePool", x, geo, None if scaled else pooled, count_include_pad=1)
            if outside:
                avg = _add_outside(ctx, avg, geo, 0.0, None if scaled else out)
            if scaled:
                ctx.node("Mul", [avg, ctx.const(factor, "divisor")], [out])
    elif p.pool == P.STOCHASTIC:
        # Caffe's GPU test-time forward: Σx² / Σx over the window clipped to the input, 0 where Σx <= 0
        # (Caffe's CPU build leaves it unimplemented).  The 1/(k_h·k_w) of both averages cancels.
        avg = _pool(ctx, "AveragePool", x, geo, None, count_include_pad=1)
        avg_sq = _pool(ctx, "AveragePool", ctx.node("Mul", [x, x]), geo, None, count_include_pad=1)
        if outside:
            avg, avg_sq = _add_outside(ctx, avg, geo, 0.0), _add_outside(ctx, avg_sq, geo, 0.0)
        zero = ctx.const(np.float32(0.0), "zero")
        positive = ctx.node("Greater", [avg, zero])
        ctx.node("Where", [positive, ctx.node("Div", [avg_sq, avg]), zero], [out])
    else:
        raise ctx.error(f"unknown pooling method {p.pool!r}; use MAX, AVE or STOCHASTIC")
    ctx.set_output_shape(0, (*shape[:2], *geo.out))
