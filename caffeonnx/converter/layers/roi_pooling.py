"""ROIPooling: Fast/Faster R-CNN's ROIPoolingLayer (rbgirshick/caffe-fast-rcnn), max pooling per region.

Caffe's arithmetic: a ROI (batch, x1, y1, x2, y2) in image coordinates is scaled by spatial_scale
in float and rounded with C's round() (half away from zero); its size is max(end - start + 1, 1);
bin p of pooled_h covers rows [floor(p·bin), ceil((p+1)·bin)) + start with the float bin =
size / pooled_h, clipped to the map; the maximum starts from -FLT_MAX and an empty bin gives 0.

The layer becomes one ONNX MaxRoiPool node.  The ONNX spec leaves MaxRoiPool's rounding
unspecified, so this was checked rather than assumed: onnxruntime's CPU kernel carries exactly
the arithmetic above (its one divergence, starting each maximum from FLT_MIN instead of
-FLT_MAX, was fixed in onnxruntime PR #322, 2019), and tests/converter/layers/test_roi_layers.py
compares it bit for bit with a numpy transcription of Forward_cpu on half-integer coordinates,
ROIs outside the map, negative features and several scales.  Another runtime may round its own
way.  The trainer runs MaxRoiPool with the same arithmetic (caffeonnx/trainer/ops/roi.py) and
back-propagates to the features as Backward_cpu does: each top diff goes to its bin's maximum.
"""
from __future__ import annotations

import math

import numpy as np

from caffeonnx.converter.context import LayerContext, Shape
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


def check_features(ctx: LayerContext) -> Shape:
    """Bottom 0 is the N x C x H x W feature map."""
    shape = ctx.input_shapes[0]
    if len(shape) != 4 or min(shape[1:]) <= 0:
        raise ctx.error(f"feature blob {ctx.layer.bottom[0]!r} has shape {list(shape)}; it must be N x C x H x W")
    return shape


def rois_2d(ctx: LayerContext, index: int = 1) -> tuple[str, int]:
    """Bottom `index` as an R x 5 value (Caffe: 'ROI layer C x W x H must be == 5'), and R."""
    shape = ctx.input_shapes[index]
    if len(shape) < 2 or math.prod(shape[1:]) != 5:
        raise ctx.error(f"ROI blob {ctx.layer.bottom[index]!r} has shape {list(shape)}: ROI layer C x W x H must be "
                        "== 5 (batch index, x1, y1, x2, y2 per ROI, as R x 5 or R x 5 x 1 x 1)")
    rois = ctx.inputs[index]
    if len(shape) != 2:
        rois = ctx.node("Reshape", [rois, ctx.const(np.array([-1, 5], dtype=np.int64), "roi_shape")])
    return rois, shape[0]


@register_layer("ROIPooling", bottoms=2, tops=1, fork="fast-rcnn")
def convert_roi_pooling(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """ROIPooling: per ROI (batch, x1, y1, x2, y2)·spatial_scale, C-rounded, the max over each of pooled_h × pooled_w bins (empty bins 0)."""
    p = layer.roi_pooling_param
    if p.pooled_h <= 0 or p.pooled_w <= 0:
        raise ctx.error(f"pooled_h and pooled_w must be > 0 (got pooled_h {p.pooled_h!r}, pooled_w {p.pooled_w!r}); "
                        "give both, e.g. roi_pooling_param { pooled_h: 7 pooled_w: 7 spatial_scale: 0.0625 }")
    _, c, _, _ = check_features(ctx)
    rois, num = rois_2d(ctx)
    ctx.node("MaxRoiPool", [ctx.inputs[0], rois], [ctx.outputs[0]], pooled_shape=[int(p.pooled_h), int(p.pooled_w)],
             spatial_scale=float(np.float32(p.spatial_scale)))
    ctx.set_output_shape(0, (num, c, int(p.pooled_h), int(p.pooled_w)))
