"""Clip: Caffe's ClipLayer, y = max(min, min(x, max))."""
from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@register_layer("Clip", bottoms=1, tops=1)
def convert_clip(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Clip: y = max(min, min(x, max)); the gradient passes where min <= x <= max."""
    p = layer.clip_param
    missing = [f for f in ("min", "max") if not p.HasField(f)]
    if missing:
        raise ctx.error(f"clip_param is missing required field(s) {missing!r}; give both, e.g. "
                        "clip_param { min: -1 max: 1 }")
    lo, hi = np.float32(p.min), np.float32(p.max)
    x, out = ctx.inputs[0], ctx.outputs[0]
    if lo > hi:
        # Caffe's max(min, min(x, max)) is `min` everywhere (ONNX Clip would give `max`).
        fill = numpy_helper.from_array(np.array([lo], dtype=np.float32), "value")
        ctx.node("ConstantOfShape", [ctx.node("Shape", [x])], [out], value=fill)
    elif ctx.options.opset >= 11:
        ctx.node("Clip", [x, ctx.const(lo, "min"), ctx.const(hi, "max")], [out])
    else:
        ctx.node("Clip", [x], [out], min=float(lo), max=float(hi))
    ctx.set_output_shape(0, ctx.input_shapes[0])
