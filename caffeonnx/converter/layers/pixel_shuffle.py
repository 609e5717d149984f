"""PixelShuffle: sub-pixel upsampling (ESPCN), as the Caffe forks that add it compute it."""
from __future__ import annotations

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


def _upscale_factor(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> int:
    """upscale_factor from pixelshuffle_param (inisis/caffe) or pixel_shuffle_param (gait_extractor's Caffe)."""
    if layer.HasField("pixelshuffle_param") and layer.HasField("pixel_shuffle_param"):
        raise ctx.error("both pixelshuffle_param (inisis/caffe's spelling) and pixel_shuffle_param are given; keep "
                        "the one your Caffe reads")
    p = layer.pixel_shuffle_param if layer.HasField("pixel_shuffle_param") else layer.pixelshuffle_param
    if not p.HasField("upscale_factor"):
        raise ctx.error("upscale factor must be specified for PixelShuffle: give pixel_shuffle_param "
                        "{ upscale_factor: 2 } (or pixelshuffle_param, as inisis/caffe spells it)")
    if p.upscale_factor <= 0:
        raise ctx.error(f"upscale_factor {p.upscale_factor!r} must be positive")
    return p.upscale_factor


@register_layer("PixelShuffle", bottoms=1, tops=1, fork="pixel-shuffle")
def convert_pixel_shuffle(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """PixelShuffle: [N, C·r², H, W] -> [N, C, H·r, W·r]; top (c, h·r + i, w·r + j) = bottom (c·r² + i·r + j, h, w)."""
    r = _upscale_factor(layer, ctx)
    shape = ctx.input_shapes[0]
    if len(shape) != 4:
        raise ctx.error(f"the bottom {list(shape)} is {len(shape)}-D; PixelShuffle takes N x C x H x W blobs")
    n, ch, h, w = shape
    if ch % (r * r):
        raise ctx.error(f"the bottom's {ch} channels are not a multiple of upscale_factor² ({r}² = {r * r}); the "
                        "channels feeding PixelShuffle must be C·r²")
    c = ch // (r * r)
    x, out = ctx.inputs[0], ctx.outputs[0]
    if ctx.options.opset >= 11:  # the forks' order is DepthToSpace's CRD mode (PyTorch's pixel_shuffle)
        ctx.node("DepthToSpace", [x], [out], blocksize=r, mode="CRD")
    else:  # DCR is the only mode before opset 11: spell CRD out
        blocks = ctx.node("Transpose", [ctx.reshape(x, shape, (n, c, r, r, h, w))], perm=[0, 1, 4, 2, 5, 3])
        ctx.reshape(blocks, (n, c, h, r, w, r), (n, c, h * r, w * r), out)
    ctx.set_output_shape(0, (n, c, h * r, w * r))
