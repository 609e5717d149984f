"""Filter: Caffe's FilterLayer, keeps the examples whose selector is non-zero.

The number of examples kept is known only at run time, so each top's first axis is dynamic
in the graph; the shape recorded for later layers is the bottom's, as Caffe's first Reshape
sizes it.
"""
from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.layers.loss import reduce_sum
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@register_layer("Filter", bottoms=(2, None), tops=(1, None))
def convert_filter(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Filter: top k = the examples of bottom k whose selector (the last bottom) is non-zero, in order."""
    if ctx.options.opset < 11:  # Range and TopK with a computed k
        raise ctx.error(f"needs ONNX opset 11 or later (got --opset {ctx.options.opset}); use --opset 11 or higher")
    if len(layer.top) != len(layer.bottom) - 1:
        raise ctx.error(f"Top.size() should be equal to bottom.size() - 1: {len(layer.bottom)} bottoms (the last is "
                        f"the selector) need {len(layer.bottom) - 1} tops, got {len(layer.top)}")
    sel_shape = ctx.input_shapes[-1]
    if not sel_shape or math.prod(sel_shape[1:]) != 1:
        raise ctx.error(f"Selector blob dimensions must be singletons (1), except the first: selector "
                        f"{layer.bottom[-1]!r} has shape {list(sel_shape)}")
    for name, shape in zip(layer.bottom[:-1], ctx.input_shapes[:-1]):
        if not shape or shape[0] != sel_shape[0]:
            raise ctx.error(f"Each bottom should have the same 0th dimension as the selector blob: {name!r} has shape "
                            f"{list(shape)}, selector {layer.bottom[-1]!r} has {list(sel_shape)}")
    flat = ctx.node("Reshape", [ctx.inputs[-1], ctx.const(np.array([-1], dtype=np.int64), "shape")])
    dtype = ctx.builder.dtypes.get(ctx.inputs[-1], TensorProto.FLOAT)
    zero = ctx.const(np.array(0, dtype=np.int64 if dtype == TensorProto.INT64 else np.float32), "zero")
    keep = ctx.node("Cast", [ctx.node("Not", [ctx.node("Equal", [flat, zero])])],  # Caffe: if (selector); NaN is set
                    to=TensorProto.FLOAT)
    # The kept rows' indices in order: TopK of keep·(N - i) over the kept count (score 0 rows are never taken).
    n = ctx.node("Size", [flat])
    position = ctx.node("Range", [ctx.const(np.array(0, dtype=np.int64), "start"), n,
                                  ctx.const(np.array(1, dtype=np.int64), "delta")])
    score = ctx.node("Mul", [keep, ctx.node("Cast", [ctx.node("Sub", [n, position])], to=TensorProto.FLOAT)])
    kept = ctx.node("Reshape", [ctx.node("Cast", [reduce_sum(ctx, keep)], to=TensorProto.INT64),
                                ctx.const(np.array([1], dtype=np.int64), "k_shape")])
    _, rows = ctx.node_outputs("TopK", [score, kept], 2, axis=0, largest=1, sorted=1)
    for k, (x, out) in enumerate(zip(ctx.inputs[:-1], ctx.outputs)):
        ctx.node("Gather", [x, rows], [out], axis=0)
        ctx.set_output_shape(k, ctx.input_shapes[k], ctx.builder.dtypes.get(x, TensorProto.FLOAT))
