"""Normalisation layers: BatchNorm (stored or batch statistics) and LRN (both regions)."""
from __future__ import annotations

import numpy as np

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.fillers import constant_filler
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


# Caffe's BatchNorm setup gives each statistic blob without a ParamSpec `lr_mult: 0`, so
# the solver never updates them; the converted model records that without editing the net.
_FROZEN = caffe_pb2.ParamSpec(lr_mult=0.0)


def _check_statistics_specs(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Refuse a given ParamSpec with non-zero lr_mult, as Caffe does."""
    for i, spec in enumerate(layer.param[:3]):
        if spec.lr_mult != 0:
            raise ctx.error(
                f"param {i} has lr_mult {spec.lr_mult!r}; Caffe refuses it (Cannot configure batch "
                "normalization statistics as layer parameters): set lr_mult: 0 or drop the param spec"
            )


@register_layer("BatchNorm", bottoms=1, tops=1, params=True)
def convert_batch_norm(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """BatchNorm: y = (x - mean) / sqrt(var + eps) per channel (axis 1), stored stats scaled by 1/s."""
    p = layer.batch_norm_param
    shape = ctx.input_shapes[0]
    if len(shape) < 2:
        raise ctx.error(f"input shape {list(shape)!r} has no channel axis; BatchNorm needs (N, C, ...)")
    channels = shape[1]
    _check_statistics_specs(layer, ctx)
    zeros = constant_filler(0.0)  # Caffe zero-initialises the statistics
    mean_acc = ctx.param(0, (channels,), "mean", zeros, default_spec=_FROZEN)
    var_acc = ctx.param(1, (channels,), "variance", zeros, default_spec=_FROZEN)
    factor_acc = ctx.param(2, (1,), "moving_average_factor", zeros, default_spec=_FROZEN)
    use_global_stats = p.use_global_stats if p.HasField("use_global_stats") else ctx.options.phase == caffe_pb2.TEST
    x, out = ctx.inputs[0], ctx.outputs[0]
    eps = np.float32(p.eps)
    if use_global_stats:
        # The blobs hold running sums weighted by s; Caffe divides by s (0 when s is 0).
        zero = ctx.const(np.zeros(1, np.float32), "zero")
        inv = ctx.node("Where", [ctx.node("Equal", [factor_acc, zero]), zero, ctx.node("Reciprocal", [factor_acc])])
        mean = ctx.node("Mul", [mean_acc, inv])
        var = ctx.node("Mul", [var_acc, inv])
        gamma = ctx.const(np.ones(channels, np.float32), "gamma")
        beta = ctx.const(np.zeros(channels, np.float32), "beta")
        ctx.node("BatchNormalization", [x, gamma, beta, mean, var], [out], epsilon=float(eps))
    else:
        # Batch statistics over every axis but the channel; Caffe's variance is the biased one.
        axes = [0, *range(2, len(shape))]
        centred = ctx.node("Sub", [x, ctx.reduce("ReduceMean", x, axes, keepdims=1)])
        var = ctx.reduce("ReduceMean", ctx.node("Mul", [centred, centred]), axes, keepdims=1)
        std = ctx.node("Sqrt", [ctx.node("Add", [var, ctx.const(eps, "eps")])])
        ctx.node("Div", [centred, std], [out])
    ctx.set_output_shape(0, shape)


@register_layer("LRN", bottoms=1, tops=1)
def convert_lrn(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """LRN: x·(k + α/n·Σ x²)^-β over n channels, or x·(1 + α·mean_{n×n} x²)^-β within a channel."""
    p = layer.lrn_param
    shape = ctx.input_shapes[0]
    if len(shape) != 4:
        raise ctx.error(f"input shape {list(shape)!r} has {len(shape)} axes; Caffe's LRN needs (N, C, H, W)")
    size = p.local_size
    if size % 2 != 1:
        raise ctx.error(f"local_size {size!r} is even; Caffe's LRN only supports odd values (use {size + 1})")
    x, out = ctx.inputs[0], ctx.outputs[0]
    if p.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS:
        # ONNX LRN sums the zero-padded window [c - (n-1)/2, c + (n-1)/2] and scales by alpha/n, as Caffe.
        ctx.node("LRN", [x], [out], size=size, alpha=p.alpha, beta=p.beta, bias=p.k)
    else:
        # Caffe composes square -> AVE pool (n×n, pad (n-1)/2, divisor n² including padding)
        # -> power(shift 1, scale alpha, power -beta) -> product with x; k is not used.
        pad = (size - 1) // 2
        square = ctx.node("Mul", [x, x])
        pooled = ctx.node(
            "AveragePool", [square], kernel_shape=[size, size], pads=[pad] * 4, strides=[1, 1], count_include_pad=1
        )
        scaled = ctx.node("Mul", [pooled, ctx.const(np.float32(p.alpha), "alpha")])
        shifted = ctx.node("Add", [scaled, ctx.const(np.float32(1.0), "one")])
        denominator = ctx.node("Pow", [shifted, ctx.const(np.float32(-p.beta), "neg_beta")])
        ctx.node("Mul", [x, denominator], [out])
    ctx.set_output_shape(0, shape)
