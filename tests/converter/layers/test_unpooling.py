"""DeconvNet's Unpooling (V1 type UNPOOLING) against a numpy transcription of its C++
(HyeonwooNoh/caffe unpooling_layer.cpp / .cu), forward through onnxruntime and the trainer,
backward through autograd; nets are written as DeconvNet's V1 prototxts write them.

The pooling masks come from the Pooling reference of tests/converter/layers/caffe_ref_spatial.py.
OpenCV DNN has no UNPOOLING layer (its V1 upgrade does not know the type), so the numpy transcription
is the only reference.  Tolerances: MAX moves values, so it is exact, forward and backward; AVE and
TILE sum the same float32 terms in another order: atol 1e-5, rtol 1e-5 (measured: at most 4.8e-7).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from caffeonnx.converter.caffe_to_onnx import convert_files, load_net, load_weights
from caffeonnx.converter.metadata import net_without_blobs
from caffeonnx.converter.onnx_to_caffe import convert_to_caffe_files
from caffeonnx.errors import CaffeOnnxError, LayerError
from caffeonnx.proto import caffe_pb2
from tests.converter.layers.caffe_ref_spatial import caffe_pool
from tests.converter.layers.graph_grad import forward_backward
from tests.helpers import assert_close, convert_text, rng, run

# --- numpy transcription of UnpoolingLayer ------------------------------------------------------


def _windows(height: int, width: int, kernel: tuple[int, int], stride: tuple[int, int], out: tuple[int, int]):
    """Per bottom position (ph, pw): its window [hstart, hend) × [wstart, wend) in the top and pool_size (pad 0)."""
    for ph in range(height):
        for pw in range(width):
            hstart, wstart = ph * stride[0], pw * stride[1]
            hend, wend = min(hstart + kernel[0], out[0]), min(wstart + kernel[1], out[1])
            pool_size = (hend - hstart) * (wend - wstart)
            yield ph, pw, (max(hstart, 0), min(hend, out[0]), max(wstart, 0), min(wend, out[1])), pool_size


def unpool_forward(x: np.ndarray, mask: np.ndarray | None, method: str, kernel: tuple[int, int],
                   stride: tuple[int, int], out: tuple[int, int]) -> np.ndarray:
    """Forward_cpu in float32 on a zero top (the CPU's first pass, the GPU's every pass)."""
    num, channels, height, width = x.shape
    top = np.zeros((num, channels, out[0] * out[1]), np.float32)
    for n in range(num):
        for c in range(channels):
            src = x[n, c].reshape(-1)
            for ph, pw, (hs, he, ws, we), pool_size in _windows(height, width, kernel, stride, out):
                index = ph * width + pw
                if method == "MAX":
                    uph, upw = max(0, min(ph * stride[0], out[0] - 1)), max(0, min(pw * stride[1], out[1] - 1))
                    k = int(mask[n, c].reshape(-1)[index]) if mask is not None else uph * out[1] + upw
                    top[n, c, k] = src[index]
                    continue
                with np.errstate(divide="ignore"):  # a window starting past the top: pool_size 0, nothing added
                    value = src[index] / np.float32(pool_size) if method == "AVE" else src[index]
                for h in range(hs, he):
                    for w in range(ws, we):
                        top[n, c, h * out[1] + w] += value
    return top.reshape(num, channels, *out)


def unpool_backward(top_diff: np.ndarray, mask: np.ndarray | None, method: str, kernel: tuple[int, int],
                    stride: tuple[int, int], in_shape: tuple[int, ...]) -> np.ndarray:
    """Backward_cpu: MAX gathers the top diff at the mask offset (or the corner); AVE and TILE both
    sum the diff over the window and divide by pool_size."""
    num, channels, height, width = in_shape
    out = top_diff.shape[2:]
    flat = top_diff.reshape(num, channels, -1)
    bottom = np.zeros((num, channels, height * width), np.float32)
    for n in range(num):
        for c in range(channels):
            for ph, pw, (hs, he, ws, we), pool_size in _windows(height, width, kernel, stride, out):
                index = ph * width + pw
                if method == "MAX":
                    uph, upw = max(0, min(ph * stride[0], out[0] - 1)), max(0, min(pw * stride[1], out[1] - 1))
                    k = int(mask[n, c].reshape(-1)[index]) if mask is not None else uph * out[1] + upw
                    bottom[n, c, index] = flat[n, c, k]
                    continue
                total = np.float32(0)
                for h in range(hs, he):
                    for w in range(ws, we):
                        total += flat[n, c, h * out[1] + w]
                with np.errstate(invalid="ignore"):  # 0 / 0 for a window starting past the top, as in C++
                    bottom[n, c, index] = total / np.float32(pool_size)
    return bottom.reshape(in_shape)


# --- nets as DeconvNet writes them ---------------------------------------------------------------

def _header(shape: tuple[int, ...], name: str = "data") -> str:
    return f'input: "{name}"\n' + "".join(f"input_dim: {d}\n" for d in shape)


def _decoder(shape: tuple[int, ...], pooling: str, unpooling: str) -> str:
    """pool1 with its mask top and unpool1 reading it, as DeconvNet_inference_deploy.prototxt lays them out."""
    return 'name: "DeconvNet_inference_deploy"\n\n' + _header(shape) + f"""
