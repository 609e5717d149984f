"""BatchNormalization and LRN as Caffe BatchNorm + Scale and LRN."""
from __future__ import annotations

import numpy as np

from caffeonnx.converter.foreign.context import NodeContext
from caffeonnx.converter.foreign.registry import register_op
from caffeonnx.proto import caffe_pb2


@register_op("BatchNormalization")
def emit_batch_norm(ctx: NodeContext) -> None:
    """BatchNormalization (inference) -> BatchNorm (global stats; blobs mean, var, [1]) + Scale (gamma, beta)."""
    if ctx.attr("training_mode", 0) or (ctx.attr("is_test") == 0 and ctx.opset < 7):
        raise ctx.unsupported("training mode computes batch statistics; export the model in eval mode")
    if not ctx.attr("spatial", 1):
        raise ctx.unsupported("spatial=0 keeps statistics per position; Caffe's BatchNorm keeps them per channel")
    shape = ctx.shape(0)
    if len(shape) < 2:
        raise ctx.error(f"input shape {list(shape)!r} has no channel axis")
    channels = shape[1]
    params = [c for c in (ctx.const(i) for i in (1, 2, 3, 4)) if c is not None]
    if len(params) != 4:
        raise ctx.unsupported("scale, bias, mean and variance must be constants (initializers)")
    for what, c in zip(("scale", "B", "mean", "var"), params):
        if c.value.size != channels:
            raise ctx.error(f"{what} has {c.value.size} values for {channels} channels")
    gamma, beta, mean, var = params
    normed = ctx.temp("normalized")
    bn = ctx.layer("BatchNorm", [ctx.blob(0)], [normed])
    bn.batch_norm_param.use_global_stats = True
    bn.batch_norm_param.eps = float(ctx.attr("epsilon", 1e-5))
    for blob in (mean.value.reshape(-1), var.value.reshape(-1), np.ones(1, dtype=np.float32)):
        ctx.fixed_param(bn, blob)
    scale = ctx.layer("Scale", [normed], [ctx.output()])
    scale.scale_param.bias_term = True
    ctx.param(scale, gamma.value.reshape(-1), "scale", gamma.source if gamma.same_order() else None)
    ctx.param(scale, beta.value.reshape(-1), "bias", beta.source if beta.same_order() else None)


@register_op("LRN")
def emit_lrn(ctx: NodeContext) -> None:
    """LRN -> LRN across channels: x / (bias + alpha/size · Σx²)^beta over `size` neighbouring channels."""
    if len(ctx.shape(0)) != 4:
        raise ctx.unsupported(f"input shape {list(ctx.shape(0))!r} is not (N, C, H, W) as Caffe's LRN needs")
    size = int(ctx.attr("size"))
    if size % 2 == 0:
        raise ctx.unsupported(f"size {size} is even; Caffe's LRN needs an odd local_size (a centred window)")
    layer = ctx.layer("LRN", [ctx.blob(0)], [ctx.output()])
    p = layer.lrn_param
    p.local_size = size
    p.alpha = float(ctx.attr("alpha", 1e-4))
    p.beta = float(ctx.attr("beta", 0.75))
    p.k = float(ctx.attr("bias", 1.0))
    p.norm_region = caffe_pb2.LRNParameter.ACROSS_CHANNELS
