"""Dropout: random masking while training, the identity at inference."""
from __future__ import annotations

import numpy as np

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@register_layer("Dropout", bottoms=1, tops=1)
def convert_dropout(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Dropout: identity in TEST; in TRAIN zeroes x with probability dropout_ratio, scales the rest by 1/(1-ratio)."""
    ratio = layer.dropout_param.dropout_ratio
    if not 0 < ratio < 1:
        raise ctx.error(f"dropout_param.dropout_ratio must be in (0, 1), got {ratio!r}")
    # ONNX Dropout has Caffe's inverted-dropout semantics and is the identity unless
    # training_mode is fed; keeping the node (not an Identity) keeps the ratio for training.
    x, out = ctx.inputs[0], ctx.outputs[0]
    if ctx.options.opset >= 12:
        ctx.node("Dropout", [x, ctx.const(np.array(ratio, dtype=np.float32), "ratio")], [out])
    else:
        ctx.node("Dropout", [x], [out], ratio=ratio)
    ctx.set_output_shape(0, ctx.input_shapes[0])