# pool1
layers {{
  bottom: "data"  top: "pool1" top:"pool1_mask"  name: "pool1"  type: POOLING
  pooling_param {{    {pooling}  }}
}}

# unpool1
layers {{ type: UNPOOLING  bottom: "pool1"  bottom: "pool1_mask"  top: "unpool1"  name: "unpool1"
  unpooling_param {{   {unpooling} }}
}}
"""


# (input H, W, kernel, stride, pooling_param, unpooling_param) in DeconvNet's spellings
DECODER_CASES = [
    (8, 8, 2, 2, "pool: MAX    kernel_size: 2    stride: 2", "unpool: MAX   kernel_size: 2    stride: 2   unpool_size: 8"),
    # odd input: Caffe's ceil pooling gives 4 x 5 windows, the last ones partial; the top is the pooling's bottom
    (7, 9, 2, 2, "pool: MAX    kernel_size: 2    stride: 2",
     "unpool: MAX   kernel_size: 2    stride: 2   unpool_h: 7  unpool_w: 9"),
    # overlapping windows (kernel 3, stride 2): two pooled values may share one argmax
    (9, 9, 3, 2, "pool: MAX    kernel_size: 3    stride: 2", "kernel_size: 3    stride: 2   unpool_size: 9"),
]


@pytest.mark.parametrize(("height", "width", "kernel", "stride", "pooling", "unpooling"), DECODER_CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_pool_then_unpool_matches_deconvnet(height: int, width: int, kernel: int, stride: int, pooling: str,
                                             unpooling: str, ties: bool) -> None:
    """V1 POOLING's mask top feeds V1 UNPOOLING: onnxruntime and the trainer give Caffe's top, and the
    trainer's input gradient is Unpooling's gather composed with Pooling's routing to the argmax."""
    g = rng(height * width + kernel + ties)
    shape = (2, 3, height, width)
    x = (g.integers(0, 3, size=shape) if ties else g.normal(size=shape)).astype(np.float32)
    pooled, mask = caffe_pool(x, "MAX", (kernel, kernel), (stride, stride), (0, 0))
    pooled = pooled.astype(np.float32)
    want = unpool_forward(pooled, mask, "MAX", (kernel, kernel), (stride, stride), (height, width))
    text = _decoder(shape, pooling, unpooling)
    outs = run(convert_text(text, all_blobs=True), {"data": x})
    np.testing.assert_array_equal(outs["pool1_mask"], mask.astype(np.float32))
    np.testing.assert_array_equal(outs["unpool1"], want)
    dy = rng(5).normal(size=want.shape).astype(np.float32)
    got, grads = forward_backward(text, {"data": x}, "unpool1", dy, ["data"])
    np.testing.assert_array_equal(got, want)
    d_pooled = unpool_backward(dy, mask, "MAX", (kernel, kernel), (stride, stride), pooled.shape)
    dx = np.zeros(shape, np.float32).reshape(2, 3, -1)  # PoolingLayer's MAX backward: += at the argmax
    for n in range(2):
        for c in range(3):
            np.add.at(dx[n, c], mask[n, c].reshape(-1).astype(np.int64), d_pooled[n, c].reshape(-1))
    np.testing.assert_array_equal(grads["data"], dx.reshape(shape))


def _fed_mask_net(shape: tuple[int, ...], param: str) -> str:
    return (_header(shape) + _header(shape, "mask")
            + f'layers {{ type: UNPOOLING bottom: "data" bottom: "mask" top: "up" name: "up"\n'
              f"  unpooling_param {{ {param} }} }}\n")


