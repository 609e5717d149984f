"""Proposal: Faster R-CNN's RPN proposal layer, as py-faster-rcnn computes it.

Two spellings reach this handler: OpenCV's C++ `type: "Proposal"` with proposal_param, and
py-faster-rcnn's `type: "Python"` layer with python_param { module: "rpn.proposal_layer" layer:
"ProposalLayer" param_str: "'feat_stride': 16" } (its settings are py-faster-rcnn's cfg: TEST
pre_nms_topN 6000, post_nms_topN 300, nms_thresh 0.7, min_size 16; TRAIN 12000, 2000, 0.7, 16;
param_str may also give `scales`, as py-faster-rcnn's master reads, and `ratios`/`base_size`).
Both compute rpn/proposal_layer.py's forward for image 0 (py-faster-rcnn asserts a batch of 1),
entirely inside the ONNX graph:

1. anchors: generate_anchors.py's A = len(ratios)·len(scales) boxes (float64, numpy's half-to-even
   rounding; computed here at conversion time with the same numpy code) shifted by feat_stride
   per cell, ordered (h, w, a), then as float32;
2. bbox_transform_inv with +1 widths (float32), clipped to [0, cols - 1] × [0, rows - 1] of
   im_info; boxes narrower or lower than min_size·im_info[2] dropped;
3. the rest sorted by foreground score (channels A..2A of bottom 0), the first pre_nms_topN kept;
4. greedy NMS with py-faster-rcnn's IoU (float boxes, +1 sides), suppressing IoU > nms_thresh as
   the GPU kernel nms_kernel.cu does (its default USE_GPU_NMS), at most post_nms_topN kept;
5. top 0 rois [R, 5] = (0, x1, y1, x2, y2), top 1 scores [R, 1]; R is known only at run time.

Exactness.  Anchors, box arithmetic, clipping, the filter and the sort use the float operations
of the Python code in the same order.  Three things are not bit-exact:
- NMS is ONNX NonMaxSuppression, whose IoU has no +1, on boxes whose far corners are moved out by
  1.  In exact arithmetic that is py-faster-rcnn's IoU; in float the +1 is rounded at another
  step (and x2 + 1 itself rounds just below a power of two), so an IoU may differ by a few
  hundred float ulps: measured at most 3.6e-6 for boxes of at least 16 px in a 1000 px image.
  A pair whose IoU lies that close to nms_thresh can be decided the other way.  (An exact greedy
  NMS needs an ONNX Loop, which the trainer cannot run; the converter's graphs must stay runnable
  there.)  nms_thresh is compared in float with `>`, as the GPU kernel; py-faster-rcnn's CPU NMS
  (`--cpu`) suppresses IoU >= thresh in double, which differs only for an IoU exactly equal to a
  threshold float32 represents exactly (0.5; not 0.7).
- exp() of the size deltas: numpy and onnxruntime use their own float approximations (an ulp or
  two apart), so a corner may differ by an ulp (3e-5 at 600 px) and a side within that of
  min_size·im_info[2] may be filtered the other way.
- Equal scores are ordered by onnxruntime's TopK and NonMaxSuppression (numpy's argsort leaves
  their order unspecified).
OpenCV's own Proposal layer approximates this differently (no min_size filter, SSD-style box
decoding and NMS); this handler follows py-faster-rcnn, the code these models were trained with.
py-faster-rcnn's backward is empty; here the ROI layers that read the rois pass no gradient into
them either (ROIPooling and PSROIPooling read their coordinates as constants).
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, numpy_helper

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.errors import UnsupportedError
from caffeonnx.proto import caffe_pb2

PYTHON_MODULE = "rpn.proposal_layer"
PYTHON_LAYER = "ProposalLayer"
DEFAULT_RATIOS = (0.5, 1.0, 2.0)
DEFAULT_SCALES = (8.0, 16.0, 32.0)
# py-faster-rcnn's lib/fast_rcnn/config.py: RPN_PRE_NMS_TOP_N, RPN_POST_NMS_TOP_N, RPN_NMS_THRESH, RPN_MIN_SIZE
CFG = {caffe_pb2.TEST: (6000, 300, 0.7, 16), caffe_pb2.TRAIN: (12000, 2000, 0.7, 16)}
_PARAM_KEYS = ("feat_stride", "scales", "ratios", "base_size")


@dataclass(frozen=True)
class ProposalSpec:
    """The proposal layer's settings, whichever spelling gave them."""

    feat_stride: int
    base_size: int
    ratios: tuple[float, ...]
    scales: tuple[float, ...]
    pre_nms_topn: int  # <= 0: keep all
    post_nms_topn: int  # <= 0: keep all
    nms_thresh: float
    min_size: float


