"""Parameter: Caffe's ParameterLayer, a learnable blob exposed as the layer's top."""
from __future__ import annotations

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2

# Caffe only reshapes the blob (no filler): fresh memory is zeroed, so an untrained blob is all 0.
_ZEROS = caffe_pb2.FillerParameter(type="constant", value=0.0)


@register_layer("Parameter", bottoms=0, tops=1, params=True)
def convert_parameter(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Parameter: top = the layer's one learnable blob of shape parameter_param.shape (zeros unless trained)."""
    shape = tuple(int(d) for d in layer.parameter_param.shape.dim)
    if any(d < 0 for d in shape):
        raise ctx.error(f"parameter_param.shape {list(shape)!r} has a negative dimension")
    value = ctx.param(0, shape, "blob", _ZEROS)
    ctx.node("Identity", [value], [ctx.outputs[0]])
    ctx.set_output_shape(0, shape)