@pytest.mark.parametrize(("shape", "param", "out"), [
    ((2, 3, 4, 5), "unpool: MAX kernel_size: 2 stride: 2 unpool_h: 9 unpool_w: 11", (9, 11)),
    ((1, 2, 3, 3), "kernel_h: 3 kernel_w: 2 stride_h: 3 stride_w: 2 unpool_size: 8", (8, 8)),
])
def test_mask_scatter_and_gather_like_caffe(shape: tuple[int, ...], param: str, out: tuple[int, int]) -> None:
    """Any mask of distinct in-range offsets: the top is Forward_cpu's scatter, the data gradient Backward_cpu's gather."""
    g = rng(sum(shape))
    x = g.normal(size=shape).astype(np.float32)
    mask = np.stack([np.stack([g.permutation(out[0] * out[1])[:shape[2] * shape[3]].reshape(shape[2:])
                               for _ in range(shape[1])]) for _ in range(shape[0])]).astype(np.float32)
    want = unpool_forward(x, mask, "MAX", (2, 2), (2, 2), out)  # kernel and stride play no part with a mask
    text = _fed_mask_net(shape, param)
    np.testing.assert_array_equal(run(convert_text(text), {"data": x, "mask": mask})["up"], want)
    dy = g.normal(size=want.shape).astype(np.float32)
    got, grads = forward_backward(text, {"data": x, "mask": mask}, "up", dy, ["data", "mask"])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(grads["data"], unpool_backward(dy, mask, "MAX", (2, 2), (2, 2), shape))
    assert not grads["mask"].any()  # Caffe propagates nothing to the mask


def _single(shape: tuple[int, ...], param: str) -> str:
    return _header(shape) + f'layers {{ type: UNPOOLING bottom: "data" top: "up" name: "up"\n  unpooling_param {{ {param} }} }}\n'


@pytest.mark.parametrize(("shape", "kernel", "stride", "out", "collide"), [
    ((2, 3, 4, 5), (2, 2), (2, 2), (8, 10), False),
    ((1, 2, 3, 4), (3, 2), (3, 2), (10, 9), False),  # a top larger than the windows reach: zeros beyond
    ((2, 2, 5, 5), (2, 2), (2, 2), (6, 7), True),  # a smaller top: the last row/column clamp onto one position
])
def test_max_without_mask_puts_values_at_window_corners(shape: tuple[int, ...], kernel: tuple[int, int],
                                                        stride: tuple[int, int], out: tuple[int, int],
                                                        collide: bool) -> None:
    """One bottom: value (ph, pw) at (min(ph·stride, H'−1), min(pw·stride, W'−1)), a later one overwriting."""
    x = rng(sum(shape) + out[0]).normal(size=shape).astype(np.float32)
    param = (f"unpool: MAX kernel_h: {kernel[0]} kernel_w: {kernel[1]} stride_h: {stride[0]} stride_w: {stride[1]} "
             f"unpool_h: {out[0]} unpool_w: {out[1]}")
    want = unpool_forward(x, None, "MAX", kernel, stride, out)
    np.testing.assert_array_equal(run(convert_text(_single(shape, param)), {"data": x})["up"], want)
    dy = rng(3).normal(size=want.shape).astype(np.float32)
    got, grads = forward_backward(_single(shape, param), {"data": x}, "up", dy, ["data"])
    np.testing.assert_array_equal(got, want)
    caffe = unpool_backward(dy, None, "MAX", kernel, stride, shape)
    if collide:  # documented: an overwritten value gets no gradient, where Caffe gives it its position's diff
        kept = np.isin(x, want)
        assert not kept.all()
        caffe = np.where(kept, caffe, 0)
    np.testing.assert_array_equal(grads["data"], caffe)


