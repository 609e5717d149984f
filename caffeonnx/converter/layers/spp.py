"""SPP: Caffe's SPPLayer, a spatial pyramid of poolings, flattened and concatenated.

Level l (0 ≤ l < pyramid_height) pools with 2^l bins per axis: kernel = ceil(H / 2^l),
stride = kernel, pad = (kernel·2^l - H + 1) / 2 (integer), per axis, exactly as
SPPLayer::GetPoolingParam builds its PoolingParameter; each level runs through the Pooling
handler, so Caffe's pooling border rules and checks apply (a pad reaching the kernel is
refused there, as Caffe's PoolingLayer refuses it).  With pyramid_height 1 the top is the
single pooling's (N, C, 1, 1); otherwise the levels are flattened to (N, C·bins) and
concatenated on axis 1.
"""
from __future__ import annotations

import math

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.layers.pooling import convert_pooling
from caffeonnx.converter.registry import register_layer
from caffeonnx.errors import LayerError
from caffeonnx.proto import caffe_pb2

S = caffe_pb2.SPPParameter
_POOL = {S.MAX: caffe_pb2.PoolingParameter.MAX, S.AVE: caffe_pb2.PoolingParameter.AVE,
         S.STOCHASTIC: caffe_pb2.PoolingParameter.STOCHASTIC}


def level_pooling(level: int, height: int, width: int, pool: int) -> caffe_pb2.PoolingParameter:
    """The PoolingParameter of pyramid level `level` (Caffe's SPPLayer::GetPoolingParam)."""
    bins = 2**level
    kernel_h, kernel_w = -(-height // bins), -(-width // bins)
    pad_h, pad_w = (kernel_h * bins - height + 1) // 2, (kernel_w * bins - width + 1) // 2
    return caffe_pb2.PoolingParameter(pool=_POOL[pool], kernel_h=kernel_h, kernel_w=kernel_w, stride_h=kernel_h,
                                      stride_w=kernel_w, pad_h=pad_h, pad_w=pad_w)


def _pool_level(ctx: LayerContext, level: int, output: str | None) -> tuple[str, tuple[int, ...]]:
    """Run level `level`'s pooling through the Pooling handler; returns its output and shape."""
    layer = ctx.layer
    shape = ctx.input_shapes[0]
    sub = caffe_pb2.LayerParameter(name=layer.name, type="Pooling", bottom=[layer.bottom[0]],
                                   top=[layer.top[0] if output else f"{layer.top[0]}/level{level}"])
    sub.pooling_param.CopyFrom(level_pooling(level, shape[2], shape[3], layer.spp_param.pool))
    out = output or ctx.builder.unique(f"{layer.name}/level{level}")
    sub_ctx = LayerContext(ctx.builder, sub, [ctx.inputs[0]], [out], None, None, ctx.position)
    try:
        convert_pooling(sub, sub_ctx)
    except LayerError as exc:
        raise ctx.error(f"pyramid level {level} (kernel {sub.pooling_param.kernel_h}x{sub.pooling_param.kernel_w}, "
                        f"pad {sub.pooling_param.pad_h}x{sub.pooling_param.pad_w} on a {shape[2]}x{shape[3]} input): "
                        f"{str(exc).split('): ', 1)[-1]}; use a larger input or a lower pyramid_height") from None
    return out, ctx.builder.shapes[out]


@register_layer("SPP", bottoms=1, tops=1)
def convert_spp(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """SPP: pyramid_height levels of 2^l × 2^l-bin pooling (MAX/AVE), flattened and concatenated on axis 1."""
    p = layer.spp_param
    shape = ctx.input_shapes[0]
    if len(shape) != 4:
        raise ctx.error(f"Input must have 4 axes, corresponding to (num, channels, height, width); bottom "
                        f"{layer.bottom[0]!r} has shape {list(shape)}")
    if shape[2] <= 0 or shape[3] <= 0:
        raise ctx.error(f"Input dimensions cannot be zero: bottom {layer.bottom[0]!r} has shape {list(shape)}")
    if p.pool not in _POOL:
        raise ctx.error(f"unknown spp_param.pool {p.pool!r}; use MAX, AVE or STOCHASTIC")
    if p.pyramid_height < 1:
        raise ctx.error(f"spp_param.pyramid_height is {p.pyramid_height!r}; give at least 1 level "
                        "(Caffe's Concat of no levels fails)")
    if p.pyramid_height == 1:
        _, out_shape = _pool_level(ctx, 0, ctx.outputs[0])
        ctx.set_output_shape(0, out_shape)
        return
    flats = []
    width = 0
    for level in range(p.pyramid_height):
        pooled, pooled_shape = _pool_level(ctx, level, None)
        flat = (pooled_shape[0], math.prod(pooled_shape[1:]))
        flats.append(ctx.reshape(pooled, pooled_shape, flat))
        width += flat[1]
    ctx.node("Concat", flats, [ctx.outputs[0]], axis=1)
    ctx.set_output_shape(0, (shape[0], width))
