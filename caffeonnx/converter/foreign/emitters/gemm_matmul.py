"""Gemm and MatMul (+ Add of a bias vector) as Caffe InnerProduct, weight ties kept.

InnerProduct computes y = x·Wᵀ + b with W stored N×K, or, with `transpose: true`,
y = x·W with W stored K×N.  The emitter finds the matrix M of y = x·M; when M is an
initializer as stored it is written with `transpose: true`, when M is an initializer
read transposed (Gemm transB=1, a Transpose node, or an exporter's folded copy) it is
written as is.  Either way the blob is the initializer's own data, so layers using the
same initializer share one Caffe param.
"""
from __future__ import annotations

import numpy as np

from caffeonnx.converter.foreign.context import NodeContext
from caffeonnx.converter.foreign.prepare import Const
from caffeonnx.converter.foreign.registry import register_op


def _inner_product(ctx: NodeContext, matrix: Const, bias: Const | None, top: str, axis: int) -> None:
    """InnerProduct y = x·M (+ bias) over the axes from `axis` on; M is K×N."""
    layer = ctx.layer("InnerProduct", [ctx.blob(0)], [top])
    p = layer.inner_product_param
    p.num_output = matrix.value.shape[1]
    if axis != 1:
        p.axis = axis
    if matrix.is_source():
        p.transpose = True  # the initializer is K×N: Caffe reads it transposed
        ctx.param(layer, matrix.value, "weight", matrix.source)
    elif matrix.is_source_transposed():
        ctx.param(layer, matrix.value.T, "weight", matrix.source)
    else:
        ctx.param(layer, matrix.value.T, "weight")
    p.bias_term = bias is not None
    if bias is not None:
        ctx.param(layer, bias.value.reshape(-1), "bias", bias.source if bias.same_order() else None)


def _bias_vector(c: Const, n: int) -> Const | None:
    """`c` as a length-n bias when it broadcasts along the last axis only (else None)."""
    v = c.value
    if v.size == n and all(d == 1 for d in v.shape[:-1]) and (v.ndim == 0 or v.shape[-1] == n):
        return c.reshaped((n,))
    if v.size == 1:
        return Const(np.full(n, v.reshape(()), dtype=np.float32))
    return None


@register_op("Gemm")
def emit_gemm(ctx: NodeContext) -> None:
    """Gemm -> InnerProduct (transB=0 or a transposed initializer: `transpose: true`; alpha, beta folded)."""
    if ctx.attr("transA", 0):
        raise ctx.unsupported("transA=1 multiplies the transposed input; Caffe's InnerProduct cannot")
    b = ctx.const(1)
    if b is None:
        raise ctx.unsupported("B is computed; Caffe's InnerProduct needs a constant weight (an initializer)")
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    matrix = b if not ctx.attr("transB", 0) else b.transpose2d()
    if alpha != 1.0:
        matrix = Const(matrix.value * np.float32(alpha))
    n = matrix.value.shape[1]
    bias = None
    if ctx.has_input(2):
        c = ctx.const(2)
        if c is None:
            raise ctx.unsupported("C is computed; Caffe's InnerProduct needs a constant bias")
        bias = _bias_vector(c, n)
        if bias is None:
            raise ctx.unsupported(f"C of shape {list(c.value.shape)!r} is not one bias per output ({n}); "
                                  "Caffe's InnerProduct bias is a vector")
        if beta != 1.0:
            bias = Const(bias.value * np.float32(beta))
    _inner_product(ctx, matrix, bias, ctx.output(), 1)


@register_op("MatMul")
def emit_matmul(ctx: NodeContext) -> None:
    """MatMul by a constant matrix (+ a following Add of a bias vector) -> InnerProduct over the last axis."""
    w = ctx.const(1)
    if w is None or w.value.ndim != 2:
        what = "the left operand is constant" if ctx.const(0) is not None else (
            "both operands are computed" if w is None else f"the constant has {w.value.ndim} axes")
        raise ctx.unsupported(f"{what}; Caffe's InnerProduct multiplies a blob by a constant 2-D matrix on the right")
    x_shape = ctx.shape(0)
    n = w.value.shape[1]
    top, bias = ctx.output(), None
    user = ctx.sole_user()
    if user is not None and user.op_type == "Add":
        other = user.input[1] if user.input[0] == ctx.output() else user.input[0]
        c = ctx.builder.graph.consts.get(other)
        if c is not None and ctx.builder.graph.shapes[user.output[0]] == ctx.out_shape():
            bias = _bias_vector(c, n)
            if bias is not None:
                top = user.output[0]
                ctx.absorb(user)
    _inner_product(ctx, w, bias, top, len(x_shape) - 1)