def generate_anchors(base_size: int, ratios: tuple[float, ...], scales: tuple[float, ...]) -> np.ndarray:
    """py-faster-rcnn's generate_anchors: [A, 4] float64 (x1, y1, x2, y2), ratio-major.

    The base box is (0, 0, base_size - 1, base_size - 1); for each ratio its width is
    round(sqrt(w·h / ratio)) and its height round(width·ratio) (np.round: half to even), then each
    is scaled about the centre; corners are centre ∓ (size - 1) / 2.
    """
    def whctr(box: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        w, h = box[..., 2] - box[..., 0] + 1, box[..., 3] - box[..., 1] + 1
        return w, h, box[..., 0] + 0.5 * (w - 1), box[..., 1] + 0.5 * (h - 1)

    def corners(ws: np.ndarray, hs: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
        return np.stack([cx - 0.5 * (ws - 1), cy - 0.5 * (hs - 1), cx + 0.5 * (ws - 1), cy + 0.5 * (hs - 1)], axis=-1)

    base = np.array([1, 1, base_size, base_size], dtype=np.float64) - 1
    w, h, cx, cy = whctr(base)
    r = np.asarray(ratios, dtype=np.float64)
    ws = np.round(np.sqrt(w * h / r))
    per_ratio = corners(ws, np.round(ws * r), cx, cy)  # [len(ratios), 4]
    w, h, cx, cy = whctr(per_ratio)
    s = np.asarray(scales, dtype=np.float64)
    return corners(w[:, None] * s, h[:, None] * s, cx[:, None], cy[:, None]).reshape(-1, 4)


def _param_str(ctx: LayerContext, text: str) -> dict[str, object]:
    """py-faster-rcnn's param_str (YAML: "'feat_stride': 16", or a {...} mapping) as a dict."""
    body = text.strip()
    try:
        import yaml

        value = yaml.safe_load(body) if body else {}
    except ImportError:  # the usual spellings are Python literals too
        try:
            value = ast.literal_eval(body if body.startswith("{") else "{" + body + "}") if body else {}
        except (ValueError, SyntaxError):
            value = None
    except Exception:  # noqa: BLE001 - yaml's errors: whatever does not parse is reported below
        value = None
    if not isinstance(value, dict):
        raise ctx.error(f"python_param.param_str {text!r} is not a mapping; py-faster-rcnn's proposal layer reads "
                        "YAML such as \"'feat_stride': 16\"")
    unknown = sorted(str(k) for k in value if k not in _PARAM_KEYS)
    if unknown:
        raise ctx.error(f"python_param.param_str {text!r} sets {unknown}, which caffeonnx does not know for "
                        f"{PYTHON_MODULE}.{PYTHON_LAYER}; it reads {list(_PARAM_KEYS)}")
    if "feat_stride" not in value:
        raise ctx.error(f"python_param.param_str {text!r} has no 'feat_stride' (py-faster-rcnn's proposal layer "
                        "requires it), e.g. param_str: \"'feat_stride': 16\"")
    return value


def _numbers(ctx: LayerContext, value: object, key: str) -> tuple[float, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    try:
        return tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise ctx.error(f"param_str '{key}' must be a number or a list of numbers, got {value!r}") from None


def _integer(ctx: LayerContext, value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ctx.error(f"param_str '{key}' must be a whole number, got {value!r}")
    return int(value)


def python_spec(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> ProposalSpec:
    """The settings of py-faster-rcnn's Python ProposalLayer: param_str plus cfg for the phase."""
    params = _param_str(ctx, layer.python_param.param_str)
    pre, post, thresh, min_size = CFG[ctx.options.phase]
    return ProposalSpec(
        feat_stride=_integer(ctx, params["feat_stride"], "feat_stride"),
        base_size=_integer(ctx, params.get("base_size", 16), "base_size"),
        ratios=_numbers(ctx, params.get("ratios", DEFAULT_RATIOS), "ratios"),
        scales=_numbers(ctx, params.get("scales", DEFAULT_SCALES), "scales"),
        pre_nms_topn=pre, post_nms_topn=post, nms_thresh=thresh, min_size=min_size,
    )


def param_spec(layer: caffe_pb2.LayerParameter) -> ProposalSpec:
    """The settings of a `type: "Proposal"` layer (OpenCV's proposal_param; py-faster-rcnn's anchors by default)."""
    p = layer.proposal_param
    return ProposalSpec(
        feat_stride=int(p.feat_stride), base_size=int(p.base_size),
        ratios=tuple(float(np.float32(r)) for r in p.ratio) or DEFAULT_RATIOS,
        scales=tuple(float(np.float32(s)) for s in p.scale) or DEFAULT_SCALES,
        pre_nms_topn=int(p.pre_nms_topn), post_nms_topn=int(p.post_nms_topn),
        nms_thresh=float(np.float32(p.nms_thresh)), min_size=float(p.min_size),
    )


def _i64(ctx: LayerContext, value: int | list[int], hint: str = "i") -> str:
    return ctx.const(np.array(value, dtype=np.int64), hint)


def _f32(ctx: LayerContext, value: float | np.ndarray, hint: str = "f") -> str:
    return ctx.const(np.asarray(value, dtype=np.float32), hint)


def _f64(ctx: LayerContext, value: np.ndarray, hint: str) -> str:
    """A float64 Constant (ctx.const stores floats as float32)."""
    out = ctx.builder.unique(f"{ctx.name}/{hint}")
    ctx.builder.add_node("Constant", [], [out], f"{ctx.name}/{hint}",
                         value=numpy_helper.from_array(np.asarray(value, dtype=np.float64), out))
    return out


def _column(ctx: LayerContext, x: str, k: int) -> str:
    return ctx.node("Gather", [x, _i64(ctx, k, f"col{k}")], axis=1)


def _anchors(ctx: LayerContext, spec: ProposalSpec, num: int) -> str:
    """All shifted anchors [H·W·A, 4] float32, ordered (h, w, a), from bottom 0's run-time H and W."""
    base = generate_anchors(spec.base_size, spec.ratios, spec.scales)
    shape = ctx.node("Shape", [ctx.inputs[0]])
    zero, one = _i64(ctx, 0, "zero"), _i64(ctx, 1, "one")

    def shifts(axis: int, dims: list[int], mask: list[float]) -> str:
        size = ctx.node("Squeeze", [ctx.node("Gather", [shape, _i64(ctx, [axis], f"axis{axis}")]), _i64(ctx, [0], "ax")])
        cells = ctx.node("Cast", [ctx.node("Range", [zero, size, one])], to=TensorProto.DOUBLE)
        steps = ctx.node("Mul", [cells, _f64(ctx, np.float64(spec.feat_stride), "stride")])
        return ctx.node("Mul", [ctx.node("Reshape", [steps, _i64(ctx, dims, "shift_shape")]),
                                _f64(ctx, np.array(mask), "mask")])

    sx = shifts(3, [1, -1, 1, 1], [1, 0, 1, 0])  # [1, W, 1, 4]
    sy = shifts(2, [-1, 1, 1, 1], [0, 1, 0, 1])  # [H, 1, 1, 4]
    grid = ctx.node("Add", [ctx.node("Add", [_f64(ctx, base.reshape(1, 1, num, 4), "base_anchors"), sx]), sy])
    return ctx.node("Cast", [ctx.node("Reshape", [grid, _i64(ctx, [-1, 4], "flat4")])], to=TensorProto.FLOAT)


def _nms(ctx: LayerContext, boxes: str, scores: str, thresh: float, limit: int) -> str:
    """Greedy NMS over the score-sorted boxes [M, 4]: the kept rows [K] in score order.

    ONNX NonMaxSuppression's IoU has no +1: moving the far corners out by 1 gives it py-faster-rcnn's
    +1 sides (the same IoU in exact arithmetic; see the module docstring for float).
    """
    one = _f32(ctx, 1, "one")
    x1, y1, x2, y2 = (_column(ctx, boxes, k) for k in range(4))
    corners = [y1, x1, ctx.node("Add", [y2, one]), ctx.node("Add", [x2, one])]  # its [y1, x1, y2, x2] order
    shifted = ctx.node("Concat", [ctx.node("Unsqueeze", [v, _i64(ctx, [1], "ax1")]) for v in corners], axis=1)
    most = _i64(ctx, [limit], "post_nms_topn") if limit > 0 else ctx.node("Shape", [scores])  # 0 would keep none
    selected = ctx.node("NonMaxSuppression", [
        ctx.node("Unsqueeze", [shifted, _i64(ctx, [0], "ax0")]),
        ctx.node("Reshape", [scores, _i64(ctx, [1, 1, -1], "one_class")]),
        most, _f32(ctx, np.array([thresh]), "nms_thresh")])  # suppresses IoU > thresh, as nms_kernel.cu
    return ctx.node("Gather", [selected, _i64(ctx, 2, "box_col")], axis=1)


def emit_proposal(ctx: LayerContext, spec: ProposalSpec) -> None:
    """The graph of rpn/proposal_layer.py's forward for image 0 (see the module docstring)."""
    if ctx.options.opset < 13:  # Squeeze/Unsqueeze with axes inputs, GreaterOrEqual
        raise ctx.error(f"needs ONNX opset 13 or later (got --opset {ctx.options.opset}); use --opset 13 or higher")
    if not spec.ratios or not spec.scales or spec.feat_stride <= 0 or spec.base_size <= 0:
        raise ctx.error(f"the anchors need feat_stride > 0, base_size > 0 and at least one ratio and one scale "
                        f"(got feat_stride {spec.feat_stride}, base_size {spec.base_size}, ratios {list(spec.ratios)}, "
                        f"scales {list(spec.scales)})")
    if not 0 <= spec.nms_thresh <= 1:
        raise ctx.error(f"nms_thresh {spec.nms_thresh!r} is not an IoU threshold in [0, 1]")
    num = len(spec.ratios) * len(spec.scales)
    cls, deltas, info = ctx.input_shapes
    names = ctx.layer.bottom
    if len(cls) != 4 or cls[0] != 1 or cls[1] != 2 * num:
        raise ctx.error(f"bottom 0 {names[0]!r} (rpn_cls_prob_reshape) has shape {list(cls)}; with {num} anchors "
                        f"({len(spec.ratios)} ratios x {len(spec.scales)} scales) it must be 1 x {2 * num} x H x W "
                        "(background then foreground scores; py-faster-rcnn supports a single image)")
    if len(deltas) != 4 or tuple(deltas) != (1, 4 * num, cls[2], cls[3]):
        raise ctx.error(f"bottom 1 {names[1]!r} (rpn_bbox_pred) has shape {list(deltas)}; it must be "
                        f"1 x {4 * num} x {cls[2]} x {cls[3]} (4 deltas per anchor, the scores' map size)")
    if not info or info[0] != 1 or math.prod(info[1:]) < 3:
        raise ctx.error(f"bottom 2 {names[2]!r} (im_info) has shape {list(info)}; it must be 1 x 3 (rows, cols, "
                        "scale of the input image)")

    image0 = _i64(ctx, 0, "image0")
    scores = ctx.node("Slice", [ctx.node("Gather", [ctx.inputs[0], image0], axis=0), _i64(ctx, [num], "fg_start"),
                                _i64(ctx, [2 * num], "fg_end"), _i64(ctx, [0], "ch")])  # [A, H, W] foreground
    scores = ctx.node("Reshape", [ctx.node("Transpose", [scores], perm=[1, 2, 0]), _i64(ctx, [-1], "flat")])
    bbox = ctx.node("Transpose", [ctx.node("Gather", [ctx.inputs[1], image0], axis=0)], perm=[1, 2, 0])
    bbox = ctx.node("Reshape", [bbox, _i64(ctx, [-1, 4], "flat4")])  # [H·W·A, 4], rows (h, w, a)
    im = ctx.node("Gather", [ctx.node("Reshape", [ctx.inputs[2], _i64(ctx, [1, -1], "row")]), image0], axis=0)
    rows, cols, im_scale = (ctx.node("Gather", [im, _i64(ctx, [k], f"info{k}")]) for k in range(3))  # [1] each

    # bbox_transform_inv (float32, +1 widths)
    anchors = _anchors(ctx, spec, num)
    one, half = _f32(ctx, 1, "one"), _f32(ctx, 0.5, "half")
    ax1, ay1, ax2, ay2 = (_column(ctx, anchors, k) for k in range(4))
    dx, dy, dw, dh = (_column(ctx, bbox, k) for k in range(4))
    corners = []
    for lo, hi, d, ds in ((ax1, ax2, dx, dw), (ay1, ay2, dy, dh)):
        size = ctx.node("Add", [ctx.node("Sub", [hi, lo]), one])
        ctr = ctx.node("Add", [lo, ctx.node("Mul", [half, size])])
        pred_ctr = ctx.node("Add", [ctx.node("Mul", [d, size]), ctr])
        pred_half = ctx.node("Mul", [half, ctx.node("Mul", [ctx.node("Exp", [ds]), size])])
        corners.append((ctx.node("Sub", [pred_ctr, pred_half]), ctx.node("Add", [pred_ctr, pred_half])))
    (x1, x2), (y1, y2) = corners

    # clip_boxes: x into [0, cols - 1], y into [0, rows - 1]
    zero = _f32(ctx, 0, "zero")
    x_max, y_max = ctx.node("Sub", [cols, one]), ctx.node("Sub", [rows, one])
    x1, x2 = (ctx.node("Max", [ctx.node("Min", [v, x_max]), zero]) for v in (x1, x2))
    y1, y2 = (ctx.node("Max", [ctx.node("Min", [v, y_max]), zero]) for v in (y1, y2))

    # _filter_boxes: both sides (+1) at least min_size · im_info[2]
    least = ctx.node("Mul", [_f32(ctx, spec.min_size, "min_size"), im_scale])
    wide = ctx.node("GreaterOrEqual", [ctx.node("Add", [ctx.node("Sub", [x2, x1]), one]), least])
    tall = ctx.node("GreaterOrEqual", [ctx.node("Add", [ctx.node("Sub", [y2, y1]), one]), least])
    keep = ctx.node("And", [wide, tall])
    boxes = ctx.node("Compress", [ctx.node("Concat", [ctx.node("Unsqueeze", [v, _i64(ctx, [1], "ax1")])
                                                      for v in (x1, y1, x2, y2)], axis=1), keep], axis=0)
    scores = ctx.node("Compress", [scores, keep], axis=0)

    # highest scores first, at most pre_nms_topN
    k = ctx.node("Shape", [scores])
    if spec.pre_nms_topn > 0:
        k = ctx.node("Min", [k, _i64(ctx, [spec.pre_nms_topn], "pre_nms_topn")])
    top_scores, order = ctx.node_outputs("TopK", [scores, k], 2, axis=0, largest=1, sorted=1)
    boxes = ctx.node("Gather", [boxes, order], axis=0)

    picked = _nms(ctx, boxes, top_scores, spec.nms_thresh, spec.post_nms_topn)
    boxes = ctx.node("Gather", [boxes, picked], axis=0)
    batch_col = ctx.node("Mul", [_column(ctx, boxes, 0), zero])  # py-faster-rcnn's batch index: always 0
    ctx.node("Concat", [ctx.node("Unsqueeze", [batch_col, _i64(ctx, [1], "ax1")]), boxes], [ctx.outputs[0]], axis=1)
    cells = cls[2] * cls[3] * num
    most = min(cells, spec.pre_nms_topn) if spec.pre_nms_topn > 0 else cells
    most = min(most, spec.post_nms_topn) if spec.post_nms_topn > 0 else most
    ctx.set_output_shape(0, (most, 5))  # recorded as the most it can be; the graph's first axis is dynamic
    if len(ctx.outputs) > 1:
        picked_scores = ctx.node("Gather", [top_scores, picked], axis=0)
        ctx.node("Unsqueeze", [picked_scores, _i64(ctx, [1], "ax1")], [ctx.outputs[1]])
        ctx.set_output_shape(1, (most, 1))


@register_layer("Proposal", bottoms=3, tops=(1, 2), fork="opencv")
def convert_proposal(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Proposal: Faster R-CNN's RPN proposals (anchors + deltas, clip, min-size filter, score sort, +1-IoU NMS) as py-faster-rcnn computes them; rois [R, 5] (+ scores)."""
    emit_proposal(ctx, param_spec(layer))


@register_layer("Python", bottoms=(0, None), tops=(0, None))
def convert_python(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Python: py-faster-rcnn's rpn.proposal_layer.ProposalLayer converts as Proposal; any other Python layer is refused."""
    p = layer.python_param
    if p.module.rsplit(".", 1)[-1] != PYTHON_MODULE.rsplit(".", 1)[-1] or p.layer != PYTHON_LAYER:
        raise UnsupportedError(
            f"{ctx.builder.source}: layer {layer.name!r} (Python) runs Python code (module {p.module!r}, layer "
            f"{p.layer!r}) that caffeonnx cannot convert; of Python layers only py-faster-rcnn's "
            f"{PYTHON_MODULE}.{PYTHON_LAYER} is converted. See 'caffeonnx layers' for the supported types."
        )
    if len(layer.bottom) != 3 or len(layer.top) not in (1, 2):
        raise ctx.error(f"{PYTHON_MODULE}.{PYTHON_LAYER} takes 3 bottoms (rpn_cls_prob_reshape, rpn_bbox_pred, "
                        f"im_info) and gives 1 or 2 tops (rois, scores); it has {len(layer.bottom)} bottom(s) and "
                        f"{len(layer.top)} top(s)")
    emit_proposal(ctx, python_spec(layer, ctx))
