"""MaxPool, AveragePool and the global pools as Caffe Pooling with ONNX's exact output sizes.

Caffe 1.0 pools 2-D windows with one pad per axis, rounds the output size up and drops
a last window that starts in the end padding.  Windows start at i·stride - pad in both
worlds, so Caffe's pad is ONNX's begin pad; when Caffe computes more windows than ONNX
the extra ones are sliced off (or, with extensions, `round_mode: FLOOR` avoids them).
Caffe divides an AVE window by its size clipped to [-pad, in + pad); where ONNX divides
by something else (count_include_pad=0, or a different end pad) a fixed Scale layer
multiplies by Caffe's divisor over ONNX's, per output position.
"""
from __future__ import annotations

import numpy as np

from caffeonnx.converter.foreign.caffe_layers import crop
from caffeonnx.converter.foreign.context import NodeContext
from caffeonnx.converter.foreign.geometry import (
    Window,
    caffe_ave_divisor,
    caffe_pool_size,
    onnx_ave_divisor,
    resolve_pads,
)
from caffeonnx.converter.foreign.registry import register_op
from caffeonnx.proto import caffe_pb2

P = caffe_pb2.PoolingParameter


def _check_4d(ctx: NodeContext) -> tuple[int, ...]:
    shape = ctx.shape(0)
    if len(shape) != 4:
        raise ctx.unsupported(f"input shape {list(shape)!r} is not (N, C, H, W); Caffe's Pooling has 2-D windows")
    return shape


def _set_hw(p: P, name: str, values: list[int], default: int | None) -> None:
    """kernel_size/stride/pad as one value, or as *_h and *_w when the axes differ."""
    h, w = values
    if h == w:
        if default is None or h != default:
            setattr(p, "kernel_size" if name == "kernel" else name, h)
    else:
        setattr(p, f"{name}_h", h)
        setattr(p, f"{name}_w", w)


@register_op("MaxPool", "AveragePool")
def emit_pool(ctx: NodeContext) -> None:
    """MaxPool/AveragePool -> Pooling (pad = begin pad; extra ceil windows sliced; AVE divisors fixed by Scale)."""
    shape = _check_4d(ctx)
    if len(ctx.node.output) > 1 and ctx.node.output[1] and (
            ctx.builder.users.get(ctx.node.output[1]) or ctx.node.output[1] in ctx.builder.graph.outputs):
        raise ctx.unsupported("the Indices output is used; Caffe's MAX mask top indexes differently")
    kernel = list(ctx.attr("kernel_shape"))
    stride = list(ctx.attr("strides", [1, 1]))
    if list(ctx.attr("dilations", [1, 1])) != [1, 1]:
        raise ctx.unsupported(f"dilations {list(ctx.attr('dilations'))!r}; Caffe's Pooling has no dilation")
    pads = resolve_pads(str(ctx.attr("auto_pad", "NOTSET")), list(ctx.attr("pads", [])), shape[2:], kernel, stride,
                        [1, 1])
    windows = [Window(s, k, st, 1, pb, pe) for s, k, st, (pb, pe) in zip(shape[2:], kernel, stride, pads)]
    want = list(ctx.out_shape()[2:])
    for w in windows:
        if w.pad_begin >= w.kernel:
            raise ctx.unsupported(f"begin pad {w.pad_begin} is not below the kernel {w.kernel}; Caffe refuses it")
    ceil_sizes = [caffe_pool_size(w.size, w.kernel, w.stride, w.pad_begin, True) for w in windows]
    floor_sizes = [caffe_pool_size(w.size, w.kernel, w.stride, w.pad_begin, False) for w in windows]
    floor = ceil_sizes != want and floor_sizes == want and ctx.options.extensions
    got = floor_sizes if floor else ceil_sizes
    if any(g < o for g, o in zip(got, want)):
        raise ctx.unsupported(
            f"pads {[p for side in zip(*pads) for p in side]!r} (begins, then ends) give {want!r} windows per axis, "
            f"more than Caffe's {got!r} with pad = begin pad; pad the input symmetrically in the model"
        )
    is_max = ctx.op == "MaxPool"
    scale = None
    if not is_max:
        include_pad = bool(ctx.attr("count_include_pad", 0))
        ratios = [caffe_ave_divisor(w, o) / onnx_ave_divisor(w, o, include_pad) for w, o in zip(windows, want)]
        if any(np.any(r != 1) for r in ratios):
            scale = np.outer(ratios[0], ratios[1]).astype(np.float32)
    cut = got != want
    top = ctx.temp("pooled") if cut or scale is not None else ctx.output()
    p = ctx.layer("Pooling", [ctx.blob(0)], [top]).pooling_param
    p.pool = P.MAX if is_max else P.AVE
    _set_hw(p, "kernel", kernel, None)
    _set_hw(p, "stride", stride, 1)
    _set_hw(p, "pad", [w.pad_begin for w in windows], 0)
    if floor:
        p.round_mode = P.FLOOR
    if cut:
        last = ctx.output() if scale is None else ctx.temp("cropped")
        top = crop(ctx, top, (*shape[:2], *got), [(0, shape[0]), (0, shape[1]), (0, want[0]), (0, want[1])], last)
    if scale is not None:
        layer = ctx.layer("Scale", [top], [ctx.output()])
        layer.scale_param.axis = 2
        layer.scale_param.num_axes = 2
        ctx.fixed_param(layer, scale)


@register_op("GlobalMaxPool", "GlobalAveragePool")
def emit_global_pool(ctx: NodeContext) -> None:
    """GlobalMaxPool/GlobalAveragePool -> Pooling with global_pooling: true."""
    _check_4d(ctx)
    p = ctx.layer("Pooling", [ctx.blob(0)], [ctx.output()]).pooling_param
    p.pool = P.MAX if ctx.op == "GlobalMaxPool" else P.AVE
    p.global_pooling = True
