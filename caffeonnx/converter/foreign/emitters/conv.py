"""Conv and ConvTranspose as Caffe Convolution and Deconvolution (N-D, groups, dilation).

The weight layouts are the same in both worlds ([M, C/g, k...] and [C, M/g, k...]).
Caffe pads both ends of an axis alike.  A Conv uses pad = ONNX's begin pad (that places
the windows); when the end pad is smaller Caffe computes extra windows at the end,
which are sliced off.  A ConvTranspose's output is the full transposed convolution
cropped by ONNX's pads (and extended by output_padding); Caffe crops `pad` from both
ends, so the smaller crop is done by Caffe and the rest by Slice layers.
"""
from __future__ import annotations

from collections.abc import Sequence

from caffeonnx.converter.foreign.caffe_layers import crop
from caffeonnx.converter.foreign.context import NodeContext
from caffeonnx.converter.foreign.geometry import resolve_pads
from caffeonnx.converter.foreign.registry import register_op
from caffeonnx.proto import caffe_pb2


def _set_repeated(field: object, values: Sequence[int], default: int | None) -> None:
    """A repeated ConvolutionParameter field: nothing when all are the default, one value when all agree."""
    values = list(values)
    if default is not None and all(v == default for v in values):
        return
    field.extend(values[:1] if len(set(values)) == 1 else values)  # type: ignore[attr-defined]


def _geometry(ctx: NodeContext) -> tuple[list[int], list[int], list[int]]:
    """Kernel, stride and dilation per spatial axis, checked against the weight."""
    w = ctx.const(1)
    if w is None:
        raise ctx.unsupported("the weight is computed; Caffe convolutions need a constant weight (an initializer)")
    n = len(ctx.shape(0)) - 2
    if n < 1:
        raise ctx.error(f"input shape {list(ctx.shape(0))!r} has no spatial axis")
    kernel = list(w.value.shape[2:])
    given = ctx.attr("kernel_shape")
    if given is not None and list(given) != kernel:
        raise ctx.error(f"kernel_shape {list(given)!r} does not match the weight's {kernel!r}")
    return kernel, list(ctx.attr("strides", [1] * n)), list(ctx.attr("dilations", [1] * n))


def _conv_layer(ctx: NodeContext, layer_type: str, top: str, num_output: int, kernel: list[int],
                stride: list[int], pad: list[int], dilation: list[int]) -> None:
    """The Convolution/Deconvolution layer with its weight (and bias) params."""
    layer = ctx.layer(layer_type, [ctx.blob(0)], [top])
    p: caffe_pb2.ConvolutionParameter = layer.convolution_param
    p.num_output = num_output
    _set_repeated(p.kernel_size, kernel, None)
    _set_repeated(p.stride, stride, 1)
    _set_repeated(p.pad, pad, 0)
    _set_repeated(p.dilation, dilation, 1)
    group = int(ctx.attr("group", 1))
    if group != 1:
        p.group = group
    w = ctx.const(1)
    assert w is not None
    ctx.param(layer, w.value, "weight", w.source if w.same_order() else None)
    bias = ctx.const(2)
    if ctx.has_input(2) and bias is None:
        raise ctx.unsupported("the bias is computed; Caffe convolutions need a constant bias")
    p.bias_term = bias is not None
    if bias is not None:
        ctx.param(layer, bias.value.reshape(-1), "bias", bias.source if bias.same_order() else None)


@register_op("Conv")
def emit_conv(ctx: NodeContext) -> None:
    """Conv -> Convolution (pad = begin pad; surplus end windows of asymmetric pads sliced off)."""
    kernel, stride, dilation = _geometry(ctx)
    in_shape, out_shape = ctx.shape(0), ctx.out_shape()
    sizes = in_shape[2:]
    pads = resolve_pads(str(ctx.attr("auto_pad", "NOTSET")), list(ctx.attr("pads", [])), sizes, kernel, stride,
                        dilation)
    caffe_out = []
    for size, k, s, d, (pb, _) in zip(sizes, kernel, stride, dilation, pads):
        caffe_out.append((size + 2 * pb - (d * (k - 1) + 1)) // s + 1)
    want = list(out_shape[2:])
    if any(c < o for c, o in zip(caffe_out, want)):
        raise ctx.unsupported(
            f"pads {[p for side in zip(*pads) for p in side]!r} (begins, then ends) give {want!r} outputs per axis "
            f"but Caffe's symmetric pad can only give {caffe_out!r}; pad the input symmetrically in the model"
        )
    w = ctx.const(1)
    assert w is not None
    cut = caffe_out != want
    top = ctx.temp("uncropped") if cut else ctx.output()
    _conv_layer(ctx, "Convolution", top, w.value.shape[0], kernel, stride, [pb for pb, _ in pads], dilation)
    if cut:
        full = (*out_shape[:2], *caffe_out)
        crop(ctx, top, full, [(0, d) for d in out_shape[:2]] + [(0, o) for o in want], ctx.output())


@register_op("ConvTranspose")
def emit_conv_transpose(ctx: NodeContext) -> None:
    """ConvTranspose -> Deconvolution (pad = the smaller crop per axis; the rest, and output_padding, sliced)."""
    kernel, stride, dilation = _geometry(ctx)
    in_shape, out_shape = ctx.shape(0), ctx.out_shape()
    n = len(kernel)
    out_pad = list(ctx.attr("output_padding", [0] * n))
    auto_pad = str(ctx.attr("auto_pad", "NOTSET"))
    pads = list(ctx.attr("pads", [0] * (2 * n)))
    caffe_pad, ranges, caffe_out = [], [], []
    for a in range(n):
        full = stride[a] * (in_shape[2 + a] - 1) + dilation[a] * (kernel[a] - 1) + 1
        want = out_shape[2 + a]
        total = full + out_pad[a] - want  # what ONNX crops from the padded full output
        if ctx.attr("output_shape") is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        else:
            begin = 0 if auto_pad == "VALID" else pads[a]
        if begin < 0 or begin + want > full:
            raise ctx.unsupported(
                f"axis {a}: the output ({want}) reaches past the transposed convolution's {full} values "
                f"(output_padding {out_pad[a]} exceeds the end pad); Caffe's Deconvolution cannot pad its output"
            )
        p = min(begin, full - begin - want)
        caffe_pad.append(p)
        caffe_out.append(full - 2 * p)
        ranges.append((begin - p, begin - p + want))
    w = ctx.const(1)
    assert w is not None
    cut = caffe_out != list(out_shape[2:])
    top = ctx.temp("uncropped") if cut else ctx.output()
    _conv_layer(ctx, "Deconvolution", top, w.value.shape[1] * int(ctx.attr("group", 1)), kernel, stride, caffe_pad,
                dilation)
    if cut:
        crop(ctx, top, (*out_shape[:2], *caffe_out), [(0, d) for d in out_shape[:2]] + ranges, ctx.output())
