"""ONNX ops that move data without arithmetic: reshapes, slicing, joining, gathering, padding."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from caffeonnx.trainer.ops import Kernel, NodeSpec, host_ints, ints, register_op

Tensor = torch.Tensor


def _axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


@register_op("Constant")
def constant(node: NodeSpec) -> Kernel:
    """Constant: the value stored in the node (tensor, float(s) or int(s))."""
    value = constant_value(node)
    return lambda: torch.from_numpy(value.copy())


def constant_value(node: NodeSpec) -> np.ndarray:
    """The numpy value of a Constant node."""
    a = node.attrs
    if "value" in a:
        return np.asarray(a["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):
        if key in a:
            return np.asarray(a[key], dtype=dtype)
    raise NotImplementedError(f"Constant node {node.name!r}: only tensor/float/int values are supported, got {sorted(a)}")


@register_op("Reshape")
def reshape(node: NodeSpec) -> Kernel:
    """Reshape: 0 copies the input's dimension (unless allowzero), −1 is inferred."""
    static = ints(node.const(1))
    allowzero = node.attr("allowzero", 0)

    def run(x: Tensor, shape: Tensor) -> Tensor:
        dims = host_ints(shape, static)
        assert dims is not None
        if not allowzero:
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return x.reshape(dims)

    return run


@register_op("Flatten")
def flatten(node: NodeSpec) -> Kernel:
    """Flatten: 2-D (prod(dims before axis), prod(dims from axis))."""
    axis = int(node.attr("axis", 1))

    def run(x: Tensor) -> Tensor:
        a = _axis(axis, x.dim())
        return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))

    return run


@register_op("Transpose")
def transpose(node: NodeSpec) -> Kernel:
    """Transpose: permute the axes (reversed when perm is absent)."""
    perm = node.attr("perm")

    def run(x: Tensor) -> Tensor:
        if x.dim() == 2 and perm in (None, [1, 0]):
            return x.t()
        return x.permute(perm if perm is not None else list(range(x.dim() - 1, -1, -1)))

    return run


@register_op("Squeeze")
def squeeze(node: NodeSpec) -> Kernel:
    """Squeeze: drop the given size-1 axes (all size-1 axes when none are given)."""
    static = node.attr("axes") or ints(node.const(1))

    def run(x: Tensor, axes: Tensor | None = None) -> Tensor:
        ax = host_ints(axes, static)
        if not ax:
            return x.squeeze()
        keep = {_axis(a, x.dim()) for a in ax}
        return x.reshape([d for i, d in enumerate(x.shape) if i not in keep])

    return run


@register_op("Unsqueeze")
def unsqueeze(node: NodeSpec) -> Kernel:
    """Unsqueeze: insert size-1 axes at the given positions of the output."""
    static = node.attr("axes") or ints(node.const(1))

    def run(x: Tensor, axes: Tensor | None = None) -> Tensor:
        ax = host_ints(axes, static) or []
        out_rank = x.dim() + len(ax)
        shape = list(x.shape)
        for a in sorted(_axis(a, out_rank) for a in ax):
            shape.insert(a, 1)
        return x.reshape(shape)

    return run


@register_op("Concat")
def concat(node: NodeSpec) -> Kernel:
    """Concat: join along `axis` (Caffe Concat)."""
    axis = int(node.attr("axis"))
    return lambda *xs: torch.cat([x for x in xs if x is not None], dim=axis)


@register_op("Split")
def split(node: NodeSpec) -> Kernel:
    """Split: explicit sizes, or equal parts (the last one smaller when uneven)."""
    axis = int(node.attr("axis", 0))
    static = node.attr("split") or ints(node.const(1))
    parts = int(node.attr("num_outputs", len(node.outputs)))

    def run(x: Tensor, sizes: Tensor | None = None) -> tuple[Tensor, ...]:
        s = host_ints(sizes, static)
        if s is None:
            s = math.ceil(x.shape[axis] / parts)
        return tuple(torch.split(x, s, dim=axis))

    return run


