"""Eltwise: element-wise combination of two or more equally shaped bottoms."""
from __future__ import annotations

import numpy as np

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2

_OPS = caffe_pb2.EltwiseParameter


@register_layer("Eltwise", bottoms=(2, None), tops=1)
def convert_eltwise(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Eltwise: y = Σ coeff_i·x_i (SUM), Π x_i (PROD) or max_i x_i (MAX) over equally shaped bottoms."""
    p = layer.eltwise_param
    shape = ctx.input_shapes[0]
    for name, other in zip(layer.bottom[1:], ctx.input_shapes[1:]):
        if other != shape:
            raise ctx.error(
                f"bottom {name!r} has shape {list(other)} but bottom {layer.bottom[0]!r} has {list(shape)}; "
                "Eltwise needs identical shapes (it does not broadcast)"
            )
    if p.coeff and len(p.coeff) != len(ctx.inputs):
        raise ctx.error(
            f"eltwise_param has {len(p.coeff)} coeff(s) {list(p.coeff)!r} for {len(ctx.inputs)} bottoms; "
            "give one per bottom or none"
        )
    if p.coeff and p.operation == _OPS.PROD:
        raise ctx.error(
            f"eltwise_param.coeff {list(p.coeff)!r} is only allowed with operation SUM (Caffe refuses it for PROD); "
            "remove the coeff lines"
        )
    out = ctx.outputs[0]
    if p.operation == _OPS.SUM:
        terms = [
            x if not p.coeff or p.coeff[i] == 1
            else ctx.node("Mul", [x, ctx.const(np.array(p.coeff[i], dtype=np.float32), f"coeff{i}")])
            for i, x in enumerate(ctx.inputs)
        ]
        ctx.node("Sum", terms, [out])
    elif p.operation == _OPS.PROD:
        acc = ctx.inputs[0]
        for k, x in enumerate(ctx.inputs[1:], start=2):
            acc = ctx.node("Mul", [acc, x], [out] if k == len(ctx.inputs) else None)
    else:  # MAX (proto2 enums are closed: nothing else parses)
        ctx.node("Max", list(ctx.inputs), [out])
    ctx.set_output_shape(0, shape)
