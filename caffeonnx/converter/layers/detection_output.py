"""DetectionOutput: the SSD fork's detection head (DetectionOutputLayer, weiliu89/caffe ssd branch).

What Caffe computes (Forward_cpu with bbox_util.cpp), and how the graph does the same:

- Decode (DecodeBBoxesAll with clip_bbox false, as the ssd branch's Forward_cpu calls it; a
  revision of Forward_gpu, f927612, clipped the written boxes to [0, 1] instead): the first 4P
  values of the prior blob are the priors, the next 4P their variances (unused with
  variance_encoded_in_target, when the graph reads only the first 4P: OpenCV's one-channel
  prior blob converts too).
  CORNER adds var·loc to the prior's corners, CORNER_SIZE adds var·loc·(prior width/height),
  CENTER_SIZE moves the prior's centre by var·loc·size and scales its size by exp(var·loc).
  The float operations are Caffe's, in Caffe's order, so decoded boxes match to the ulp
  except where exp rounds differently (Caffe's exp is the double ::exp).
- background_label_id -1 with share_location: Caffe's CPU decode skips the shared boxes
  (label -1) and then dies finding none; its GPU decode keeps them, which the graph follows.
- Per image and per class except background_label_id (ApplyNMSFast): keep scores
  > confidence_threshold (-FLT_MAX when unset), sort them descending with equal scores in
  prior order (std::stable_sort), keep nms_param.top_k, then greedily keep a box unless its
  JaccardOverlap with a box kept before it is > nms_threshold.  The graph takes the top_k with
  TopK (which orders ties by index, as stable_sort does), gathers those boxes in that order,
  and hands ONNX NonMaxSuppression strictly decreasing rank scores, so its greedy pass visits
  boxes in Caffe's order even where scores are equal (ONNX leaves the order of equal scores
  to the runtime).  ONNX NMS's IoU is Caffe's JaccardOverlap on normalised boxes (no +1, the
  same float operations, suppress on > threshold) except for boxes with xmax < xmin or
  ymax < ymin: Caffe gives them size 0 and overlap 0, ONNX swaps their corners, so the graph
  collapses them to a point before NMS (overlap 0).
- keep_top_k (> -1): the image's detections sorted by score, the first keep_top_k kept.
  Caffe uses std::sort there, so which of exactly equal scores at the cut survives is not
  defined by Caffe; the graph keeps the lower label, then the higher-ranked box.
- Top [1, 1, K, 7]: rows (image_id, label, score, xmin, ymin, xmax, ymax) by image, then
  label, then descending score (equal scores in prior order).  When no image has a
  detection Caffe writes one row per image, [i, -1, -1, -1, -1, -1, -1] (Forward_cpu; the
  f927612 Forward_gpu wrote a single row of -1).

Not converted: adaptive NMS (eta < 1), OpenCV's normalized_bbox: false, and a 4th bottom
that is not an image (RefineDet-style forks pass ARM predictions there).  save_output_param
and visualize only write files or draw (the 4th bottom, an image, is theirs): the top does
not depend on them, so they are ignored.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2

_CODE = caffe_pb2.PriorBoxParameter
_FLT_MAX = float(np.finfo(np.float32).max)


def _legacy(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Blob::LegacyShape: num, channels, height, width (1 past the blob's axes)."""
    return (*shape, 1, 1, 1, 1)[:4]


