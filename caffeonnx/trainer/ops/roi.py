"""MaxRoiPool: Fast R-CNN's ROI max pooling, with Caffe's ROIPoolingLayer arithmetic and gradient.

The converter emits MaxRoiPool for Caffe's ROIPooling (converter/layers/roi_pooling.py), whose
onnxruntime kernel follows ROIPoolingLayer::Forward_cpu; this kernel does the same in torch:
coordinates·spatial_scale in float, C's round() (half away from zero), roi size max(e - s + 1, 1),
float bin size, bins [floor(p·bin), ceil((p+1)·bin)) + start clipped to the map, the maximum from
-FLT_MAX, empty bins 0.  Each bin's maximum is found without a per-bin loop: a two-dimensional
sparse table holds, for every position and every power-of-two window 2^i × 2^j, the window's
maximum and where it is (ties go to the smaller flat index h·W + w, the element Caffe's row-major
scan with `>` meets first); a bin is covered by four such windows at its corners.  The top is
then gathered from the input at those positions, so autograd sends each top diff to exactly the
element Caffe's argmax names (Backward_cpu), empty bins and all -inf bins sending none.
"""
from __future__ import annotations

import torch

from caffeonnx.errors import CaffeOnnxError
from caffeonnx.trainer.ops import Kernel, NodeSpec, register_op

Tensor = torch.Tensor

FLT_MAX = 3.4028234663852886e38


def _c_round(v: Tensor) -> Tensor:
    """C's round() of float values: half away from zero (torch.round is half to even)."""
    mag = v.abs()
    whole = mag.floor()
    rounded = whole + (mag - whole >= 0.5).to(v.dtype)
    return torch.where(v < 0, -rounded, rounded)


def _bins(start: Tensor, end: Tensor, pooled: int, limit: int) -> tuple[Tensor, Tensor]:
    """Per ROI, the [lo, hi) of each of `pooled` bins along one axis (float values, clipped to [0, limit])."""
    size = torch.clamp(end - start + 1, min=1)
    bin_size = (size / torch.tensor(float(pooled), dtype=size.dtype, device=size.device))[:, None]
    p = torch.arange(pooled, dtype=size.dtype, device=size.device)
    lo = torch.floor(p * bin_size) + start[:, None]
    hi = torch.ceil((p + 1) * bin_size) + start[:, None]
    return lo.clamp(0, limit), hi.clamp(0, limit)


def _combine(value: Tensor, index: Tensor, dim: int, shift: int) -> tuple[Tensor, Tensor]:
    """Merge each window with the one `shift` further along `dim` (positions past the end reuse the last)."""
    size = value.shape[dim]
    other = torch.clamp(torch.arange(size, device=value.device) + shift, max=size - 1)
    v2, i2 = value.index_select(dim, other), index.index_select(dim, other)
    take = (v2 > value) | ((v2 == value) & (i2 < index))
    return torch.where(take, v2, value), torch.where(take, i2, index)


def _corners(lo: Tensor, hi: Tensor, levels: int, limit: int) -> tuple[Tensor, Tensor, Tensor]:
    """The level ⌊log2(hi - lo)⌋ and the two window starts (lo, hi - 2^level) of each bin, as int64."""
    length = (hi - lo).long()
    level = torch.zeros_like(length)
    for j in range(1, levels):
        level = level + (length >= 2**j).long()
    first = lo.long().clamp(0, limit - 1)
    second = (hi.long() - (1 << level)).clamp(0, limit - 1)
    return level, first, second


def _window_argmax(x: Tensor, levels_h: int, levels_w: int) -> Tensor:
    """[N·levels_h·levels_w·H·W, C]: row ((n·LH + i)·LW + j)·H·W + h·W + w holds where the maximum of
    x[n, c, h:h+2^i, w:w+2^j] is (flat h·W + w; windows are cut at the map's edge)."""
    _, c, height, width = x.shape
    value = x.detach().permute(0, 2, 3, 1)
    index = torch.arange(height * width, device=x.device).reshape(1, height, width, 1).expand_as(value)
    by_width = [(value, index)]
    for j in range(1, levels_w):
        by_width.append(_combine(*by_width[-1], 2, 2 ** (j - 1)))
    grid: dict[tuple[int, int], Tensor] = {}
    for j, level in enumerate(by_width):
        grid[0, j] = level[1]
        for i in range(1, levels_h):
            level = _combine(*level, 1, 2 ** (i - 1))
            grid[i, j] = level[1]
    where = torch.stack([grid[i, j] for i in range(levels_h) for j in range(levels_w)], 1)
    return where.reshape(-1, c)


