"""BN: the per-channel batch normalisation with scale and shift of SegNet and of PSPNet.

Two forks define a layer type "BN", told apart by the bn_param fields the prototxt sets:

- SegNet (alexgkendall/caffe-segnet bn_layer.cpp; DeconvNet, ENet): bn_param { bn_mode,
  scale_filler, shift_filler }, two blobs scale and shift of shape (1, C, 1, 1).  LEARN
  normalises with the batch's statistics in every phase (mean E[x], variance E[x²] − E[x]²
  over N, H, W, eps 1e-9) and may expose them as tops 2 and 3 (1, C, 1, 1); INFERENCE is
  scale·x + shift (SegNet's compute_bn_statistics.py folds the statistics into those blobs).
  The legacy accessors make the top (N, C, H, W), 1 for missing axes.
- PSPNet (hszhao/PSPNet bn_layer.cpp): bn_param { slope_filler, bias_filler, momentum, eps,
  frozen }, four blobs slope, bias, running mean, running variance of shape (1, C, 1, 1).
  TEST or frozen uses the stored statistics, TRAIN the batch's (variance E[(x − E[x])²]),
  as (x − mean)·(var + eps)^−½·slope + bias.  Setup forces lr_mult and decay_mult 0 on the
  statistics, and on slope and bias too when frozen, whatever the prototxt says.  cuDNN's
  engine raises eps to 1e-5 at least; this follows the CPU layer (equal at the default eps).
  The moving averages a non-frozen TRAIN pass accumulates are not in the graph: the trainer's
  GraphModule updates blobs 2 and 3 (its PSPNet BN override).

A bn_param with neither fork's fields is SegNet's (LEARN).  Every variant is built from
elementwise ONNX ops, so autograd gives Caffe's backward, batch-statistics terms included.
"""
from __future__ import annotations

import numpy as np

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.fillers import constant_filler
from caffeonnx.converter.forks import PSPNET_BN_FIELDS
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2

B = caffe_pb2.BNParameter
_SEGNET_FIELDS = ("bn_mode", "scale_filler", "shift_filler")
_SEGNET_EPS = np.float32(1e-9)  # BNLayer::LayerSetUp's var_eps_
_FIXED = caffe_pb2.ParamSpec(lr_mult=0.0, decay_mult=0.0)  # what PSPNet's setup writes over the prototxt's spec


def _legacy_input(ctx: LayerContext) -> tuple[str, tuple[int, int, int, int]]:
    """The bottom as Caffe's num/channels/height/width see it: 4-D, 1 for missing axes."""
    shape = ctx.input_shapes[0]
    if not 1 <= len(shape) <= 4:
        raise ctx.error(f"input shape {list(shape)!r} has {len(shape)} axes; BN reads (num, channels, height, width) "
                        "and takes at most 4")
    num, channels, height, width = (*shape, 1, 1, 1)[:4]
    legacy = (num, channels, height, width)
    x = ctx.inputs[0]
    return (x if len(shape) == 4 else ctx.reshape(x, shape, legacy)), legacy


@register_layer("BN", bottoms=1, tops=(1, 3), fork="segnet", params=True)
def convert_bn(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """BN: scale·x̂ + shift per channel, x̂ from batch statistics (SegNet LEARN, PSPNet TRAIN) or stored ones."""
    p = layer.bn_param
    segnet = [f for f in _SEGNET_FIELDS if p.HasField(f)]
    pspnet = [f for f in PSPNET_BN_FIELDS if p.HasField(f)]
    if segnet and pspnet:
        raise ctx.error(f"bn_param mixes SegNet's BN fields ({', '.join(segnet)}) with PSPNet's ({', '.join(pspnet)}); "
                        "they are two different layers: keep the fields of the fork the model was trained with")
    if pspnet:
        _pspnet(layer, ctx)
    else:
        _segnet(layer, ctx)


def _segnet(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    p = layer.bn_param
    learn = p.bn_mode == B.LEARN
    if not learn and len(layer.top) > 1:
        raise ctx.error(f"BN in INFERENCE mode has 1 top (the batch mean and variance tops exist in LEARN mode "
                        f"only); it has {len(layer.top)}")
    x, (num, channels, height, width) = _legacy_input(ctx)
    blob = (1, channels, 1, 1)
    scale = ctx.param(0, blob, "scale", p.scale_filler)
    shift = ctx.param(1, blob, "shift", p.shift_filler)
    out = ctx.outputs[0]
    if not learn:
        ctx.node("Add", [ctx.node("Mul", [x, scale]), shift], [out])
    else:
        axes = [0, 2, 3]
        extra = list(ctx.outputs[1:])
        mean = ctx.reduce("ReduceMean", x, axes, output=extra[0] if extra else None, keepdims=1)
        mean_sq = ctx.reduce("ReduceMean", ctx.node("Mul", [x, x]), axes, keepdims=1)
        var = ctx.node("Sub", [mean_sq, ctx.node("Mul", [mean, mean])], [extra[1]] if len(extra) > 1 else None)
        std = ctx.node("Sqrt", [ctx.node("Add", [var, ctx.const(_SEGNET_EPS, "eps")])])
        normed = ctx.node("Div", [ctx.node("Sub", [x, mean]), std])
        ctx.node("Add", [ctx.node("Mul", [normed, scale]), shift], [out])
        for i in range(1, len(layer.top)):
            ctx.set_output_shape(i, blob)
    ctx.set_output_shape(0, (num, channels, height, width))


def _pspnet(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    p = layer.bn_param
    if len(layer.top) != 1:
        raise ctx.error(f"PSPNet's BN Layer produces 1 top blob as output; it has {len(layer.top)}")
    shape = ctx.input_shapes[0]
    x, (_, channels, _, _) = _legacy_input(ctx)
    blob = (1, channels, 1, 1)
    frozen = _FIXED if p.frozen else None
    slope = ctx.param(0, blob, "slope", p.slope_filler, forced=frozen)
    bias = ctx.param(1, blob, "bias", p.bias_filler, forced=frozen)
    mean = ctx.param(2, blob, "mean", constant_filler(0.0), forced=_FIXED)
    var = ctx.param(3, blob, "variance", constant_filler(1.0 if p.frozen else 0.0), forced=_FIXED)
    if not (p.frozen or ctx.options.phase == caffe_pb2.TEST):
        axes = [0, 2, 3]
        mean = ctx.reduce("ReduceMean", x, axes, keepdims=1)
        centred = ctx.node("Sub", [x, mean])
        var = ctx.reduce("ReduceMean", ctx.node("Mul", [centred, centred]), axes, keepdims=1)
    else:
        centred = ctx.node("Sub", [x, mean])
    inv_std = ctx.node("Pow", [ctx.node("Add", [var, ctx.const(np.float32(p.eps), "eps")]),
                               ctx.const(np.float32(-0.5), "minus_half")])
    scaled = ctx.node("Mul", [ctx.node("Mul", [centred, inv_std]), slope])
    if len(shape) == 4:
        ctx.node("Add", [scaled, bias], [ctx.outputs[0]])
    else:  # Caffe's top is ReshapeLike(bottom)
        ctx.reshape(ctx.node("Add", [scaled, bias]), (*shape, 1, 1, 1)[:4], shape, output=ctx.outputs[0])
    ctx.set_output_shape(0, shape)