def _i64(values: list[int] | int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _slice(ctx: LayerContext, x: str, start: int, end: int, axis: int) -> str:
    return ctx.node("Slice", [x, ctx.const(_i64([start]), "starts"), ctx.const(_i64([end]), "ends"),
                              ctx.const(_i64([axis]), "axes")])


def _reshape(ctx: LayerContext, x: str, dims: list[int], output: str | None = None) -> str:
    return ctx.node("Reshape", [x, ctx.const(_i64(dims), "shape")], [output] if output else None)


def _scalar(ctx: LayerContext, one: str) -> str:
    """A 0-D copy of a 1-element int64 tensor (what Range takes)."""
    return ctx.node("Reshape", [one, ctx.const(np.zeros(0, dtype=np.int64), "scalar")])


def _decode(ctx: LayerContext, loc: str, prior: str, var: str | None, code: int) -> str:
    """DecodeBBox on [B, P, L, 4] predictions against [1, P, 1, 4] priors (and variances)."""
    pmin, pmax = _slice(ctx, prior, 0, 2, -1), _slice(ctx, prior, 2, 4, -1)
    if code == _CODE.CORNER:  # prior + var * loc
        return ctx.node("Add", [prior, ctx.node("Mul", [var, loc]) if var else loc])
    psize = ctx.node("Sub", [pmax, pmin])  # prior width, height
    if code == _CODE.CORNER_SIZE:  # prior + var * loc * size
        size4 = ctx.node("Concat", [psize, psize], axis=-1)
        return ctx.node("Add", [prior, ctx.node("Mul", [ctx.node("Mul", [var, loc]) if var else loc, size4])])
    # CENTER_SIZE: centre var*loc*size + prior centre, size exp(var*loc) * prior size
    lmin, lmax = _slice(ctx, loc, 0, 2, -1), _slice(ctx, loc, 2, 4, -1)
    if var:
        vmin, vmax = _slice(ctx, var, 0, 2, -1), _slice(ctx, var, 2, 4, -1)
        lmin, lmax = ctx.node("Mul", [vmin, lmin]), ctx.node("Mul", [vmax, lmax])
    half = ctx.const(np.array(0.5, dtype=np.float32), "half")
    centre = ctx.node("Add", [ctx.node("Mul", [lmin, psize]), ctx.node("Mul", [ctx.node("Add", [pmin, pmax]), half])])
    extent = ctx.node("Mul", [ctx.node("Mul", [ctx.node("Exp", [lmax]), psize]), half])
    return ctx.node("Concat", [ctx.node("Sub", [centre, extent]), ctx.node("Add", [centre, extent])], axis=-1)


def _fallback(ctx: LayerContext, batch: str) -> str:
    """Caffe's rows when nothing is detected: [i, -1, -1, -1, -1, -1, -1] for each image i."""
    ids = ctx.node("Range", [ctx.const(np.array(0, dtype=np.int64), "start"), _scalar(ctx, batch),
                             ctx.const(np.array(1, dtype=np.int64), "delta")])
    ids = _reshape(ctx, ctx.node("Cast", [ids], to=TensorProto.FLOAT), [-1, 1])
    rest = ctx.node("Expand", [ctx.const(np.full((1, 6), -1, dtype=np.float32), "minus_one"),
                               ctx.node("Concat", [batch, ctx.const(_i64([6]), "six")], axis=0)])
    return ctx.node("Concat", [ids, rest], axis=1)


def _order(ctx: LayerContext, key: str, largest: int) -> str:
    """Indices sorting 1-D `key` (TopK orders equal keys by index, so this sort is stable)."""
    _, idx = ctx.node_outputs("TopK", [key, ctx.node("Shape", [key])], 2, axis=0, largest=largest, sorted=1)
    return idx


def _permute(ctx: LayerContext, order: str, key: str, largest: int) -> str:
    """`order` re-sorted stably by key[order]."""
    return ctx.node("Gather", [order, _order(ctx, ctx.node("Gather", [key, order]), largest)])


def _keep_top_k(ctx: LayerContext, order: str, image: str, score: str, batch: str, keep_top_k: int) -> str:
    """The detections of `order` among their image's keep_top_k best scores (equal scores: the earlier in
    `order` first), in image then score order."""
    by_score = _permute(ctx, order, score, 1)
    by_image = _permute(ctx, by_score, image, 0)  # image ascending, score descending within an image
    img = ctx.node("Gather", [image, by_image])
    zero, one = ctx.const(np.array(0, dtype=np.int64), "zero"), ctx.const(np.array(1, dtype=np.int64), "one")
    images = ctx.node("Range", [zero, _scalar(ctx, batch), one])
    onehot = ctx.node("Cast", [ctx.node("Equal", [_reshape(ctx, img, [-1, 1]), _reshape(ctx, images, [1, -1])])],
                      to=TensorProto.INT64)
    first = ctx.node("CumSum", [ctx.reduce("ReduceSum", onehot, [0]), ctx.const(np.array(0, dtype=np.int64), "axis")],
                     exclusive=1)  # where each image's run starts in by_image
    position = ctx.node("Range", [zero, _scalar(ctx, ctx.node("Shape", [img])), one])
    rank = ctx.node("Sub", [position, ctx.node("Gather", [first, img])])
    within = ctx.node("Less", [rank, ctx.const(np.array(keep_top_k, dtype=np.int64), "keep_top_k")])
    return ctx.node("Compress", [by_image, within], axis=0)


@register_layer("DetectionOutput", bottoms=(3, 4), tops=1, fork="ssd")
def convert_detection_output(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """DetectionOutput: loc decoded on the priors, per-class top_k + greedy NMS, keep_top_k per image: [1, 1, K, 7]."""
    p = layer.detection_output_param
    if ctx.options.opset < 11:  # TopK with a computed k, NonMaxSuppression 11, CumSum, Compress, Range
        raise ctx.error(f"needs ONNX opset 11 or later (got --opset {ctx.options.opset}); use --opset 11 or higher")
    if not p.HasField("num_classes"):
        raise ctx.error("Must specify num_classes: detection_output_param has none; give the number of classes "
                        "the confidences cover (background included)")
    if p.num_classes < 1:
        raise ctx.error(f"detection_output_param.num_classes is {p.num_classes!r}; give at least 1")
    nms = p.nms_param
    if nms.nms_threshold < 0:
        raise ctx.error(f"nms_threshold must be non negative: nms_param.nms_threshold is {nms.nms_threshold!r}")
    if not 0 < nms.eta <= 1:
        raise ctx.error(f"nms_param.eta is {nms.eta!r}; Caffe requires 0 < eta <= 1")
    if nms.eta != 1:
        raise ctx.error(f"nms_param.eta is {nms.eta!r}: adaptive NMS (eta < 1 lowers the threshold after each kept "
                        "box) has no ONNX equivalent and is not converted; use eta: 1")
    if p.HasField("normalized_bbox") and not p.normalized_bbox:
        raise ctx.error("normalized_bbox: false is OpenCV's extension (pixel boxes, sizes +1), not the SSD fork's "
                        "DetectionOutput; remove it to decode normalised boxes as SSD does")
    if len(ctx.input_shapes) == 4 and len(ctx.input_shapes[3]) != 4:
        raise ctx.error(f"the 4th bottom {layer.bottom[3]!r} has shape {list(ctx.input_shapes[3])}, not an image: the "
                        "SSD fork's 4th bottom is the image that visualize draws on; forks such as RefineDet pass ARM "
                        "predictions there, which this converter does not support")
    for shape, name in zip(ctx.input_shapes[:3], layer.bottom):
        if len(shape) > 4:
            raise ctx.error(f"bottom {name!r} has {len(shape)} axes {list(shape)}; Caffe's legacy accessors take at "
                            "most 4")

    classes = int(p.num_classes)
    loc_classes = 1 if p.share_location else classes
    loc_shape, conf_shape, prior_shape = (_legacy(s) for s in ctx.input_shapes[:3])
    if loc_shape[0] != conf_shape[0]:
        raise ctx.error(f"bottom[0] {layer.bottom[0]!r} has num {loc_shape[0]} but bottom[1] {layer.bottom[1]!r} has "
                        f"{conf_shape[0]}; the location and confidence predictions must cover the same images")
    priors = prior_shape[2] // 4
    if priors * loc_classes * 4 != loc_shape[1]:
        raise ctx.error(f"Number of priors must match number of location predictions: {priors} priors (prior blob "
                        f"{layer.bottom[2]!r} height {prior_shape[2]} / 4) x {loc_classes} location class(es) x 4 = "
                        f"{priors * loc_classes * 4}, but {layer.bottom[0]!r} has {loc_shape[1]} channels")
    if priors * classes != conf_shape[1]:
        raise ctx.error(f"Number of priors must match number of confidence predictions: {priors} priors x "
                        f"{classes} classes = {priors * classes}, but {layer.bottom[1]!r} has {conf_shape[1]} channels")
    for name, shape in ((layer.bottom[0], loc_shape), (layer.bottom[1], conf_shape)):
        if shape[2] * shape[3] != 1:
            raise ctx.error(f"bottom {name!r} has shape {list(shape)}: Caffe reads its channels per image, so its "
                            "height and width must be 1; flatten it first (as SSD's mbox_loc / mbox_conf_flatten)")
    needed = priors * 4 * (1 if p.variance_encoded_in_target else 2)
    if int(np.prod(prior_shape)) < needed:
        raise ctx.error(f"prior blob {layer.bottom[2]!r} {list(ctx.input_shapes[2])} holds fewer than the {needed} "
                        f"values Caffe reads (the {priors} priors{'' if p.variance_encoded_in_target else ', then their variances'})")

    batch = _slice(ctx, ctx.node("Shape", [ctx.inputs[0]]), 0, 1, 0)
    labels = [c for c in range(classes) if c != p.background_label_id]
    top_k = nms.top_k if nms.HasField("top_k") and nms.top_k > -1 else priors
    k = min(top_k, priors)
    keep_top_k = p.keep_top_k
    if not labels or k == 0 or keep_top_k == 0:  # Caffe can detect nothing
        _reshape(ctx, _fallback(ctx, batch), [1, 1, -1, 7], ctx.outputs[0])
        ctx.set_output_shape(0, (1, 1, 1, 7))
        return

    # Priors and variances (the prior blob's first image only, as GetPriorBBoxes reads it).
    flat = _reshape(ctx, ctx.inputs[2], [-1])
    prior = _reshape(ctx, _slice(ctx, flat, 0, 4 * priors, 0), [1, priors, 1, 4])
    var = None if p.variance_encoded_in_target else _reshape(ctx, _slice(ctx, flat, 4 * priors, 8 * priors, 0),
                                                             [1, priors, 1, 4])
    loc = _reshape(ctx, ctx.inputs[0], [-1, priors, loc_classes, 4])
    boxes = _decode(ctx, loc, prior, var, p.code_type)  # [B, P, L, 4] xmin, ymin, xmax, ymax

    # Each class's top_k scores, best first (ties by prior index), and their boxes in that order.
    nlab = len(labels)
    label_ids = ctx.const(_i64(labels), "labels")
    conf = ctx.node("Transpose", [_reshape(ctx, ctx.inputs[1], [-1, priors, classes])], perm=[0, 2, 1])
    if nlab < classes:
        conf = ctx.node("Gather", [conf, label_ids], axis=1)  # [B, C', P]
    score, index = ctx.node_outputs("TopK", [conf, ctx.const(_i64([k]), "top_k")], 2, axis=-1, largest=1, sorted=1)
    if p.share_location:
        picks = ctx.node("Expand", [_reshape(ctx, index, [0, -1, 1]), ctx.const(_i64([1, 1, 4]), "four")])
        chosen = ctx.node("GatherElements", [_reshape(ctx, boxes, [-1, priors, 4]), picks], axis=1)
    else:
        per_class = ctx.node("Transpose", [boxes], perm=[0, 2, 1, 3])  # [B, C, P, 4]
        if nlab < classes:
            per_class = ctx.node("Gather", [per_class, label_ids], axis=1)
        picks = ctx.node("Expand", [_reshape(ctx, index, [0, 0, 0, 1]), ctx.const(_i64([1, 1, 1, 4]), "four")])
        chosen = ctx.node("GatherElements", [per_class, picks], axis=2)
    chosen = _reshape(ctx, chosen, [-1, k, 4])  # [B·C', k, 4]

    # NMS on (image, class) lists: inverted boxes become points (Caffe's overlap 0), scores become ranks.
    x0, y0, x1, y1 = (_slice(ctx, chosen, i, i + 1, 2) for i in range(4))
    inverted = ctx.node("Or", [ctx.node("Less", [x1, x0]), ctx.node("Less", [y1, y0])])
    nms_boxes = ctx.node("Concat", [y0, x0, ctx.node("Where", [inverted, y0, y1]),
                                    ctx.node("Where", [inverted, x0, x1])], axis=2)
    threshold = p.confidence_threshold if p.HasField("confidence_threshold") else -_FLT_MAX
    passing = ctx.node("Greater", [score, ctx.const(np.array(threshold, dtype=np.float32), "confidence_threshold")])
    ranks = ctx.const(np.arange(k, 0, -1, dtype=np.float32), "ranks")
    nms_scores = _reshape(ctx, ctx.node("Where", [passing, ranks, ctx.const(np.array(0, dtype=np.float32), "zero")]),
                          [-1, 1, k])
    selected = ctx.node("NonMaxSuppression", [
        nms_boxes, nms_scores, ctx.const(_i64([k]), "max_boxes"),
        ctx.const(np.array([min(nms.nms_threshold, 1.0)], dtype=np.float32), "iou_threshold"),
        ctx.const(np.array([0], dtype=np.float32), "score_threshold")], center_point_box=0)

    # Each detection: list (image·C' + class), rank in the list; its key orders by image, label, rank.
    lists = ctx.node("Gather", [selected, ctx.const(np.array(0, dtype=np.int64), "col0")], axis=1)
    rank = ctx.node("Gather", [selected, ctx.const(np.array(2, dtype=np.int64), "col2")], axis=1)
    key = ctx.node("Add", [ctx.node("Mul", [lists, ctx.const(np.array(k, dtype=np.int64), "k")]), rank])
    nlab_c = ctx.const(np.array(nlab, dtype=np.int64), "classes")
    image = ctx.node("Div", [lists, nlab_c])
    label = ctx.node("Gather", [label_ids, ctx.node("Mod", [lists, nlab_c])])
    det_score = ctx.node("Gather", [_reshape(ctx, score, [-1]), key])
    order = _order(ctx, key, 0)
    if keep_top_k > -1:
        order = _permute(ctx, _keep_top_k(ctx, order, image, det_score, batch, keep_top_k), key, 0)

    columns = [_reshape(ctx, ctx.node("Cast", [ctx.node("Gather", [image, order])], to=TensorProto.FLOAT), [-1, 1]),
               _reshape(ctx, ctx.node("Cast", [ctx.node("Gather", [label, order])], to=TensorProto.FLOAT), [-1, 1]),
               _reshape(ctx, ctx.node("Gather", [det_score, order]), [-1, 1]),
               ctx.node("Gather", [_reshape(ctx, chosen, [-1, 4]), ctx.node("Gather", [key, order])], axis=0)]
    rows = ctx.node("Concat", columns, axis=1)
    found = _slice(ctx, ctx.node("Shape", [rows]), 0, 1, 0)
    none = ctx.node("Cast", [ctx.node("Equal", [found, ctx.const(_i64([0]), "zero_rows")])], to=TensorProto.INT64)
    fallback = ctx.node("Slice", [_fallback(ctx, batch), ctx.const(_i64([0]), "starts"),
                                  ctx.node("Mul", [batch, none]), ctx.const(_i64([0]), "axes")])
    _reshape(ctx, ctx.node("Concat", [rows, fallback], axis=0), [1, 1, -1, 7], ctx.outputs[0])
    ctx.set_output_shape(0, (1, 1, 1, 7))  # Caffe's Reshape: the row count is known only when it runs