def _slice_bounds(start: int, end: int, step: int, dim: int) -> tuple[int, int]:
    """ONNX Slice's clamping of start/end for one axis."""
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        return min(max(start, 0), dim), min(max(end, 0), dim)
    return min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)


@register_op("Slice")
def slice_(node: NodeSpec) -> Kernel:
    """Slice: per-axis start/end/step, clamped as ONNX specifies (negative steps too)."""
    s_starts, s_ends = ints(node.const(1)), ints(node.const(2))
    s_axes, s_steps = ints(node.const(3)), ints(node.const(4))

    def run(x: Tensor, starts: Tensor, ends: Tensor, axes: Tensor | None = None, steps: Tensor | None = None) -> Tensor:
        st, en = host_ints(starts, s_starts), host_ints(ends, s_ends)
        assert st is not None and en is not None
        ax = host_ints(axes, s_axes) or list(range(len(st)))
        sp = host_ints(steps, s_steps) or [1] * len(st)
        index: list[slice] = [slice(None)] * x.dim()
        flips = []
        for a, b, e, s in zip(ax, st, en, sp):
            a = _axis(a, x.dim())
            b, e = _slice_bounds(b, e, s, x.shape[a])
            if s > 0:
                index[a] = slice(b, max(b, e), s)
            else:
                # torch has no negative steps: take the same elements ascending, then flip.
                count = max(0, math.ceil((b - e) / -s))
                lo = b + s * (count - 1) if count else 0
                index[a] = slice(lo, lo + (-s) * (count - 1) + 1 if count else 0, -s)
                flips.append(a)
        y = x[tuple(index)]
        return torch.flip(y, flips) if flips else y

    return run


@register_op("Gather")
def gather(node: NodeSpec) -> Kernel:
    """Gather: take entries along `axis` (negative indices count from the end)."""
    axis = int(node.attr("axis", 0))

    def run(x: Tensor, idx: Tensor) -> Tensor:
        a = _axis(axis, x.dim())
        idx = idx.to(x.device).long()
        idx = torch.where(idx < 0, idx + x.shape[a], idx)
        out = x.index_select(a, idx.reshape(-1))
        return out.reshape((*x.shape[:a], *idx.shape, *x.shape[a + 1:]))  # () for a scalar from a 1-D x

    return run


@register_op("GatherElements")
def gather_elements(node: NodeSpec) -> Kernel:
    """GatherElements: torch.gather along `axis`."""
    axis = int(node.attr("axis", 0))

    def run(x: Tensor, idx: Tensor) -> Tensor:
        a = _axis(axis, x.dim())
        idx = idx.to(x.device).long()
        return torch.gather(x, a, torch.where(idx < 0, idx + x.shape[a], idx))

    return run


@register_op("Expand")
def expand(node: NodeSpec) -> Kernel:
    """Expand: broadcast to `shape` (numpy rules, so the result may be larger than `shape`)."""
    static = ints(node.const(1))

    def run(x: Tensor, shape: Tensor) -> Tensor:
        dims = host_ints(shape, static)
        assert dims is not None
        return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(dims)))

    return run


@register_op("Tile")
def tile(node: NodeSpec) -> Kernel:
    """Tile: repeat the tensor `repeats[i]` times along axis i."""
    static = ints(node.const(1))
    return lambda x, repeats: x.repeat(host_ints(repeats, static))


@register_op("Shape")
def shape(node: NodeSpec) -> Kernel:
    """Shape: the input's dimensions as int64 (optionally a start:end range of them)."""
    start, end = node.attr("start", 0), node.attr("end")
    return lambda x: torch.tensor(list(x.shape)[start:end], dtype=torch.int64, device=x.device)


@register_op("Size")
def size(node: NodeSpec) -> Kernel:
    """Size: the element count as an int64 scalar."""
    return lambda x: torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@register_op("ConstantOfShape")