@pytest.mark.parametrize("method", ["AVE", "TILE"])
@pytest.mark.parametrize(("shape", "kernel", "stride", "out"), [
    ((2, 3, 4, 4), (2, 2), (2, 2), (8, 8)),
    ((1, 2, 3, 4), (3, 3), (2, 2), (7, 9)),  # overlapping windows, exactly the reach
    ((2, 2, 4, 3), (3, 2), (2, 1), (6, 6)),  # windows cut by the top (reach 9 x 4): AVE divides by the clipped area
    ((1, 1, 2, 3), (2, 3), (3, 2), (8, 10)),  # gaps between windows and zeros beyond them
])
def test_ave_and_tile_spread_values_over_their_windows(method: str, shape: tuple[int, ...], kernel: tuple[int, int],
                                                       stride: tuple[int, int], out: tuple[int, int]) -> None:
    """AVE/TILE forwards against the transcription; AVE's backward is Caffe's, TILE's is the true gradient
    (Caffe's divides by pool_size, which TILE's forward does not: see layers/unpooling.py)."""
    x = rng(sum(shape) + len(method)).normal(size=shape).astype(np.float32)
    param = (f"unpool: {method} kernel_h: {kernel[0]} kernel_w: {kernel[1]} stride_h: {stride[0]} "
             f"stride_w: {stride[1]} unpool_h: {out[0]} unpool_w: {out[1]}")
    text = _single(shape, param)
    want = unpool_forward(x, None, method, kernel, stride, out)
    assert_close(run(convert_text(text), {"data": x})["up"], want, f"{method} top", atol=1e-5, rtol=1e-5)
    dy = rng(4).normal(size=want.shape).astype(np.float32)
    got, grads = forward_backward(text, {"data": x}, "up", dy, ["data"])
    assert_close(got, want, f"{method} trainer top", atol=1e-5, rtol=1e-5)
    caffe = unpool_backward(dy, None, method, kernel, stride, shape)
    sizes = np.array([pool_size for *_, pool_size in _windows(shape[2], shape[3], kernel, stride, out)],
                     np.float32).reshape(1, 1, shape[2], shape[3])
    if method == "TILE":
        caffe = caffe * sizes
    # documented: a window starting past the top reaches nothing and gets gradient 0 (Caffe: 0 / 0, NaN)
    caffe = np.where(sizes > 0, caffe, np.float32(0))
    assert_close(grads["data"], caffe, f"{method} bottom diff", atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("text", "match"), [
    (_single((1, 1, 2, 2), "kernel_size: 2 stride: 2"), r"Unpool is unpool_size OR unpool_h and unpool_w are required"),
    (_single((1, 1, 2, 2), "kernel_size: 2 stride: 2 unpool_size: 4 unpool_h: 4 unpool_w: 4"),
     r"Unpool is unpool_size OR unpool_h and unpool_w"),
    (_single((1, 1, 2, 2), "kernel_size: 2 kernel_h: 2 kernel_w: 2 unpool_size: 4"), r"kernel_size OR kernel_h and kernel_w"),
    (_single((1, 1, 2, 2), "stride: 2 unpool_size: 4"), r"kernel_size OR kernel_h and kernel_w"),
    (_single((1, 1, 2, 2), "kernel_size: 2 stride: 2 pad: 1 unpool_size: 4"), r"only zero padding is allowed"),
    (_single((1, 1, 2, 2), "kernel_size: 2 stride: 2 pad_h: 1 unpool_size: 4"), r"pad is pad OR pad_h and pad_w"),
    (_single((1, 1, 2, 2), "kernel_size: 0 unpool_size: 4"), r"Filter dimensions cannot be zero"),
    (_single((1, 1, 2, 2), "kernel_size: 2 unpool_size: 0"), r"unpooled size \[0, 0\] must be > 0"),
    (_fed_mask_net((1, 1, 2, 2), "unpool: AVE kernel_size: 2 stride: 2 unpool_size: 4"),
     r"at most 1 bottom blob\(s\) as input with unpool AVE"),
    (_header((1, 1, 2, 2)) + _header((1, 1, 2, 3), "mask") + 'layers { type: UNPOOLING bottom: "data" bottom: "mask" '
     'top: "up" name: "up" unpooling_param { kernel_size: 2 stride: 2 unpool_size: 4 } }\n',
     r"must have the shape of the input"),
])
def test_unpooling_errors_name_the_problem(text: str, match: str) -> None:
    with pytest.raises(LayerError, match=match):
        convert_text(text)


def test_unpooling_needs_opset_11() -> None:
    with pytest.raises(LayerError, match="opset 11 or later"):
        convert_text(_single((1, 1, 2, 2), "kernel_size: 2 stride: 2 unpool_size: 4"), opset=10)


# --- DeconvNet's own files: a V1 caffemodel with BN, and to-caffe ----------------------------------

DECONVNET_TAIL = _header((1, 3, 6, 6)) + """
layers { bottom: 'data' top: 'data' name: 'bn1_1' type: BN
  bn_param { scale_filler { type: 'constant' value: 1 }
             shift_filler { type: 'constant' value: 0.001 }
             bn_mode: INFERENCE } }
layers {  bottom: "data"  top: "data"  name: "relu1_1"  type: RELU}

# pool1
layers {
  bottom: "data"  top: "pool1" top:"pool1_mask"  name: "pool1"  type: POOLING
  pooling_param {    pool: MAX    kernel_size: 2    stride: 2  }
}

# unpool1
layers { type: UNPOOLING  bottom: "pool1"  bottom: "pool1_mask"  top: "unpool1"  name: "unpool1"
  unpooling_param {   unpool: MAX   kernel_size: 2    stride: 2   unpool_size: 6 }
}
"""


