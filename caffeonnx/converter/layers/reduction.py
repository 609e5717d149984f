"""Reduction: sum-like reduction of all axes from `axis` on."""
from __future__ import annotations

import numpy as np

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2

_P = caffe_pb2.ReductionParameter
_ONNX_OP = {_P.SUM: "ReduceSum", _P.ASUM: "ReduceL1", _P.SUMSQ: "ReduceSumSquare", _P.MEAN: "ReduceMean"}


@register_layer("Reduction", bottoms=1, tops=1)
def convert_reduction(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Reduction: y = coeff · SUM/ASUM/SUMSQ/MEAN of x over all axes from `axis` on; top shape is x.shape[:axis]."""
    p = layer.reduction_param
    shape = ctx.input_shapes[0]
    axis = ctx.axis(p.axis, len(shape), "reduction_param.axis")
    op = _ONNX_OP[p.operation]
    axes = list(range(axis, len(shape)))
    x, out = ctx.inputs[0], ctx.outputs[0]
    reduced = ctx.reduce(op, x, axes, out if p.coeff == 1 else None)
    if p.coeff != 1:
        ctx.node("Mul", [reduced, ctx.const(np.array(p.coeff, dtype=np.float32), "coeff")], [out])
    ctx.set_output_shape(0, shape[:axis])
