"""Embed: a lookup table (one-hot InnerProduct) indexed by the input's values."""
from __future__ import annotations

from onnx import TensorProto

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@register_layer("Embed", bottoms=1, tops=1, params=True)
def convert_embed(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Embed: y[..., :] = W[int(x[...]), :] (+ b); W is input_dim × num_output, output adds an axis."""
    p = layer.embed_param
    if p.num_output <= 0:
        raise ctx.error(f"embed_param.num_output is {p.num_output!r}; set it to the embedding width (> 0)")
    if p.input_dim <= 0:
        raise ctx.error(f"embed_param.input_dim is {p.input_dim!r}; set it to the vocabulary size (> 0)")
    shape = ctx.input_shapes[0]
    # Caffe stores the table transposed from InnerProduct (K × N) so that a row is one embedding.
    weight = ctx.param(0, (p.input_dim, p.num_output), "weight", p.weight_filler)
    bias = ctx.param(1, (p.num_output,), "bias", p.bias_filler) if p.bias_term else None
    index = ctx.inputs[0]
    if ctx.builder.dtypes.get(index, TensorProto.FLOAT) != TensorProto.INT64:
        # Caffe's blobs hold the indices as floats and truncate them (static_cast<int>).
        index = ctx.node("Cast", [index], to=TensorProto.INT64)
    out = ctx.outputs[0]
    if bias is None:
        ctx.node("Gather", [weight, index], [out], axis=0)
    else:
        ctx.node("Add", [ctx.node("Gather", [weight, index], axis=0), bias], [out])
    ctx.set_output_shape(0, (*shape, p.num_output))
