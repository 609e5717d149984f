"""Reshape: change the shape of a range of axes without moving data (Caffe's ReshapeLayer)."""
from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto

from caffeonnx.converter.context import LayerContext, Shape
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


def _replaced_range(p: caffe_pb2.ReshapeParameter, ctx: LayerContext, ndim: int) -> tuple[int, int]:
    """[start, end) of the bottom axes that `shape` replaces (axis may be -ndim-1 .. ndim)."""
    start = p.axis if p.axis >= 0 else ndim + p.axis + 1
    if not 0 <= start <= ndim:
        raise ctx.error(
            f"reshape_param.axis {p.axis!r} is out of range for a {ndim}-D bottom (use {-ndim - 1}..{ndim})"
        )
    if p.num_axes < -1:
        raise ctx.error(f"reshape_param.num_axes {p.num_axes!r} must be >= 0, or -1 for all axes from axis on")
    end = ndim if p.num_axes == -1 else start + p.num_axes
    if end > ndim:
        raise ctx.error(
            f"reshape_param axis {p.axis!r} + num_axes {p.num_axes!r} = {end} is beyond the {ndim}-D bottom; "
            "lower num_axes"
        )
    return start, end


def _top_shape(p: caffe_pb2.ReshapeParameter, ctx: LayerContext, bottom: Shape) -> tuple[Shape, int, int]:
    """Caffe's top shape and the replaced range [start, end): 0 copies that bottom dim, -1 is inferred."""
    spec = list(p.shape.dim)
    start, end = _replaced_range(p, ctx, len(bottom))
    if spec.count(-1) > 1:
        raise ctx.error(f"reshape_param.shape {spec!r} contains multiple -1 dims; at most a single -1 may be specified")
    if any(d < -1 for d in spec):
        raise ctx.error(
            f"reshape_param.shape {spec!r} has a negative dim other than -1; dims are > 0, 0 (copy) or -1 (infer)"
        )
    new: list[int] = []
    for i, d in enumerate(spec):
        if d == 0:
            if start + i >= len(bottom):
                raise ctx.error(
                    f"reshape_param.shape {spec!r} has a 0 at position {i} but the {len(bottom)}-D bottom has no "
                    f"axis {start + i} to copy"
                )
            d = bottom[start + i]
        new.append(d)
    top = [*bottom[:start], *new, *bottom[end:]]
    count = math.prod(bottom)
    if -1 in new:
        known = math.prod(d for d in top if d != -1)
        if known == 0 or count % known:
            raise ctx.error(
                f"bottom count ({count}) of shape {list(bottom)} must be divisible by the product of the specified "
                f"dimensions ({known}) of reshape_param.shape {spec!r}"
            )
        top[start + new.index(-1)] = count // known
    if math.prod(top) != count:
        raise ctx.error(
            f"reshape_param.shape {spec!r} gives top shape {top} with {math.prod(top)} values, but the bottom "
            f"{list(bottom)} has {count}; output count must match input count"
        )
    return tuple(top), start, end


@register_layer("Reshape", bottoms=1, tops=1)
def convert_reshape(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Reshape: new dims for axes [axis, axis+num_axes); 0 copies the bottom dim, a single -1 is inferred."""
    p = layer.reshape_param
    bottom = ctx.input_shapes[0]
    top, start, end = _top_shape(p, ctx, bottom)
    # ONNX Reshape reads 0 (copy the input dim at the same index) and -1 as Caffe does, so the
    # spec carries over as written and stays exact for any batch; kept leading axes become 0.
    dims = [0] * start + list(p.shape.dim)
    batch_free = ctx.options.batch is None and bool(bottom)
    if batch_free and start == 0 and end > 0 and dims and dims[0] == bottom[0]:
        dims[0] = 0  # the prototxt's own batch size written out: keep the batch dynamic
    tail = bottom[end:]
    x = ctx.inputs[0]
    if batch_free and end == 0 and tail:
        # New axes in front of the batch: the kept axes, batch included, come from the input itself.
        shape = ctx.node("Concat", [ctx.const(np.array(dims, dtype=np.int64), "head"), ctx.node("Shape", [x])], axis=0)
    else:
        shape = ctx.const(np.array([*dims, *tail], dtype=np.int64), "shape")
    ctx.node("Reshape", [x, shape], [ctx.outputs[0]])
    ctx.set_output_shape(0, top, ctx.builder.dtypes.get(x, TensorProto.FLOAT))
