"""Slice: cut one bottom into consecutive pieces along an axis (Caffe's SliceLayer)."""
from __future__ import annotations

from itertools import pairwise

import numpy as np
from onnx import TensorProto

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2

_TO_END = np.iinfo(np.int64).max  # ONNX Slice clamps this to the axis length


def _slice_axis(layer: caffe_pb2.LayerParameter, ctx: LayerContext, ndim: int) -> int:
    """The sliced axis: `axis` (negative counts from the end) or the legacy unsigned `slice_dim`."""
    p = layer.slice_param
    if p.HasField("axis") and p.HasField("slice_dim"):
        raise ctx.error(
            f"slice_param sets both axis ({p.axis!r}) and slice_dim ({p.slice_dim!r}); "
            "Either axis or slice_dim should be specified; not both. Keep only axis"
        )
    if p.HasField("slice_dim"):
        if p.slice_dim >= ndim:
            raise ctx.error(
                f"slice_dim {p.slice_dim!r} is out of range for a {ndim}-D bottom (0 <= slice_dim < {ndim})"
            )
        return p.slice_dim
    return ctx.axis(p.axis, ndim)


def _sizes(layer: caffe_pb2.LayerParameter, ctx: LayerContext, dim: int, axis: int) -> list[int]:
    """Length of every top along the axis: between slice points, or `dim` split evenly."""
    points = list(layer.slice_param.slice_point)
    tops = len(layer.top)
    if not points:
        if dim % tops:
            raise ctx.error(
                f"Number of top blobs ({tops}) should evenly divide input slice axis ({dim}) of axis {axis}; "
                "give slice_point values or change the number of tops"
            )
        return [dim // tops] * tops
    if len(points) != tops - 1:
        raise ctx.error(
            f"{len(points)} slice_point value(s) {points!r} for {tops} tops; give exactly one fewer "
            "slice_point than tops"
        )
    if tops > dim:
        raise ctx.error(f"{tops} tops cannot slice axis {axis} of length {dim}; use at most {dim} tops")
    bounds = [0, *points]
    if any(b <= a for a, b in pairwise(bounds)) or points[-1] > dim:
        raise ctx.error(
            f"slice_point {points!r} must be strictly increasing, positive and at most the axis length {dim} "
            f"(axis {axis})"
        )
    return [b - a for a, b in pairwise([*bounds, dim])]


@register_layer("Slice", bottoms=1, tops=(1, None))
def convert_slice(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Slice: split the bottom along `axis` (legacy `slice_dim`) at `slice_point`s, or evenly when none."""
    if not layer.top:
        raise ctx.error("Slice needs at least one top blob")
    shape = ctx.input_shapes[0]
    axis = _slice_axis(layer, ctx, len(shape))
    sizes = _sizes(layer, ctx, shape[axis], axis)
    dtype = ctx.builder.dtypes.get(ctx.inputs[0], TensorProto.FLOAT)
    x = ctx.inputs[0]
    if len(sizes) == 1:
        ctx.node("Identity", [x], [ctx.outputs[0]])
    elif axis != 0 or ctx.options.batch is not None:
        _split_static(ctx, x, axis, sizes)
    elif layer.slice_param.slice_point:
        # Dynamic batch: fixed-size pieces up front, the last one takes whatever the batch leaves.
        start = 0
        for i, size in enumerate(sizes):
            end = start + size if i < len(sizes) - 1 else _TO_END
            ctx.node("Slice", [x, ctx.const([start], "starts"), ctx.const([end], "ends"), ctx.const([0], "axes")],
                     [ctx.outputs[i]])
            start += size
    elif ctx.options.opset >= 18:
        ctx.node("Split", [x], list(ctx.outputs), axis=0, num_outputs=len(sizes))
    else:
        raise ctx.error(
            f"an even split of the dynamic batch axis into {len(sizes)} tops needs opset >= 18 "
            f"(got {ctx.options.opset}); use --opset 18 or higher, or fix the batch with --batch"
        )
    for i, size in enumerate(sizes):
        top = list(shape)
        top[axis] = size
        ctx.set_output_shape(i, top, dtype)


def _split_static(ctx: LayerContext, x: str, axis: int, sizes: list[int]) -> None:
    """One Split node with the pieces' lengths (an input from opset 13, an attribute before)."""
    if ctx.options.opset >= 13:
        ctx.node("Split", [x, ctx.const(np.array(sizes, dtype=np.int64), "split")], list(ctx.outputs), axis=axis)
    else:
        ctx.node("Split", [x], list(ctx.outputs), axis=axis, split=sizes)