def _v1_caffemodel(path: Path, scale: np.ndarray, shift: np.ndarray) -> None:
    """The caffemodel DeconvNet's Caffe saves: NetParameter.layers (V1), its own field numbers (UNPOOLING = 42,
    BN = 43, unpooling_param = 44, bn_param = 45), legacy 4-D blob shapes."""
    from caffeonnx.converter.caffe_io import parse_prototxt

    net = parse_prototxt(DECONVNET_TAIL)
    del net.input[:]
    del net.input_dim[:]
    for blob_data in (scale, shift):
        blob = net.layers[0].blobs.add(num=1, channels=3, height=1, width=1)
        blob.data.extend(blob_data.reshape(-1).tolist())
    raw = net.SerializeToString()
    path.write_bytes(raw)
    # the V1 numbers are DeconvNet's own: no renumbering, caffe.proto declares them as it does
    assert caffe_pb2.V1LayerParameter.UNPOOLING == 42 and caffe_pb2.V1LayerParameter.BN == 43
    fields = caffe_pb2.V1LayerParameter.DESCRIPTOR.fields_by_name
    assert (fields["unpooling_param"].number, fields["bn_param"].number) == (44, 45)


def test_deconvnet_v1_caffemodel_and_to_caffe_round_trip(tmp_path: Path) -> None:
    """DeconvNet's V1 prototxt and caffemodel: BN (SegNet's message, INFERENCE: scale·x + shift), ReLU, pool, unpool
    give the transcription's top; to-caffe writes an "Unpooling" layer that converts back to the same graph."""
    g = rng(11)
    scale, shift = g.normal(size=(1, 3, 1, 1)).astype(np.float32), g.normal(size=(1, 3, 1, 1)).astype(np.float32)
    prototxt, caffemodel = tmp_path / "DeconvNet_inference_deploy.prototxt", tmp_path / "DeconvNet.caffemodel"
    prototxt.write_text(DECONVNET_TAIL)
    _v1_caffemodel(caffemodel, scale, shift)
    weights = load_weights(caffemodel)
    unpool = next(layer for layer in weights.net.layer if layer.name == "unpool1")
    assert unpool.type == "Unpooling" and unpool.unpooling_param.unpool_size == 6
    bn = next(layer for layer in weights.net.layer if layer.name == "bn1_1")
    assert bn.type == "BN" and bn.bn_param.bn_mode == caffe_pb2.BNParameter.INFERENCE
    np.testing.assert_array_equal(weights.blobs["bn1_1"][1].data.reshape(-1), shift.reshape(-1))

    x = g.normal(size=(1, 3, 6, 6)).astype(np.float32)
    first = convert_files(prototxt, caffemodel)
    relu = np.maximum(x * scale + shift, 0)
    pooled, mask = caffe_pool(relu, "MAX", (2, 2), (2, 2), (0, 0))
    want = unpool_forward(pooled.astype(np.float32), mask, "MAX", (2, 2), (2, 2), (6, 6))
    np.testing.assert_array_equal(run(first, {"data": x})["unpool1"], want)

    first.save(tmp_path / "m.onnx")
    convert_to_caffe_files(tmp_path / "m.onnx", tmp_path / "back.prototxt", tmp_path / "back.caffemodel")
    back = load_net(tmp_path / "back.prototxt")
    assert [layer.type for layer in back.layer] == ["Input", "BN", "ReLU", "Pooling", "Unpooling"]
    assert net_without_blobs(back) == net_without_blobs(load_net(prototxt))
    back_weights = load_weights(tmp_path / "back.caffemodel")
    assert [b.data.tobytes() for b in back_weights.blobs["bn1_1"]] == [scale.tobytes(), shift.tobytes()]
    second = convert_files(tmp_path / "back.prototxt", tmp_path / "back.caffemodel")
    assert second.model.graph == first.model.graph
    np.testing.assert_array_equal(run(second, {"data": x})["unpool1"], want)


def test_to_caffe_cannot_target_deconvnets_v1_only_caffe(tmp_path: Path) -> None:
    from caffeonnx.converter.onnx_to_caffe import onnx_to_caffe

    model = convert_text(_single((1, 1, 2, 2), "kernel_size: 2 stride: 2 unpool_size: 4")).to_proto()
    with pytest.raises(CaffeOnnxError, match="DeconvNet's Caffe reads only V1 nets"):
        onnx_to_caffe(model, target="deconvnet")
    with pytest.raises(CaffeOnnxError, match=r"'up' \(Unpooling, from DeconvNet\)"):
        onnx_to_caffe(model, target="bvlc")
