"""ArgMax: indices (and optionally values) of the top_k largest entries, as float blobs.

Caffe sorts (value, index) pairs in descending order, so among equal values the highest
index comes first; ONNX TopK puts the lowest index first.  TopK therefore runs on the
axis reversed, and each index i it returns maps back to (dim - 1 - i).
"""
from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto

from caffeonnx.converter.context import LayerContext, Shape
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


def _i64(ctx: LayerContext, values: list[int] | int, hint: str) -> str:
    return ctx.const(np.array(values, dtype=np.int64), hint)


def _reversed_top_k(ctx: LayerContext, x: str, axis: int, k: int, values_out: str | None = None) -> tuple[str, str]:
    """TopK of `x` with `axis` reversed: (values, indices into the reversed axis)."""
    flipped = ctx.node(
        "Slice",
        [x, _i64(ctx, [-1], "starts"), _i64(ctx, [np.iinfo(np.int64).min], "ends"), _i64(ctx, [axis], "axes"),
         _i64(ctx, [-1], "steps")],
    )
    outs = [values_out or ctx.builder.unique(f"{ctx.name}/values"), ctx.builder.unique(f"{ctx.name}/rev_index")]
    ctx.node("TopK", [flipped, _i64(ctx, [k], "k")], outs, axis=axis, largest=1, sorted=1)
    return outs[0], outs[1]


def _caffe_index(ctx: LayerContext, x: str, shape: Shape, axis: int, rev_index: str, out: str | None = None) -> str:
    """Float index into the original axis of an index into the reversed one: (dim - 1) - i."""
    if axis == 0 and ctx.options.batch is None:  # the batch size is only known at run time
        dim = ctx.node("Gather", [ctx.node("Shape", [x]), _i64(ctx, 0, "batch_axis")])
        last = ctx.node("Sub", [dim, _i64(ctx, 1, "one")])
    else:
        last = _i64(ctx, shape[axis] - 1, "last_index")
    return ctx.node("Cast", [ctx.node("Sub", [last, rev_index])], [out] if out else None, to=TensorProto.FLOAT)


@register_layer("ArgMax", bottoms=1, tops=1)
def convert_argmax(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """ArgMax: float indices (out_max_val: and/or values) of the top_k largest, per item or along `axis`."""
    p = layer.argmax_param
    shape, x, out, k = ctx.input_shapes[0], ctx.inputs[0], ctx.outputs[0], p.top_k
    if k < 1:
        raise ctx.error(f"argmax_param.top_k must be at least 1, got {k!r}")
    if p.HasField("axis"):
        # Along one axis: that axis shrinks to top_k and holds the values (out_max_val) or the indices.
        axis = ctx.axis(p.axis, len(shape), "argmax_param.axis")
        if k > shape[axis]:
            raise ctx.error(
                f"argmax_param.top_k {k!r} exceeds the size {shape[axis]} of axis {axis} (shape {list(shape)}); "
                "lower top_k or pick another axis"
            )
        if p.out_max_val:
            _reversed_top_k(ctx, x, axis, k, values_out=out)
        else:
            _caffe_index(ctx, x, shape, axis, _reversed_top_k(ctx, x, axis, k)[1], out)
        ctx.set_output_shape(0, (*shape[:axis], k, *shape[axis + 1:]))
        return
    # No axis: each item is flattened; the top is (N, 1 or 2, top_k) padded with 1s to the
    # bottom's rank, channel 0 holding the indices and channel 1 (out_max_val) the values.
    n, dim = shape[0], math.prod(shape[1:])
    if k > dim:
        raise ctx.error(
            f"argmax_param.top_k {k!r} exceeds the {dim} values per item (shape {list(shape)}); lower top_k"
        )
    flat = x if len(shape) == 2 else ctx.reshape(x, shape, (n, dim))
    values, rev_index = _reversed_top_k(ctx, flat, 1, k)
    index = _caffe_index(ctx, flat, (n, dim), 1, rev_index)
    channel = [n, 1, k] + [1] * (len(shape) - 3)
    top_shape = (n, 2 if p.out_max_val else 1, *channel[2:])
    if p.out_max_val:
        rows = [ctx.reshape(v, (n, k), tuple(channel)) for v in (index, values)]
        ctx.node("Concat", rows, [out], axis=1)
    else:
        ctx.reshape(index, (n, k), top_shape, output=out)
    ctx.set_output_shape(0, top_shape)
