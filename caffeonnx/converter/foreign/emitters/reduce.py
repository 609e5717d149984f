"""ReduceMean/Max/Sum/L1/SumSquare as Caffe Pooling (global, over H and W) or Reduction (trailing axes).

Caffe's Reduction always reduces every axis from `axis` to the end and drops them; a
kept-dims result is restored with a Reshape.  Spatial means and maxima of (N, C, H, W)
blobs (what adaptive pooling to 1x1 exports as) are global Pooling layers.
"""
from __future__ import annotations

from caffeonnx.converter.foreign.caffe_layers import reshape
from caffeonnx.converter.foreign.context import NodeContext
from caffeonnx.converter.foreign.registry import register_op
from caffeonnx.proto import caffe_pb2

_REDUCTION = {"ReduceMean": caffe_pb2.ReductionParameter.MEAN, "ReduceSum": caffe_pb2.ReductionParameter.SUM,
              "ReduceL1": caffe_pb2.ReductionParameter.ASUM, "ReduceSumSquare": caffe_pb2.ReductionParameter.SUMSQ}


def _axes(ctx: NodeContext, rank: int) -> list[int]:
    """The reduced axes, sorted and non-negative (all axes when none are given)."""
    from_input = ctx.op == "ReduceSum" and ctx.opset >= 13 or ctx.opset >= 18
    if from_input and ctx.has_input(1):
        c = ctx.const(1)
        if c is None:
            raise ctx.unsupported("the axes are computed; Caffe needs them fixed")
        axes = [int(a) for a in c.value.reshape(-1)]
    else:
        axes = list(ctx.attr("axes", []))
    if not axes:
        if ctx.attr("noop_with_empty_axes", 0):
            return []
        axes = list(range(rank))
    return sorted(a % rank for a in axes)


@register_op("ReduceMean", "ReduceMax", "ReduceSum", "ReduceL1", "ReduceSumSquare")
def emit_reduce(ctx: NodeContext) -> None:
    """ReduceMax, ReduceMean (H, W) -> global Pooling; ReduceMean, ReduceSum, ReduceL1, ReduceSumSquare -> Reduction."""
    shape, out = ctx.shape(0), ctx.out_shape()
    axes = _axes(ctx, len(shape))
    if not axes:
        ctx.alias(0, ctx.blob(0))
        return
    pooled_shape = (*shape[:2], 1, 1)
    if ctx.op in ("ReduceMean", "ReduceMax") and len(shape) == 4 and axes == [2, 3]:
        top = ctx.output() if out == pooled_shape else ctx.temp("pooled")
        p = ctx.layer("Pooling", [ctx.blob(0)], [top]).pooling_param
        p.pool = caffe_pb2.PoolingParameter.AVE if ctx.op == "ReduceMean" else caffe_pb2.PoolingParameter.MAX
        p.global_pooling = True
        if top != ctx.output():
            reshape(ctx, top, pooled_shape, out, ctx.output())
        return
    if ctx.op not in _REDUCTION or axes != list(range(axes[0], len(shape))):
        raise ctx.unsupported(
            f"axes {axes!r} of a {len(shape)}-D input: Caffe reduces either all trailing axes (Reduction: mean, sum, "
            "L1, sum of squares) or H and W of (N, C, H, W) (global Pooling: mean, max)"
        )
    reduced = shape[:axes[0]]
    top = ctx.output() if out == reduced else ctx.temp("reduced")
    p = ctx.layer("Reduction", [ctx.blob(0)], [top]).reduction_param
    p.operation = _REDUCTION[ctx.op]
    p.axis = axes[0]
    if top != ctx.output():
        reshape(ctx, top, reduced, out, ctx.output())
