"""Ops that select by value, which SSD's DetectionOutput and Faster R-CNN's Proposal emit:
Compress, CumSum, NonZero and NonMaxSuppression.

Their outputs' sizes depend on the data, so they run eagerly like every kernel here; the index
outputs (NonZero, NonMaxSuppression) carry no gradient, while Compress and CumSum pass their
float input's gradient through (a gather and a running sum, both differentiable in torch).
Where the ONNX spec leaves a choice open, onnxruntime's CPU kernels decide, since the converted
graphs are served by it: see each kernel.  Attributes are the same at every opset these ops have
(Compress 9/11 only adds negative axes, CumSum 14 and NonZero 13 only add types).
"""
from __future__ import annotations

import numpy as np
import torch

from caffeonnx.errors import CaffeOnnxError
from caffeonnx.trainer.ops import Kernel, NodeSpec, host_ints, ints, register_op

Tensor = torch.Tensor


def _axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


@register_op("Compress")
def compress(node: NodeSpec) -> Kernel:
    """Compress: the slices along `axis` (of the flattened input without it) whose condition is true.

    A condition shorter than the axis drops the slices past its end (the spec); one longer than the
    axis has its extra entries ignored, as onnxruntime does (numpy.compress would refuse it).
    """
    axis = node.attr("axis")

    def run(x: Tensor, condition: Tensor) -> Tensor:
        data, dim = (x.reshape(-1), 0) if axis is None else (x, _axis(int(axis), x.dim()))
        keep = condition.reshape(-1)[: data.shape[dim]].to(device=x.device, dtype=torch.bool)
        return data.index_select(dim, torch.nonzero(keep).reshape(-1))

    return run


@register_op("CumSum")
def cum_sum(node: NodeSpec) -> Kernel:
    """CumSum along the axis input; `exclusive` leaves out each element itself, `reverse` sums from the end.

    The exclusive sum is the inclusive one shifted by one with a leading 0 (onnxruntime's sequence of
    partial sums); integer inputs keep their type (torch would widen int32 to int64).
    """
    static = ints(node.const(1))
    exclusive = bool(node.attr("exclusive", 0))
    reverse = bool(node.attr("reverse", 0))

    def run(x: Tensor, axis_t: Tensor) -> Tensor:
        axes = host_ints(axis_t, static)
        assert axes is not None and len(axes) == 1, f"CumSum node {node.name!r}: the axis must be one integer"
        dim = _axis(axes[0], x.dim())
        y = x.flip(dim) if reverse else x
        out = torch.cumsum(y, dim, dtype=y.dtype)
        if exclusive and y.shape[dim] > 0:
            out = torch.cat([torch.zeros_like(y.narrow(dim, 0, 1)), out.narrow(dim, 0, y.shape[dim] - 1)], dim)
        return out.flip(dim) if reverse else out

    return run


@register_op("NonZero")
def non_zero(node: NodeSpec) -> Kernel:
    """NonZero: int64 [rank, count] indices of the non-zero elements in row-major order (numpy.nonzero);
    a 0-D input gives [1, count], as onnxruntime does."""

    def run(x: Tensor) -> Tensor:
        flat = x.reshape(1) if x.dim() == 0 else x
        return torch.nonzero(flat.detach()).T.contiguous()

    return run


def _scalar(tensor: Tensor | None, static: np.ndarray | None, default: float) -> float:
    """A scalar input: its build-time value, else its run-time value, else `default` when omitted."""
    if static is not None:
        return float(np.asarray(static).reshape(-1)[0])
    if tensor is None:
        return default
    return float(tensor.detach().reshape(-1)[0])


