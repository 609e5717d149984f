"""ONNX ops that place values at computed positions: ScatterElements (unpooling) and Resize.

Both are differentiable the way Caffe's fork layers that emit them are: ScatterElements'
gradient with respect to its updates is a gather at the same indices (SegNet's Upsample
backward), and a linear Resize's is the adjoint of the interpolation (DeepLab's Interp
backward), which torch's interpolate gives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from caffeonnx.trainer.ops import Kernel, NodeSpec, host_ints, ints, register_op

Tensor = torch.Tensor


@register_op("ScatterElements")
def scatter_elements(node: NodeSpec) -> Kernel:
    """ScatterElements: data with `updates` written at `indices` along `axis` (reduction none/add/mul/max/min)."""
    axis = int(node.attr("axis", 0))
    reduction = node.attr("reduction", "none")
    if isinstance(reduction, bytes):
        reduction = reduction.decode()
    reduce = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}
    if reduction != "none" and reduction not in reduce:
        raise NotImplementedError(f"ScatterElements node {node.name!r}: reduction {reduction!r} is not supported")

    def run(data: Tensor, indices: Tensor, updates: Tensor) -> Tensor:
        a = axis + data.dim() if axis < 0 else axis
        idx = indices.to(data.device).long()
        idx = torch.where(idx < 0, idx + data.shape[a], idx)  # ONNX counts negative indices from the end
        if reduction == "none":
            # Duplicate indices keep one of the written values (ONNX leaves which undefined).
            return torch.scatter(data, a, idx, updates)
        return torch.scatter_reduce(data, a, idx, updates, reduce[reduction], include_self=True)

    return run


_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def _text(value: object, default: str) -> str:
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)


@register_op("Resize")
def resize(node: NodeSpec) -> Kernel:
    """Resize (opset 11+): linear with align_corners / half_pixel / pytorch_half_pixel / asymmetric, or nearest
    (asymmetric, floor).

    The output size comes from `sizes` (optionally over `axes`) or from floor(in · scale);
    only the spatial axes (2 and on) may change, as torch's interpolate resizes.  Linear
    asymmetric (x_in = x_out / scale, the given scale or out/in with sizes) has no torch
    interpolate mode and is built from gathers, whose autograd is the interpolation's adjoint.
    """
    mode = _text(node.attr("mode"), "nearest")
    transform = _text(node.attr("coordinate_transformation_mode"), "half_pixel")
    nearest_mode = _text(node.attr("nearest_mode"), "round_prefer_floor")
    axes_attr = node.attr("axes")
    if mode == "linear":
        if transform not in ("align_corners", "half_pixel", "pytorch_half_pixel", "asymmetric"):
            raise NotImplementedError(f"Resize node {node.name!r}: linear with {transform!r} is not supported")
    elif mode == "nearest":
        if transform != "asymmetric" or nearest_mode != "floor":
            raise NotImplementedError(f"Resize node {node.name!r}: nearest is supported with asymmetric "
                                      f"coordinates and floor rounding only (got {transform!r}, {nearest_mode!r})")
    else:
        raise NotImplementedError(f"Resize node {node.name!r}: mode {mode!r} is not supported")
    s_scales = node.const(2)
    s_sizes = ints(node.const(3))

    def run(x: Tensor, roi: Tensor | None = None, scales: Tensor | None = None, sizes: Tensor | None = None) -> Tensor:
        nd = x.dim()
        axes = [a + nd if a < 0 else a for a in (axes_attr or range(nd))]
        out = list(x.shape)
        factor = [1.0] * nd  # the scale each axis's coordinates are divided by (asymmetric)
        wanted = host_ints(sizes, s_sizes)
        if wanted is not None and len(wanted):
            for a, n in zip(axes, wanted):
                out[a] = n
                factor[a] = n / x.shape[a]
        else:
            factors = s_scales.reshape(-1).tolist() if s_scales is not None else (
                scales.reshape(-1).tolist() if scales is not None else [])
            if not factors:
                raise ValueError(f"Resize node {node.name!r}: neither sizes nor scales is given")
            for a, f in zip(axes, factors):
                factor[a] = float(torch.tensor(f, dtype=torch.float32))
                out[a] = int(x.shape[a] * factor[a])
        if out[:2] != list(x.shape[:2]):
            raise NotImplementedError(f"Resize node {node.name!r}: resizing the batch or channel axis "
                                      f"({list(x.shape)} -> {out}) is not supported")
        if mode == "linear" and transform == "asymmetric":
            return _linear_asymmetric(x, out, factor)
        if out == list(x.shape):  # every other supported mode maps each position onto itself
            return x
        size = out[2:]
        if mode == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        interp = _LINEAR_MODES.get(nd - 2)
        if interp is None:
            raise NotImplementedError(f"Resize node {node.name!r}: linear resize of a {nd}-D input")
        if transform == "pytorch_half_pixel" or (transform == "half_pixel" and all(n > 1 for n in size)):
            return F.interpolate(x, size=size, mode=interp, align_corners=False)
        if transform == "half_pixel":
            raise NotImplementedError(f"Resize node {node.name!r}: half_pixel to an output axis of length 1")
        return F.interpolate(x, size=size, mode=interp, align_corners=True)

    return run


def _linear_asymmetric(x: Tensor, out: list[int], factor: list[float]) -> Tensor:
    """Linear interpolation axis by axis at x_in = x_out / factor, clamped to [0, in − 1] as onnxruntime does."""
    for a in range(x.dim()):
        n_in, n_out = x.shape[a], out[a]
        if n_out == n_in and factor[a] == 1.0:
            continue
        pos = torch.arange(n_out, dtype=torch.float32, device=x.device) / torch.tensor(factor[a], dtype=torch.float32)
        pos = pos.clamp(0, n_in - 1)
        low = pos.floor().long().clamp(max=n_in - 1)
        high = (low + 1).clamp(max=n_in - 1)
        view = [1] * x.dim()
        view[a] = n_out
        frac = (pos - low.to(torch.float32)).to(x.dtype).reshape(view)
        x = x.index_select(a, low) * (1 - frac) + x.index_select(a, high) * frac
    return x
