"""ReLU6: the MobileNet forks' ReLU clipped at 6 (MobileNet v2 ports)."""
from __future__ import annotations

import numpy as np

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


def _slope(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> float:
    """negative_slope from relu6_param (inisis/caffe, MobileNet-YOLO) or relu_param (NVIDIA's Caffe spells it so)."""
    own, nv = layer.relu6_param.HasField("negative_slope"), layer.relu_param.HasField("negative_slope")
    if own and nv and layer.relu6_param.negative_slope != layer.relu_param.negative_slope:
        raise ctx.error(f"relu6_param.negative_slope {layer.relu6_param.negative_slope!r} and relu_param.negative_slope "
                        f"{layer.relu_param.negative_slope!r} disagree; give the slope once, in relu6_param")
    return layer.relu_param.negative_slope if nv and not own else layer.relu6_param.negative_slope


@register_layer("ReLU6", bottoms=1, tops=1, fork="mobilenet")
def convert_relu6(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """ReLU6: y = min(max(x, 0) + negative_slope·min(x, 0), threshold) (defaults 0 and 6: min(max(x, 0), 6))."""
    slope = _slope(layer, ctx)
    x, out = ctx.inputs[0], ctx.outputs[0]
    # Relu then an upper Clip rather than Clip(x, 0, 6): the same values, and the Relu's gradient is
    # the forks' (x > 0) where a clamp's would also pass at x == 0.  At x == threshold exactly the
    # clamp passes the gradient where the forks' Backward_cpu (x < threshold) does not; an exact
    # Where(x >= threshold, ...) costs onnxruntime its Conv+Relu/Clip fusion (~5x on MobileNet v2 blocks).
    rect = ctx.node("LeakyRelu", [x], alpha=float(slope)) if slope else ctx.node("Relu", [x])
    threshold = float(np.float32(layer.relu6_param.threshold))
    if ctx.options.opset >= 11:
        ctx.node("Clip", [rect, "", ctx.const(np.float32(threshold), "threshold")], [out])
    else:
        ctx.node("Clip", [rect], [out], max=threshold)
    ctx.set_output_shape(0, ctx.input_shapes[0])
