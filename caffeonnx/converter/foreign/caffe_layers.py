"""Small Caffe layer recipes the emitters share: Power, Reshape, crops (Slice + Silence), broadcasts."""
from __future__ import annotations

from collections.abc import Sequence

from caffeonnx.converter.foreign.context import NodeContext
from caffeonnx.converter.foreign.prepare import Shape


def power(ctx: NodeContext, bottom: str, top: str, *, power: float = 1.0, scale: float = 1.0,
          shift: float = 0.0) -> str:
    """Caffe Power: y = (shift + scale·x)^power."""
    p = ctx.layer("Power", [bottom], [top]).power_param
    if power != 1.0:
        p.power = power
    if scale != 1.0:
        p.scale = scale
    if shift != 0.0:
        p.shift = shift
    return top


def relu(ctx: NodeContext, bottom: str, top: str) -> str:
    """Caffe ReLU: max(x, 0)."""
    ctx.layer("ReLU", [bottom], [top])
    return top


def reshape(ctx: NodeContext, bottom: str, in_shape: Shape, out_shape: Shape, top: str) -> str:
    """Caffe Reshape to `out_shape`; an unchanged leading (batch) dimension is written as 0 (copy it)."""
    dims = list(out_shape)
    if dims and in_shape and dims[0] == in_shape[0]:
        dims[0] = 0
    ctx.layer("Reshape", [bottom], [top]).reshape_param.shape.dim.extend(dims)
    return top


def silence(ctx: NodeContext, blobs: Sequence[str]) -> None:
    """Caffe Silence: consume blobs nothing else reads (so they are no net outputs)."""
    if blobs:
        ctx.layer("Silence", list(blobs), [])


def crop(ctx: NodeContext, bottom: str, shape: Shape, ranges: Sequence[tuple[int, int]], top: str) -> str:
    """Keep [start, stop) of every axis with Caffe Slice layers (one per cut axis), silencing the rest.

    The last Slice writes `top`; callers cut at least one axis.
    """
    cuts = [(axis, start, stop) for axis, (start, stop) in enumerate(ranges) if (start, stop) != (0, shape[axis])]
    current = bottom
    for i, (axis, start, stop) in enumerate(cuts):
        kept = top if i == len(cuts) - 1 else ctx.temp(f"crop{axis}")
        points = [p for p in (start, stop) if 0 < p < shape[axis]]
        tops, dropped = [], []
        for j, (lo, hi) in enumerate(zip([0, *points], [*points, shape[axis]])):
            if lo == start:
                tops.append(kept)
            else:
                dropped.append(ctx.temp(f"cut{axis}_{j}"))
                tops.append(dropped[-1])
        p = ctx.layer("Slice", [current], tops).slice_param
        p.axis = axis
        p.slice_point.extend(points)
        silence(ctx, dropped)
        current = kept
    return current


def broadcast_span(big: Shape, small: Shape) -> tuple[int, Shape] | None:
    """Where `small` broadcasts onto `big` as Caffe's Scale/Bias see it: (axis, big[axis:axis+k]).

    Returns None when `small` also broadcasts inside that span (a 1 against a larger
    dimension), which Caffe's Scale/Bias cannot do; (len(big), ()) for a single value.
    """
    if len(small) > len(big):
        if any(d != 1 for d in small[: len(small) - len(big)]):
            return None
        small = small[len(small) - len(big):]
    padded = (1,) * (len(big) - len(small)) + tuple(small)
    core = [i for i, d in enumerate(padded) if d != 1]
    if not core:
        return len(big), ()
    lo, hi = core[0], core[-1] + 1
    if any(padded[i] != big[i] for i in range(lo, hi)):
        return None
    return lo, tuple(big[lo:hi])
