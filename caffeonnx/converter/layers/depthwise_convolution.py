"""The forks' depthwise convolution layer types, which BVLC writes as Convolution with group = channels.

`DepthwiseConvolution` (yonghenglh6/DepthwiseConvolution) is BVLC's ConvolutionLayer with
a faster GPU kernel: same parameters, same blobs, its own `group`.  `ConvolutionDepthwise`
(farmingyard/caffe-mobilenet, conv_dw_layer.cpp) ignores num_output and group: one k×k
filter per input channel, weight [C, 1, kh, kw], bias [C], output channels = C, 2-D only.
"""
from __future__ import annotations

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.layers.convolution import convert_convolution
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@register_layer("DepthwiseConvolution", bottoms=(1, None), tops=(1, None), equal=True, fork="mobilenet",
                params=True)
def convert_depthwise_convolution(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """DepthwiseConvolution: exactly Convolution (its group, usually = channels), a faster kernel in that fork."""
    convert_convolution(layer, ctx)


@register_layer("ConvolutionDepthwise", bottoms=1, tops=1, fork="mobilenet", params=True)
def convert_convolution_depthwise(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """ConvolutionDepthwise: y[c] = w[c] ⋆ x[c] + b[c] per channel; num_output and group are ignored."""
    shape = ctx.input_shapes[0]
    if len(shape) != 4:
        raise ctx.error(f"ConvolutionDepthwise works on 4-D blobs (N, C, H, W); the bottom is {list(shape)!r}")
    as_grouped = caffe_pb2.LayerParameter()
    as_grouped.CopyFrom(layer)
    p = as_grouped.convolution_param
    p.num_output = p.group = shape[1]
    p.axis = 1
    if not p.stride and not p.HasField("stride_h"):
        p.stride.append(1)
    convert_convolution(as_grouped, ctx)
