"""Shape and data-movement ops: Concat, Split, Slice, Flatten/Reshape/Squeeze/Unsqueeze, Transpose, DepthToSpace,
aliases.

Caffe's Reshape copies data in order like ONNX's, so every reshape-like op is one
Reshape layer (Flatten at axis 1 is Caffe's Flatten).  Slices are Caffe Slice layers
whose unused parts go to a Silence layer.  A Transpose that only moves size-1 axes is
a Reshape; any other needs the Permute layer of SSD-style Caffe forks (extensions), as
DepthToSpace needs the forks' PixelShuffle.
"""
from __future__ import annotations

from caffeonnx.converter.foreign.caffe_layers import crop, reshape, silence
from caffeonnx.converter.foreign.context import NodeContext
from caffeonnx.converter.foreign.registry import register_op


@register_op("Identity", "Dropout")
def emit_identity(ctx: NodeContext) -> None:
    """Identity, Dropout (inference) -> no layer: the output is the input blob."""
    if ctx.op == "Dropout":
        training = ctx.const(2)
        if (ctx.has_input(2) and (training is None or bool(training.value))) or ctx.attr("is_test", 1) == 0:
            raise ctx.unsupported("dropout in training mode is random; export the model in eval mode")
        mask = ctx.node.output[1] if len(ctx.node.output) > 1 else ""
        if mask and (ctx.builder.users.get(mask) or mask in ctx.builder.graph.outputs):
            raise ctx.unsupported("the mask output is used; Caffe's Dropout has no mask top")
    ctx.alias(0, ctx.blob(0))


@register_op("Cast")
def emit_cast(ctx: NodeContext) -> None:
    """Cast of a float blob to float -> no layer (Caffe blobs are float32)."""
    if ctx.attr("to") != 1:  # TensorProto.FLOAT
        raise ctx.unsupported(f"cast to ONNX type {ctx.attr('to')!r}; Caffe blobs hold float32 only")
    ctx.alias(0, ctx.blob(0))


@register_op("Concat")
def emit_concat(ctx: NodeContext) -> None:
    """Concat -> Concat along the same axis."""
    inputs = [i for i in range(len(ctx.node.input)) if ctx.has_input(i)]
    if len(inputs) == 1:
        ctx.alias(0, ctx.blob(inputs[0]))
        return
    axis = int(ctx.attr("axis")) % len(ctx.out_shape())
    layer = ctx.layer("Concat", [ctx.blob(i) for i in inputs], [ctx.output()])
    layer.concat_param.axis = axis


def _used(ctx: NodeContext, name: str) -> bool:
    return bool(name) and (bool(ctx.builder.users.get(name)) or name in ctx.builder.graph.outputs)


@register_op("Split")
def emit_split(ctx: NodeContext) -> None:
    """Split -> Slice at the cumulative output sizes (unused parts silenced)."""
    shape = ctx.shape(0)
    axis = int(ctx.attr("axis", 0)) % len(shape)
    outputs = list(ctx.node.output)
    if len(outputs) == 1:
        ctx.alias(0, ctx.blob(0))
        return
    sizes = [ctx.builder.graph.shapes[o][axis] if o else 0 for o in outputs]
    tops = [o if _used(ctx, o) else ctx.temp(f"unused{i}") for i, o in enumerate(outputs)]
    p = ctx.layer("Slice", [ctx.blob(0)], tops).slice_param
    p.axis = axis
    point = 0
    for size in sizes[:-1]:
        point += size
        p.slice_point.append(point)
    silence(ctx, [t for t, o in zip(tops, outputs) if not _used(ctx, o)])