def constant_of_shape(node: NodeSpec) -> Kernel:
    """ConstantOfShape: a tensor of `shape` filled with `value` (float 0 by default)."""
    value = np.asarray(node.attr("value", np.zeros(1, dtype=np.float32)))
    static = ints(node.const(0))

    def run(shape: Tensor) -> Tensor:
        dims = host_ints(shape, static)
        fill = torch.from_numpy(value.reshape(-1)[:1].copy())
        return torch.full(dims or [], fill.item(), dtype=fill.dtype, device=shape.device)

    return run


@register_op("Range")
def range_(node: NodeSpec) -> Kernel:
    """Range: start, start + delta, ... up to (not including) limit."""
    return lambda start, limit, delta: torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype,
                                                    device=start.device)


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


@register_op("Pad")
def pad(node: NodeSpec) -> Kernel:
    """Pad: [begins..., ends...] per axis, constant/reflect/edge/wrap (negative pads crop)."""
    mode = node.attr("mode", "constant")
    if mode not in _PAD_MODES:
        raise NotImplementedError(f"Pad node {node.name!r}: mode {mode!r} is not supported")
    s_pads = node.attr("pads") or ints(node.const(1))
    s_axes = ints(node.const(3))
    s_value = node.const(2)
    attr_value = float(node.attr("value", 0.0))

    def run(x: Tensor, pads: Tensor | None = None, value: Tensor | None = None, axes: Tensor | None = None) -> Tensor:
        p = host_ints(pads, s_pads)
        assert p is not None
        ax = [_axis(a, x.dim()) for a in (host_ints(axes, s_axes) or range(x.dim()))]
        n = len(ax)
        per_axis = {a: (p[i], p[i + n]) for i, a in enumerate(ax)}
        padded = [a for a, v in per_axis.items() if v != (0, 0)]
        if not padded:
            return x
        torch_pads: list[int] = []
        for a in range(x.dim() - 1, min(padded) - 1, -1):  # F.pad lists the last axis first
            torch_pads += list(per_axis.get(a, (0, 0)))
        if mode == "constant":
            fill = s_value.reshape(-1)[0].item() if s_value is not None and s_value.size else (
                value.reshape(-1)[0].item() if value is not None and value.numel() else attr_value)
            return F.pad(x, torch_pads, mode="constant", value=fill)
        return F.pad(x, torch_pads, mode=_PAD_MODES[mode])

    return run


@register_op("Einsum")
def einsum(node: NodeSpec) -> Kernel:
    """Einsum: torch.einsum with the node's equation."""
    equation = node.attr("equation")
    return lambda *xs: torch.einsum(equation, *xs)


@register_op("ArgMax", "ArgMin")
def arg_max_min(node: NodeSpec) -> Kernel:
    """ArgMax/ArgMin along `axis` (first or last occurrence), int64."""
    axis, keep, last = int(node.attr("axis", 0)), bool(node.attr("keepdims", 1)), bool(node.attr("select_last_index", 0))
    fn = torch.argmax if node.op_type == "ArgMax" else torch.argmin

    def run(x: Tensor) -> Tensor:
        if last:
            a = _axis(axis, x.dim())
            flipped = fn(torch.flip(x, [a]), dim=a, keepdim=keep)
            return x.shape[a] - 1 - flipped
        return fn(x, dim=axis, keepdim=keep)

    return run


@register_op("TopK")
def topk(node: NodeSpec) -> Kernel:
    """TopK: the k largest (or smallest) values along `axis` and their int64 indices.

    ONNX breaks ties by index (the lower first), which graphs use as a stable sort (SSD's
    DetectionOutput orders its rows so); torch.topk does not promise it, a stable sort does.
    """
    axis, largest = int(node.attr("axis", -1)), bool(node.attr("largest", 1))
    static = ints(node.const(1))

    def run(x: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        kk = host_ints(k, static)
        assert kk is not None
        values, indices = torch.sort(x, dim=axis, descending=largest, stable=True)
        return values.narrow(axis, 0, kk[0]), indices.narrow(axis, 0, kk[0])

    return run

