"""InnerProduct: the fully connected layer, including tied (`transpose: true`) use."""
from __future__ import annotations

import math

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.fillers import constant_filler
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@register_layer("InnerProduct", bottoms=1, tops=1, params=True)
def convert_inner_product(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """InnerProduct: y = x·Wᵀ + b over the axes from `axis` on; `transpose` stores W as K×N."""
    p = layer.inner_product_param
    shape = ctx.input_shapes[0]
    axis = ctx.axis(p.axis, len(shape))
    k, n = math.prod(shape[axis:]), p.num_output
    if n <= 0:
        raise ctx.error("inner_product_param.num_output must be set and positive")
    w_filler = p.weight_filler if p.HasField("weight_filler") else constant_filler(0.0)
    b_filler = p.bias_filler if p.HasField("bias_filler") else constant_filler(0.0)
    # A tied decoder names the encoder's N×K matrix and reads it transposed: the same
    # initializer feeds both layers, only the Gemm/MatMul orientation differs.
    w = ctx.param(0, (k, n) if p.transpose else (n, k), "weight", w_filler)
    b = ctx.param(1, (n,), "bias", b_filler) if p.bias_term else None
    x = ctx.inputs[0]
    flat = (*shape[:axis], k)
    if shape != flat:
        x = ctx.reshape(x, shape, flat)
    out = ctx.outputs[0]
    if axis == 1:
        ctx.node("Gemm", [x, w] + ([b] if b else []), [out], transB=0 if p.transpose else 1)
    else:
        wt = w if p.transpose else ctx.node("Transpose", [w], perm=[1, 0])
        if b:
            ctx.node("Add", [ctx.node("MatMul", [x, wt]), b], [out])
        else:
            ctx.node("MatMul", [x, wt], [out])
    ctx.set_output_shape(0, (*shape[:axis], n))