def _slice_args(ctx: NodeContext) -> tuple[list[int], list[int], list[int], list[int]]:
    """starts, ends, axes, steps from the inputs (opset 10+) or the attributes."""
    if ctx.opset < 10:
        starts, ends = list(ctx.attr("starts")), list(ctx.attr("ends"))
        axes = list(ctx.attr("axes", range(len(starts))))
        return starts, ends, axes, [1] * len(starts)
    values = []
    for index in (1, 2, 3, 4):
        c = ctx.const(index)
        if ctx.has_input(index) and c is None:
            raise ctx.unsupported(f"input {index} is computed; Caffe's Slice needs constant bounds")
        values.append(None if c is None else [int(v) for v in c.value.reshape(-1)])
    starts, ends, axes, steps = values
    assert starts is not None and ends is not None
    return starts, ends, axes or list(range(len(starts))), steps or [1] * len(starts)


@register_op("Slice")
def emit_slice(ctx: NodeContext) -> None:
    """Slice with step 1 -> Slice layers keeping [start, end) per axis (the rest silenced)."""
    shape = ctx.shape(0)
    ranges = [(0, d) for d in shape]
    for start, end, axis, step in zip(*_slice_args(ctx)):
        axis %= len(shape)
        if step != 1:
            raise ctx.unsupported(f"step {step} on axis {axis}; Caffe's Slice takes contiguous parts only")
        dim = shape[axis]
        start = min(max(start + dim if start < 0 else start, 0), dim)
        end = min(max(end + dim if end < 0 else end, 0), dim)
        if end <= start:
            raise ctx.unsupported(f"axis {axis} slice [{start}, {end}) is empty; Caffe blobs cannot be empty")
        ranges[axis] = (start, end)
    if ranges == [(0, d) for d in shape]:
        ctx.alias(0, ctx.blob(0))
    else:
        crop(ctx, ctx.blob(0), shape, ranges, ctx.output())


@register_op("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def emit_reshape(ctx: NodeContext) -> None:
    """Reshape, Flatten, Squeeze, Unsqueeze -> Reshape with the output shape (Flatten at axis 1 -> Flatten)."""
    in_shape, out_shape = ctx.shape(0), ctx.out_shape()
    if ctx.op == "Flatten" and int(ctx.attr("axis", 1)) % max(len(in_shape), 1) == 1 and len(in_shape) >= 2:
        ctx.layer("Flatten", [ctx.blob(0)], [ctx.output()])
        return
    reshape(ctx, ctx.blob(0), in_shape, out_shape, ctx.output())


@register_op("Transpose")
def emit_transpose(ctx: NodeContext) -> None:
    """Transpose moving only size-1 axes -> Reshape; any other -> Permute (extensions only)."""
    shape = ctx.shape(0)
    perm = list(ctx.attr("perm", list(range(len(shape)))[::-1]))
    moved = [a for a in perm if shape[a] != 1]
    if moved == sorted(moved):
        reshape(ctx, ctx.blob(0), shape, ctx.out_shape(), ctx.output())
        return
    if not ctx.options.extensions:
        raise ctx.unsupported(
            f"perm {perm!r} reorders data; stock Caffe 1.0 has no Permute layer: pass --allow-extensions "
            "(extensions=True) to write the Permute layer of SSD-style Caffe forks"
        )
    ctx.layer("Permute", [ctx.blob(0)], [ctx.output()]).permute_param.order.extend(perm)


@register_op("DepthToSpace")
def emit_depth_to_space(ctx: NodeContext) -> None:
    """DepthToSpace in CRD mode (torch's pixel_shuffle) -> PixelShuffle (extensions only)."""
    mode = ctx.attr("mode", "DCR")
    if mode != "CRD":
        raise ctx.unsupported(f"mode {mode!r} takes channel (i·b + j)·C + c; the forks' PixelShuffle takes CRD's "
                              "c·b² + i·b + j (torch.nn.PixelShuffle exports CRD)")
    if not ctx.options.extensions:
        raise ctx.unsupported(
            "stock Caffe 1.0 has no sub-pixel layer: pass --allow-extensions (extensions=True) to write the "
            "PixelShuffle layer of inisis/caffe-style Caffe forks"
        )
    layer = ctx.layer("PixelShuffle", [ctx.blob(0)], [ctx.output()])
    layer.pixelshuffle_param.upscale_factor = int(ctx.attr("blocksize"))
