"""PriorBox: the SSD fork's default boxes (PriorBoxLayer of weiliu89/caffe, ssd branch).

The top is (1, 2, H·W·num_priors·4): the first channel holds each prior's normalised corners
(xmin, ymin, xmax, ymax), the second its variances.  Order, as Forward_cpu writes it: per cell
(h, w), per min_size: the min_size square, the sqrt(min_size·max_size) square when max_size
is given, then one box per aspect ratio other than 1 (min_size·√ar wide, min_size/√ar high;
the list is 1, each new ratio and, with flip, its inverse).  Caffe reads min_size and max_size
into `int`s, so 35.84 acts as 35.  The image size is img_h/img_w (or img_size), else bottom 1's
height and width; the step is step_h/step_w (or step), else image size / feature size; centres
are (w + offset)·step.  clip clamps the corners into [0, 1]; variance is 1 value for every
coordinate or 4, one per coordinate (0.1 when absent).

OpenCV's extensions of the same message are followed as its DNN module computes them:
explicit `width`/`height` lists replace min_size/max_size/aspect_ratio (taken as floats), and
`offset_h`/`offset_w` pairs give one prior per box per pair (box-major).

The values depend only on the bottoms' shapes.  The converter knows every shape (only the batch
is left dynamic, and the priors do not depend on it), so the top is one Constant node; the same
numbers can also be built from the bottoms' run-time shapes (Shape → Range → ...), which
`emit_prior_graph` does for a graph whose spatial size is not fixed.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from onnx import TensorProto, numpy_helper

from caffeonnx.converter.context import LayerContext, Shape
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2

f32 = np.float32
T = TypeVar("T")

@dataclass(frozen=True)
class PriorSpec:
    """What LayerSetUp derives from prior_box_param: the boxes of one cell and how to place them."""

    widths: tuple[float, ...]  # per prior of one cell (before offsets), float32 values
    heights: tuple[float, ...]
    offsets: tuple[tuple[float, float], ...]  # (offset_y, offset_x) pairs
    variance: tuple[float, ...]  # 1 or 4 values
    clip: bool
    image: tuple[int, int] | None  # (img_h, img_w), None: bottom 1's height and width
    step: tuple[float, float] | None  # (step_h, step_w), None: image size / feature size

    @property
    def num_priors(self) -> int:
        return len(self.widths) * len(self.offsets)


def _aspect_ratios(ctx: LayerContext, p: caffe_pb2.PriorBoxParameter) -> list[float]:
    """1, then each ratio not within 1e-6 of one already listed, followed by 1/ratio with flip."""
    ratios = [1.0]
    for value in p.aspect_ratio:
        if not value > 0:
            raise ctx.error(f"aspect_ratio {value!r} is not positive: its boxes would be √{value!r} wide; "
                            "give ratios above 0 (2 and 3 are SSD's usual ones)")
        ar = float(f32(value))
        if any(abs(ar - known) < 1e-6 for known in ratios):
            continue
        ratios.append(ar)
        if p.flip:
            ratios.append(float(f32(1.0 / ar)))
    return ratios


def _cell_boxes(ctx: LayerContext, p: caffe_pb2.PriorBoxParameter) -> tuple[list[float], list[float]]:
    """Widths and heights of one cell's boxes, in Forward_cpu's order."""
    if len(p.width) or len(p.height):
        if len(p.width) != len(p.height):
            raise ctx.error(f"prior_box_param has {len(p.width)} width(s) and {len(p.height)} height(s); "
                            "give one height per width")
        if len(p.min_size) or len(p.max_size) or len(p.aspect_ratio):
            raise ctx.error("prior_box_param gives explicit width/height and also min_size/max_size/aspect_ratio; "
                            "OpenCV takes the sizes from one or the other: drop one")
        return [float(f32(w)) for w in p.width], [float(f32(h)) for h in p.height]
    if not len(p.min_size):
        raise ctx.error("must provide min_size.: prior_box_param has no min_size (nor OpenCV's width/height); "
                        "add min_size: <pixels>")
    for value in p.min_size:
        if not value > 0:
            raise ctx.error(f"min_size must be positive.: prior_box_param.min_size is {value!r}")
    if len(p.max_size):
        if len(p.max_size) != len(p.min_size):
            raise ctx.error(f"prior_box_param has {len(p.min_size)} min_size(s) and {len(p.max_size)} max_size(s); "
                            "give one max_size per min_size, or none")
        for lo, hi in zip(p.min_size, p.max_size):
            if not hi > lo:
                raise ctx.error(f"max_size must be greater than min_size.: max_size {hi!r} <= min_size {lo!r}")
    ratios = _aspect_ratios(ctx, p)
    widths: list[float] = []
    heights: list[float] = []
    for s, value in enumerate(p.min_size):
        size = int(value)  # Forward_cpu reads the sizes into ints
        widths.append(float(f32(size)))
        heights.append(float(f32(size)))
        if len(p.max_size):
            side = float(f32(math.sqrt(size * int(p.max_size[s]))))
            widths.append(side)
            heights.append(side)
        for ar in ratios:
            if abs(ar - 1.0) < 1e-6:
                continue
            widths.append(float(f32(size * math.sqrt(ar))))
            heights.append(float(f32(size / math.sqrt(ar))))
    return widths, heights


def _pair(ctx: LayerContext, p: caffe_pb2.PriorBoxParameter, single: str, h: str, w: str,
          cast: Callable[[float], T]) -> tuple[T, T] | None:
    """img_size or img_h/img_w, step or step_h/step_w: (h, w), or None when neither is given."""
    if p.HasField(h) or p.HasField(w):
        if p.HasField(single):
            raise ctx.error(f"Either {single} or {h}/{w} should be specified; not both.: prior_box_param gives "
                            f"{single} {getattr(p, single)!r} and {h}/{w}; keep one")
        for name in (h, w):
            if not getattr(p, name) > 0:
                raise ctx.error(f"{name} should be larger than 0.: prior_box_param.{name} is {getattr(p, name)!r}"
                                f"{' (unset)' if not p.HasField(name) else ''}; give both {h} and {w}")
        return cast(getattr(p, h)), cast(getattr(p, w))
    if p.HasField(single):
        value = getattr(p, single)
        if not value > 0:
            raise ctx.error(f"{single} should be larger than 0.: prior_box_param.{single} is {value!r}")
        return cast(value), cast(value)
    return None


def _as_float32(value: float) -> float:
    """A prototxt float as the C++ float holds it."""
    return float(f32(value))


def prior_spec(ctx: LayerContext, p: caffe_pb2.PriorBoxParameter) -> PriorSpec:
    """Validate prior_box_param as LayerSetUp does and derive the boxes."""
    widths, heights = _cell_boxes(ctx, p)
    if len(p.variance) > 1 and len(p.variance) != 4:
        raise ctx.error(f"prior_box_param has {len(p.variance)} variances; Caffe takes 1 (for every "
                        "coordinate) or exactly 4 (xmin, ymin, xmax, ymax)")
    for v in p.variance:
        if not v > 0:
            raise ctx.error(f"variance {v!r} is not positive; variances must be above 0 (SSD uses 0.1 0.1 0.2 0.2)")
    variance = tuple(float(f32(v)) for v in p.variance) or (float(f32(0.1)),)
    if len(p.offset_h) or len(p.offset_w):
        if p.HasField("offset"):
            raise ctx.error("prior_box_param gives offset and OpenCV's offset_h/offset_w; keep one")
        if len(p.offset_h) != len(p.offset_w):
            raise ctx.error(f"prior_box_param has {len(p.offset_h)} offset_h and {len(p.offset_w)} offset_w; "
                            "give them in pairs")
        if len(p.offset_h) > 2:
            raise ctx.error(f"prior_box_param has {len(p.offset_h)} offset_h/offset_w pairs; OpenCV sizes the top "
                            "for 2·(pairs - 1) priors per box but writes one per pair, which only agree for 1 or "
                            "2 pairs: give at most 2")
        offsets = tuple((float(f32(y)), float(f32(x))) for y, x in zip(p.offset_h, p.offset_w))
    else:
        offsets = ((float(f32(p.offset)), float(f32(p.offset))),)
    return PriorSpec(tuple(widths), tuple(heights), offsets, variance, p.clip,
                     _pair(ctx, p, "img_size", "img_h", "img_w", int),
                     _pair(ctx, p, "step", "step_h", "step_w", _as_float32))


def legacy_hw(ctx: LayerContext, index: int) -> tuple[int, int]:
    """Bottom `index`'s height and width as Caffe's legacy accessors read them (missing axes read 1)."""
    shape = ctx.input_shapes[index]
    if len(shape) > 4:
        raise ctx.error(f"Cannot use legacy accessors on Blobs with > 4 axes: bottom {ctx.layer.bottom[index]!r} has "
                        f"shape {list(shape)}; PriorBox reads (N, C, H, W)")
    _, _, h, w = (*shape, 1, 1, 1, 1)[:4]
    return h, w


def prior_values(spec: PriorSpec, feature_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """The top for a feature map and image of these sizes (float32 centres, double corners, as Caffe)."""
    layer_h, layer_w = feature_hw
    img_h, img_w = spec.image or image_hw
    step_h, step_w = (f32(s) for s in spec.step) if spec.step else (f32(img_h) / f32(layer_h), f32(img_w) / f32(layer_w))
    off_y = np.array([o[0] for o in spec.offsets], dtype=f32)
    off_x = np.array([o[1] for o in spec.offsets], dtype=f32)
    cy = ((np.arange(layer_h, dtype=f32)[:, None] + off_y) * step_h).astype(np.float64)[:, None, None, :]
    cx = ((np.arange(layer_w, dtype=f32)[:, None] + off_x) * step_w).astype(np.float64)[None, :, None, :]
    half_w = np.array(spec.widths, dtype=np.float64)[None, None, :, None] / 2.0
    half_h = np.array(spec.heights, dtype=np.float64)[None, None, :, None] / 2.0
    corners = np.broadcast_arrays((cx - half_w) / img_w, (cy - half_h) / img_h, (cx + half_w) / img_w,
                                  (cy + half_h) / img_h)
    boxes = np.stack(corners, axis=-1).astype(f32).reshape(-1)  # (h, w, box, offset, corner)
    if spec.clip:
        boxes = np.clip(boxes, f32(0), f32(1))
    variance = np.tile(np.array(spec.variance, dtype=f32), boxes.size // len(spec.variance))
    return np.stack([boxes, variance])[None]


def _dim(ctx: LayerContext, shape_value: str, rank: int, axis: int) -> str:
    """Axis `axis` of a run-time shape as a 1-element int64 tensor (1 where the blob has fewer axes)."""
    if axis >= rank:
        return ctx.const(np.array([1], dtype=np.int64), "one")
    return ctx.node("Slice", [shape_value, ctx.const(np.array([axis], dtype=np.int64), "start"),
                              ctx.const(np.array([axis + 1], dtype=np.int64), "end")])


def _centres(ctx: LayerContext, size: str, offsets: np.ndarray, step: str) -> str:
    """(i + offset)·step for i < size, in float32: shape (size, offsets)."""
    scalar = ctx.node("Reshape", [size, ctx.const(np.zeros(0, dtype=np.int64), "scalar")])
    index = ctx.node("Range", [ctx.const(np.array(0, dtype=np.int64), "zero"), scalar,
                               ctx.const(np.array(1, dtype=np.int64), "one")])
    column = ctx.node("Reshape", [ctx.node("Cast", [index], to=TensorProto.FLOAT),
                                  ctx.const(np.array([-1, 1], dtype=np.int64), "column")])
    return ctx.node("Mul", [ctx.node("Add", [column, ctx.const(offsets[None, :], "offsets")]), step])


def emit_prior_graph(ctx: LayerContext, spec: PriorSpec, output: str) -> None:
    """Nodes computing the top from the bottoms' run-time shapes (the same numbers, in float32)."""
    feature_shape = ctx.node("Shape", [ctx.inputs[0]])
    rank = len(ctx.input_shapes[0])
    layer_h, layer_w = _dim(ctx, feature_shape, rank, 2), _dim(ctx, feature_shape, rank, 3)
    if spec.image is not None:
        img_h = ctx.const(np.array([spec.image[0]], dtype=f32), "img_h")
        img_w = ctx.const(np.array([spec.image[1]], dtype=f32), "img_w")
    else:
        image_shape = ctx.node("Shape", [ctx.inputs[1]])
        image_rank = len(ctx.input_shapes[1])
        img_h = ctx.node("Cast", [_dim(ctx, image_shape, image_rank, 2)], to=TensorProto.FLOAT)
        img_w = ctx.node("Cast", [_dim(ctx, image_shape, image_rank, 3)], to=TensorProto.FLOAT)
    if spec.step is not None:
        step_h = ctx.const(np.array([spec.step[0]], dtype=f32), "step_h")
        step_w = ctx.const(np.array([spec.step[1]], dtype=f32), "step_w")
    else:
        step_h = ctx.node("Div", [img_h, ctx.node("Cast", [layer_h], to=TensorProto.FLOAT)])
        step_w = ctx.node("Div", [img_w, ctx.node("Cast", [layer_w], to=TensorProto.FLOAT)])
    boxes, offsets = len(spec.widths), len(spec.offsets)
    cy = _centres(ctx, layer_h, np.array([o[0] for o in spec.offsets], dtype=f32), step_h)
    cx = _centres(ctx, layer_w, np.array([o[1] for o in spec.offsets], dtype=f32), step_w)
    cy = ctx.node("Reshape", [cy, ctx.const(np.array([-1, 1, 1, offsets], dtype=np.int64), "rows")])
    cx = ctx.node("Reshape", [cx, ctx.const(np.array([1, -1, 1, offsets], dtype=np.int64), "cols")])
    half_w = ctx.const((np.array(spec.widths, dtype=f32) / f32(2)).reshape(1, 1, boxes, 1), "half_width")
    half_h = ctx.const((np.array(spec.heights, dtype=f32) / f32(2)).reshape(1, 1, boxes, 1), "half_height")
    grid = ctx.node("Concat", [layer_h, layer_w, ctx.const(np.array([boxes, offsets], dtype=np.int64), "priors")],
                    axis=0)
    column = ctx.const(np.array([-1, 1], dtype=np.int64), "column")
    corners = []
    for centre, half, size, op in ((cx, half_w, img_w, "Sub"), (cy, half_h, img_h, "Sub"),
                                   (cx, half_w, img_w, "Add"), (cy, half_h, img_h, "Add")):
        value = ctx.node("Div", [ctx.node(op, [centre, half]), size])
        corners.append(ctx.node("Reshape", [ctx.node("Expand", [value, grid]), column]))
    coords = ctx.node("Concat", corners, axis=1)  # (cells·priors, 4)
    flat = ctx.const(np.array([1, 1, -1], dtype=np.int64), "flat")
    top_boxes = ctx.node("Reshape", [coords, flat])
    if spec.clip:
        top_boxes = ctx.node("Min", [ctx.node("Max", [top_boxes, ctx.const(f32(0), "zero_f")]),
                                     ctx.const(f32(1), "one_f")])
    variance = ctx.const(np.array(spec.variance, dtype=f32).reshape(1, -1), "variance")
    variance = ctx.node("Reshape", [ctx.node("Expand", [variance, ctx.node("Shape", [coords])]), flat])
    ctx.node("Concat", [top_boxes, variance], [output], axis=1)


@register_layer("PriorBox", bottoms=2, tops=1, fork="ssd")
def convert_prior_box(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """PriorBox: SSD's default boxes per cell of bottom 0 in bottom 1's image: (1, 2, H·W·priors·4) corners, variances."""
    spec = prior_spec(ctx, layer.prior_box_param)
    feature_hw = legacy_hw(ctx, 0)
    image_hw = legacy_hw(ctx, 1) if spec.image is None else spec.image
    top: Shape = (1, 2, feature_hw[0] * feature_hw[1] * spec.num_priors * 4)
    ctx.check_count(top, f"top {layer.top[0]!r}")
    if ctx.options.fold_priors:
        values = prior_values(spec, feature_hw, image_hw)
        ctx.node("Constant", [], [ctx.outputs[0]], value=numpy_helper.from_array(values, ctx.outputs[0]))
    else:
        emit_prior_graph(ctx, spec, ctx.outputs[0])
    ctx.set_output_shape(0, top)