def roi_max_pool(x: Tensor, rois: Tensor, pooled_h: int, pooled_w: int, scale: float) -> Tensor:
    """ROIPoolingLayer's forward: [R, C, pooled_h, pooled_w] from x [N, C, H, W] and rois [R, 5]."""
    n, c, height, width = x.shape
    rois = rois.detach().reshape(-1, 5).to(device=x.device, dtype=torch.float32)
    num = len(rois)
    batch = rois[:, 0].long()  # `int roi_batch_ind = bottom_rois[0]`: truncation
    if num and (int(batch.min()) < 0 or int(batch.max()) >= n):
        raise CaffeOnnxError(f"MaxRoiPool: a ROI's batch index is outside [0, {n}) "
                             f"(got {int(batch.min())}..{int(batch.max())}); Caffe's ROIPooling CHECK-fails on it")
    coords = _c_round(rois[:, 1:] * torch.tensor(scale, dtype=torch.float32, device=x.device))
    h_lo, h_hi = _bins(coords[:, 1], coords[:, 3], pooled_h, height)
    w_lo, w_hi = _bins(coords[:, 0], coords[:, 2], pooled_w, width)
    hl, h1, h2 = _corners(h_lo, h_hi, height.bit_length(), height)  # [R, ph]
    wl, w1, w2 = _corners(w_lo, w_hi, width.bit_length(), width)  # [R, pw]
    # only the window sizes some bin needs are tabulated
    lh = int(hl.max()) + 1 if num else 1
    lw = int(wl.max()) + 1 if num else 1
    where = _window_argmax(x, lh, lw)

    plane = height * width
    rows = [(((batch[:, None] * lh + hl) * lw) * plane + h * width)[:, :, None] for h in (h1, h2)]
    cols = [(wl * plane + w)[:, None, :] for w in (w1, w2)]
    stacked = torch.stack([where.index_select(0, (r + k).reshape(-1)).reshape(num, pooled_h, pooled_w, c)
                           for r in rows for k in cols])  # [4, R, ph, pw, C]: each window's argmax
    # the bin's argmax: the largest of the four windows' maxima, the smallest position among equals
    base = ((batch * c)[:, None, None, None] + torch.arange(c, device=x.device)) * plane  # [R, 1, 1, C]
    flat = x.detach().reshape(-1)
    cand = flat.index_select(0, (stacked + base).reshape(-1)).reshape(stacked.shape)
    best = cand.max(0).values
    pos = torch.where(cand == best, stacked, torch.full_like(stacked, plane)).min(0).values
    pos = torch.where(pos == plane, stacked[0], pos)  # NaN maxima: keep a valid position
    # gathered from x itself, so autograd sends each top diff to that element (Backward_cpu's argmax)
    top = x.reshape(-1).index_select(0, (pos + base).reshape(-1)).reshape(num, pooled_h, pooled_w, c)
    top = torch.clamp(top, min=-FLT_MAX)  # Caffe's maximum starts at -FLT_MAX
    empty = (h_hi <= h_lo)[:, :, None, None] | (w_hi <= w_lo)[:, None, :, None]
    top = torch.where(empty, torch.zeros((), dtype=top.dtype, device=x.device), top)
    return top.permute(0, 3, 1, 2)


@register_op("MaxRoiPool")
def max_roi_pool(node: NodeSpec) -> Kernel:
    """MaxRoiPool with Caffe's ROIPooling rounding; the gradient goes to each bin's first maximum."""
    pooled_h, pooled_w = (int(v) for v in node.attr("pooled_shape"))
    scale = float(node.attr("spatial_scale", 1.0))

    def run(x: Tensor, rois: Tensor) -> Tensor:
        return roi_max_pool(x, rois.to(x.device), pooled_h, pooled_w, scale)

    return run
