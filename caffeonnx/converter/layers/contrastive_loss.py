"""ContrastiveLoss: Caffe's ContrastiveLossLayer (the siamese example's loss).

loss = Σ_i [y_i · d_i² + (1 - y_i) · max(margin - d_i, 0)²] / N / 2 with d_i = ||a_i - b_i||
and y_i = (int(sim_i) != 0); legacy_version uses max(margin - d_i², 0) for dissimilar pairs.
The distance is sqrt(max(d², FLT_MIN)): the same value, and a zero gradient where a == b
(Caffe's backward gives 0 there; a plain sqrt would give NaN).  Elsewhere autograd gives the
exact derivative, which Caffe approximates with (d + 1e-4) in place of d (relative 1e-4/d).
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.layers.loss import FLT_MIN, check_same_num, float_count, reduce_sum
from caffeonnx.converter.layers.mvn import legacy_shape
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


def _check_shapes(ctx: LayerContext) -> tuple[int, int]:
    """ContrastiveLossLayer::LayerSetUp: (N, C, 1, 1) features twice and an (N, 1, 1, 1) similarity."""
    check_same_num(ctx)
    a, b, s = (legacy_shape(ctx, i) for i in range(3))
    bottoms = list(ctx.layer.bottom)
    if a[1] != b[1] or a[2:] != (1, 1) or b[2:] != (1, 1):
        raise ctx.error(f"the two feature bottoms {bottoms[:2]!r} must be (N, C) (or (N, C, 1, 1)) with the same C; "
                        f"they have shapes {list(ctx.input_shapes[0])} and {list(ctx.input_shapes[1])}")
    if s[1:] != (1, 1, 1) or s[0] != a[0]:
        raise ctx.error(f"the similarity bottom {bottoms[2]!r} must hold one value per pair, shape (N) or "
                        f"(N, 1, 1, 1) with N = {a[0]}; it has shape {list(ctx.input_shapes[2])}")
    return a[0], a[1]


@register_layer("ContrastiveLoss", bottoms=3, tops=1, auto_top=True)
def convert_contrastive_loss(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """ContrastiveLoss: Σ y·d² + (1-y)·max(margin - d, 0)² over pairs / N / 2, d = ‖a - b‖ (legacy: max(margin - d², 0))."""
    n, c = _check_shapes(ctx)
    p = layer.contrastive_loss_param
    (a, b, sim), shapes = ctx.inputs[:3], ctx.input_shapes[:3]
    a2 = ctx.reshape(a, shapes[0], (n, c)) if tuple(shapes[0]) != (n, c) else a
    b2 = ctx.reshape(b, shapes[1], (n, c)) if tuple(shapes[1]) != (n, c) else b
    diff = ctx.node("Sub", [a2, b2])
    dist_sq = reduce_sum(ctx, ctx.node("Mul", [diff, diff]), [1])  # (N)
    margin = ctx.const(np.float32(p.margin), "margin")
    if p.legacy_version:
        dissimilar = ctx.node("Relu", [ctx.node("Sub", [margin, dist_sq])])
    else:
        floor = ctx.const(np.float32(FLT_MIN), "flt_min")
        dist = ctx.node("Sqrt", [ctx.node("Max", [dist_sq, floor])])
        gap = ctx.node("Relu", [ctx.node("Sub", [margin, dist])])
        dissimilar = ctx.node("Mul", [gap, gap])
    flat = ctx.reshape(sim, shapes[2], (n,)) if tuple(shapes[2]) != (n,) else sim
    if ctx.builder.dtypes.get(flat, TensorProto.FLOAT) != TensorProto.INT64:
        flat = ctx.node("Cast", [flat], to=TensorProto.INT64)  # static_cast<int>
    similar = ctx.node("Not", [ctx.node("Equal", [flat, ctx.const(np.array(0, dtype=np.int64), "zero")])])
    total = reduce_sum(ctx, ctx.node("Where", [similar, dist_sq, dissimilar]))
    per_num = ctx.node("Div", [total, float_count(ctx, dist_sq)])
    ctx.node("Mul", [per_num, ctx.const(np.float32(0.5), "half")], [ctx.outputs[0]])
    ctx.set_output_shape(0, ())