def _ordered(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(min, max) of two coordinates the way onnxruntime's MaxMin picks them (`a >= b` puts b first)."""
    first = a >= b
    return torch.where(first, b, a), torch.where(first, a, b)


def _corners(boxes: Tensor, center_point_box: int) -> Tensor:
    """[..., 5]: y_min, x_min, y_max, x_max and area of each box, in onnxruntime's float32 arithmetic."""
    if center_point_box == 0:  # [y1, x1, y2, x2], either corner first
        y_min, y_max = _ordered(boxes[..., 0], boxes[..., 2])
        x_min, x_max = _ordered(boxes[..., 1], boxes[..., 3])
        area = (y_max - y_min) * (x_max - x_min)
    else:  # [x_center, y_center, width, height]; the area is width·height as given
        half_w, half_h = boxes[..., 2] / 2, boxes[..., 3] / 2
        x_min, x_max = boxes[..., 0] - half_w, boxes[..., 0] + half_w
        y_min, y_max = boxes[..., 1] - half_h, boxes[..., 1] + half_h
        area = boxes[..., 2] * boxes[..., 3]
    return torch.stack([y_min, x_min, y_max, x_max, area], -1)


def _c_max(a: Tensor, b: Tensor) -> Tensor:
    """std::max(a, b): b only when a < b."""
    return torch.where(a < b, b, a)


def _c_min(a: Tensor, b: Tensor) -> Tensor:
    """std::min(a, b): b only when b < a."""
    return torch.where(b < a, b, a)


def _suppressed(cand: Tensor, chosen: Tensor, iou_threshold: Tensor) -> Tensor:
    """onnxruntime's SuppressByIOU of every candidate [L, N, 5] by its list's chosen box [L, 1, 5]:
    overlapping on both axes, a positive intersection and IoU strictly above the threshold."""
    ix0, ix1 = _c_max(cand[..., 1], chosen[..., 1]), _c_min(cand[..., 3], chosen[..., 3])
    iy0, iy1 = _c_max(cand[..., 0], chosen[..., 0]), _c_min(cand[..., 2], chosen[..., 2])
    inter = (ix1 - ix0) * (iy1 - iy0)
    union = cand[..., 4] + chosen[..., 4] - inter
    # written as "not (x <= y)" where onnxruntime returns early on `x <= y`, so NaNs go its way
    return ~(ix1 <= ix0) & ~(iy1 <= iy0) & ~(inter <= 0) & (inter / union > iou_threshold)


def non_max_suppression(boxes: Tensor, scores: Tensor, max_per_class: int, iou_threshold: float,
                        score_threshold: float | None, center_point_box: int) -> Tensor:
    """int64 [K, 3] (batch, class, box): per batch, per class, the kept boxes best score first.

    onnxruntime's greedy NMS: candidates (score > score_threshold when one is given) are visited by
    descending score, equal scores by ascending box index, and one is kept unless a box already kept
    in its list suppresses it, until max_per_class are kept.  All B·C lists advance together: each
    step keeps every list's first surviving candidate and removes the candidates it suppresses, so
    the steps number the most boxes any list keeps, and memory stays O(B·C·N).
    """
    batches, n, _ = boxes.shape
    classes = scores.shape[1]
    lists = batches * classes
    device = boxes.device
    if max_per_class <= 0 or lists == 0 or n == 0:
        return torch.zeros((0, 3), dtype=torch.int64, device=device)
    boxes = boxes.detach().to(torch.float32)
    scores = scores.detach().to(torch.float32)
    coords = _corners(boxes, center_point_box)  # [B, N, 5]
    score, order = torch.sort(scores, dim=-1, descending=True, stable=True)  # [B, C, N]
    # both thresholds are float32 in onnxruntime: compared as such, not as Python doubles
    iou_t = torch.tensor(iou_threshold, dtype=torch.float32, device=device)
    if score_threshold is None:
        alive = torch.ones_like(score, dtype=torch.bool)
    else:
        alive = score > torch.tensor(score_threshold, dtype=torch.float32, device=device)
    alive = alive.reshape(lists, n)
    order = order.reshape(lists, n)
    batch_of = torch.arange(lists, device=device) // classes
    cand = coords[batch_of[:, None], order]  # [L, N, 5] in visiting order
    rows = torch.arange(lists, device=device)
    picks = []
    for _ in range(min(max_per_class, n)):
        live = alive.any(-1)
        if not bool(live.any()):
            break
        first = alive.to(torch.int32).argmax(-1)  # the first surviving candidate of each list
        picks.append(torch.where(live, first, -1))
        alive = alive & ~_suppressed(cand, cand[rows, first][:, None], iou_t)
        alive[rows, first] = False
    if not picks:
        return torch.zeros((0, 3), dtype=torch.int64, device=device)
    pos = torch.stack(picks, 1)  # [L, S]: kept positions in visiting order, -1 past a list's end
    kept = pos >= 0
    list_id = rows[:, None].expand_as(pos)[kept]
    box = order[list_id, pos[kept]]
    return torch.stack([list_id // classes, list_id % classes, box], 1)


@register_op("NonMaxSuppression")
def non_max_suppression_op(node: NodeSpec) -> Kernel:
    """NonMaxSuppression with onnxruntime's CPU semantics (see `non_max_suppression`).

    Omitted inputs: max_output_boxes_per_class 0 (nothing is selected), iou_threshold 0, and no
    score threshold at all; a negative maximum counts as 0 and an iou_threshold outside [0, 1] is
    refused, as onnxruntime does.
    """
    center_point_box = int(node.attr("center_point_box", 0))
    if center_point_box not in (0, 1):
        raise CaffeOnnxError(f"NonMaxSuppression node {node.name!r}: center_point_box is {center_point_box!r}; "
                             "ONNX defines 0 (corners) and 1 (centre and size) only")
    static_max = ints(node.const(2))
    static_iou, static_score = node.const(3), node.const(4)
    has_score = node.has_input(4)

    def run(boxes: Tensor, scores: Tensor, max_out: Tensor | None = None, iou: Tensor | None = None,
            score_threshold: Tensor | None = None) -> Tensor:
        limit = host_ints(max_out, static_max)
        iou_threshold = _scalar(iou, static_iou, 0.0)
        if not 0.0 <= iou_threshold <= 1.0:
            raise CaffeOnnxError(f"NonMaxSuppression node {node.name!r}: iou_threshold is {iou_threshold!r}; "
                                 "it must be in [0, 1]")
        threshold = _scalar(score_threshold, static_score, 0.0) if has_score else None
        return non_max_suppression(boxes, scores, max(limit[0], 0) if limit else 0, iou_threshold, threshold,
                                   center_point_box)

    return run
