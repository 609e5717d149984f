"""ShuffleChannel (farmingyard/ShuffleNet), PixelShuffle (inisis/caffe, gait_extractor's Caffe) and Axpy
(hujie-frank/SENet) against numpy transcriptions of their C++ loops: forward through onnxruntime and the
trainer, bottom diffs against their Backward_cpu, ShuffleChannel also against OpenCV DNN's Caffe importer.

Tolerances: the rearrangements (ShuffleChannel, PixelShuffle) are exact, forward and backward.  Axpy's top
is a·x + y with two float32 roundings where caffe_axpy may fuse them: atol 1e-6, rtol 1e-6; its scale diff
sums x·dy over the spatial axes (a gemv in Caffe, float64 here): atol 1e-5, rtol 1e-5.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from caffeonnx.converter.caffe_io import parse_prototxt, read_caffemodel, write_caffemodel
from caffeonnx.converter.caffe_to_onnx import convert_files, load_net
from caffeonnx.converter.metadata import net_without_blobs
from caffeonnx.converter.onnx_to_caffe import convert_to_caffe_files
from caffeonnx.errors import LayerError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.graph_module import GraphModule
from caffeonnx.wire import length_delimited
from tests.helpers import assert_close, convert_text, rng, run


def train(text: str, feeds: dict[str, np.ndarray], top: str, dy: np.ndarray,
          opset: int = 21) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The trainer's `top` and the diff of every feed for top diff `dy` (Caffe's bottom diffs)."""
    converted = convert_text(text, opset=opset, phase=caffe_pb2.TRAIN)
    module = GraphModule(converted.model, converted.weights).train()
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in feeds.items()}
    y = module(tensors, [top])[top]
    (y * torch.as_tensor(dy)).sum().backward()
    return y.detach().numpy(), {k: t.grad.numpy() for k, t in tensors.items() if t.grad is not None}


# --- ShuffleChannel ---------------------------------------------------------------------------------------

def caffe_resize(data: np.ndarray, group_row: int, group_column: int) -> np.ndarray:
    """ShuffleChannelLayer::Resize_cpu per image: output row j·group_row + i <- input row i·group_column + j."""
    n = data.shape[0]
    flat = data.reshape(n, group_row * group_column, -1)
    out = np.empty_like(flat)
    for i in range(group_row):
        for j in range(group_column):
            out[:, j * group_row + i] = flat[:, i * group_column + j]
    return out.reshape(data.shape)


def caffe_shuffle_channel(x: np.ndarray, group: int) -> np.ndarray:
    """Forward_cpu: Resize_cpu(top, bottom, group, C/group)."""
    return caffe_resize(x, group, x.shape[1] // group)


def caffe_shuffle_channel_backward(dy: np.ndarray, group: int) -> np.ndarray:
    """Backward_cpu: Resize_cpu(bottom_diff, top_diff, C/group, group)."""
    return caffe_resize(dy, dy.shape[1] // group, group)


def shufflenet_net(shape: tuple[int, ...], group: int) -> str:
    """ShuffleChannel as farmingyard's shufflenet_1x_g3_deploy.prototxt writes it, after a grouped 1x1 conv's top."""
    dims = "".join(f"  dim: {d}\n" for d in shape)
    return (f'name: "shufflenet"\ninput: "resx2_conv1"\ninput_shape {{ \n{dims}}}\n'
            'layer {\n  name: "shuffle2"\n  type: "ShuffleChannel"\n  bottom: "resx2_conv1"\n  top: "shuffle2"\n'
            f'  shuffle_channel_param {{\n    group: {group}\n  }}\n}}\n')


SHUFFLE_CASES = [((2, 6, 3, 4), 3), ((2, 6, 3, 4), 2), ((1, 12, 5, 5), 4), ((3, 8), 2), ((2, 6, 2, 3, 2), 3),
                 ((2, 6, 3, 4), 1), ((2, 6, 3, 4), 6)]


@pytest.mark.parametrize(("shape", "group"), SHUFFLE_CASES)
def test_shuffle_channel_forward_and_backward(shape: tuple[int, ...], group: int) -> None:
    x = rng(1).normal(size=shape).astype(np.float32)
    text = shufflenet_net(shape, group)
    want = caffe_shuffle_channel(x, group)
    assert_close(run(convert_text(text), {"resx2_conv1": x})["shuffle2"], want, "shuffle2", atol=0, rtol=0)
    dy = rng(2).normal(size=shape).astype(np.float32)
    y, grads = train(text, {"resx2_conv1": x}, "shuffle2", dy)
    assert_close(y, want, "shuffle2 (trainer)", atol=0, rtol=0)
    assert_close(grads["resx2_conv1"], caffe_shuffle_channel_backward(dy, group), "bottom diff", atol=0, rtol=0)


@pytest.mark.parametrize("group", [2, 3, 4])
def test_shuffle_channel_matches_opencv(tmp_path: Path, group: int) -> None:
    cv2 = pytest.importorskip("cv2")
    shape = (2, 12, 3, 5)
    x = rng(3).normal(size=shape).astype(np.float32)
    text = shufflenet_net(shape, group)
    proto, model = tmp_path / "shufflenet.prototxt", tmp_path / "shufflenet.caffemodel"
    proto.write_text(text)
    write_caffemodel(model, parse_prototxt(text, "<test>"), {})
    net = cv2.dnn.readNetFromCaffe(str(proto), str(model))
    net.setInput(x)
    assert_close(run(convert_text(text), {"resx2_conv1": x})["shuffle2"], net.forward(), "shuffle2 vs OpenCV", 0, 0)


@pytest.mark.parametrize(("shape", "group", "message"), [
    ((2, 6, 3, 4), 4, r"shuffle_channel_param.group 4 does not divide the bottom's 6 channels \(Wrong group size\)"),
    ((2, 6, 3, 4), 0, r"shuffle_channel_param.group is 0; group must be greater than 0"),
])
def test_shuffle_channel_errors(shape: tuple[int, ...], group: int, message: str) -> None:
    with pytest.raises(LayerError, match=message):
        convert_text(shufflenet_net(shape, group))


# --- PixelShuffle -----------------------------------------------------------------------------------------

def caffe_pixel_shuffle(x: np.ndarray, r: int) -> np.ndarray:
    """inisis/caffe PixelShuffleLayer::Forward_cpu: top (n, p, i·r + sh, j·r + sw) = bottom (n, p·r² + sh·r + sw, i, j)."""
    n, ch, h, w = x.shape
    out = np.empty((n, ch // (r * r), h * r, w * r), dtype=x.dtype)
    for p in range(ch // (r * r)):
        for sh in range(r):
            for sw in range(r):
                out[:, p, sh::r, sw::r] = x[:, p * r * r + sh * r + sw]
    return out


def caffe_pixel_shuffle_backward(dy: np.ndarray, r: int) -> np.ndarray:
    """gait_extractor PixelShuffleBackward: bottom (n, c·r² + (h % r)·r + w % r, h / r, w / r) = top (n, c, h, w)."""
    n, c, hr, wr = dy.shape
    dx = np.zeros((n, c * r * r, hr // r, wr // r), dtype=dy.dtype)
    for top_c in range(c):
        for th in range(hr):
            for tw in range(wr):
                dx[:, top_c * r * r + (tw % r) + (th % r) * r, th // r, tw // r] = dy[:, top_c, th, tw]
    return dx


def espcn_net(shape: tuple[int, ...], param: str, r: int) -> str:
    """The sub-pixel layer closing an ESPCN-style super-resolution net, in each fork's spelling."""
    return (f'name: "espcn"\nlayer {{\n  name: "input"\n  type: "Input"\n  top: "conv3"\n  input_param {{\n'
            f'    shape {{ {" ".join(f"dim: {d}" for d in shape)} }}\n  }}\n}}\n'
            f'layer {{\n  name: "pixel_shuffle"\n  type: "PixelShuffle"\n  bottom: "conv3"\n  top: "output"\n'
            f'  {param} {{\n    upscale_factor: {r}\n  }}\n}}\n')


@pytest.mark.parametrize(("shape", "r"), [((2, 8, 3, 5), 2), ((1, 18, 4, 3), 3), ((2, 3, 4, 4), 1), ((1, 32, 2, 3), 4)])
@pytest.mark.parametrize("param", ["pixel_shuffle_param", "pixelshuffle_param"])
@pytest.mark.parametrize("opset", [21, 9])
def test_pixel_shuffle_forward_and_backward(shape: tuple[int, ...], r: int, param: str, opset: int) -> None:
    """Opset 21 emits DepthToSpace in CRD mode; opset 9 has only DCR, so it spells CRD with Reshape/Transpose."""
    x = rng(4).normal(size=shape).astype(np.float32)
    text = espcn_net(shape, param, r)
    want = caffe_pixel_shuffle(x, r)
    assert_close(run(convert_text(text, opset=opset), {"conv3": x})["output"], want, "output", atol=0, rtol=0)
    dy = rng(5).normal(size=want.shape).astype(np.float32)
    y, grads = train(text, {"conv3": x}, "output", dy, opset)
    assert_close(y, want, "output (trainer)", atol=0, rtol=0)
    assert_close(grads["conv3"], caffe_pixel_shuffle_backward(dy, r), "bottom diff", atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space_kernel_matches_onnxruntime(mode: str) -> None:
    """The trainer's DepthToSpace in both ONNX modes (the converter emits CRD; DCR is ONNX's default)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from caffeonnx.trainer.ops import NodeSpec, get_op

    x = rng(8).normal(size=(2, 12, 3, 4)).astype(np.float32)
    node = helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=2, mode=mode)
    graph = helper.make_graph([node], "d2s", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    factory = get_op("DepthToSpace")
    assert factory is not None
    kernel = factory(NodeSpec("DepthToSpace", "d2s", ["x"], ["y"], {"blocksize": 2, "mode": mode}, 13))
    assert_close(kernel(torch.from_numpy(x)).numpy(), want, f"DepthToSpace {mode}", atol=0, rtol=0)


@pytest.mark.parametrize(("field", "number"), [("pixelshuffle_param", 507), ("pixel_shuffle_param", 888)])
def test_a_forks_caffemodel_upscale_factor_reads_at_its_number(tmp_path: Path, field: str, number: int) -> None:
    """inisis/caffe numbers pixelshuffle_param 507, gait_extractor's Caffe pixel_shuffle_param 888."""
    payload = caffe_pb2.PixelShuffleParameter(upscale_factor=3).SerializeToString()
    body = (length_delimited(1, 2) + b"ps" + length_delimited(2, 12) + b"PixelShuffle"
            + length_delimited(number, len(payload)) + payload)
    path = tmp_path / "sr.caffemodel"
    path.write_bytes(length_delimited(100, len(body)) + body)
    assert getattr(read_caffemodel(path).net.layer[0], field).upscale_factor == 3


@pytest.mark.parametrize(("param", "shape", "message"), [
    ("pixel_shuffle_param { upscale_factor: 2 } pixelshuffle_param { upscale_factor: 2 }", (1, 8, 2, 2),
     r"both pixelshuffle_param .* and pixel_shuffle_param are given"),
    ("pixel_shuffle_param { }", (1, 8, 2, 2), r"upscale factor must be specified for PixelShuffle"),
    ("", (1, 8, 2, 2), r"upscale factor must be specified for PixelShuffle"),
    ("pixelshuffle_param { upscale_factor: -2 }", (1, 8, 2, 2), r"upscale_factor -2 must be positive"),
    ("pixelshuffle_param { upscale_factor: 2 }", (1, 6, 2, 2), r"6 channels are not a multiple of upscale_factor²"),
    ("pixelshuffle_param { upscale_factor: 2 }", (1, 8, 4), r"the bottom \[1, 8, 4\] is 3-D; PixelShuffle takes"),
])
def test_pixel_shuffle_errors(param: str, shape: tuple[int, ...], message: str) -> None:
    dims = " ".join(f"dim: {d}" for d in shape)
    text = (f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}\n'
            f'layer {{ name: "ps" type: "PixelShuffle" bottom: "x" top: "y" {param} }}\n')
    with pytest.raises(LayerError, match=message):
        convert_text(text)


# --- Axpy -------------------------------------------------------------------------------------------------

def caffe_axpy(a: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """AxpyLayer::Forward_cpu: top = y, then caffe_axpy(spatial, a[n·C + c], x, top) per (n, c)."""
    n, c = x.shape[:2]
    top = y.reshape(n * c, -1).copy()
    scale, xs = a.reshape(-1), x.reshape(n * c, -1)
    for k in range(n * c):
        top[k] += scale[k] * xs[k]
    return top.reshape(x.shape)


def caffe_axpy_backward(a: np.ndarray, x: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward_cpu: scale_diff = Σ_spatial top_diff·x (the gemv), x_diff = a·top_diff, y_diff = top_diff."""
    n, c = x.shape[:2]
    da = (dy.astype(np.float64) * x).reshape(n * c, -1).sum(axis=1).reshape(a.shape)
    dx = (a.reshape(n * c, 1) * dy.reshape(n * c, -1)).reshape(x.shape)
    return da, dx, dy.copy()


def se_resnext_net(a_shape: tuple[int, ...], x_shape: tuple[int, ...], y_shape: tuple[int, ...] | None = None) -> str:
    """The SE block's closing Axpy as the SENet repositories' SE-ResNeXt prototxts write it (bottoms: gate, branch,
    shortcut), its bottoms given as Input layers the way SE-BN-Inception.prototxt declares its data."""
    def data(name: str, shape: tuple[int, ...]) -> str:
        dims = " \n".join(f"      dim: {d}" for d in shape)
        return (f'layer {{ \n  name: "{name}"\n  type: "Input"\n  top: "{name}"\n  input_param: {{\n    shape: {{\n'
                f'{dims} \n    }}\n  }}\n}}\n')

    return (f'name: "SE-ResNeXt-50"\n{data("conv2_1_1x1_up", a_shape)}{data("conv2_1_1x1_increase", x_shape)}'
            f'{data("conv2_1_1x1_proj", y_shape or x_shape)}'
            'layer {\n  name: "conv2_1"\n  type: "Axpy"\n  bottom: "conv2_1_1x1_up"\n  bottom: "conv2_1_1x1_increase"\n'
            '  bottom: "conv2_1_1x1_proj"\n  top: "conv2_1"\n}\n')


AXPY_CASES = [((2, 6, 1, 1), (2, 6, 4, 5)), ((2, 6), (2, 6, 4, 5)), ((3, 4), (3, 4)), ((2, 5, 1), (2, 5, 7)),
              ((1, 8, 1, 1), (1, 8, 3))]


@pytest.mark.parametrize(("a_shape", "x_shape"), AXPY_CASES)
def test_axpy_forward_and_all_three_bottom_diffs(a_shape: tuple[int, ...], x_shape: tuple[int, ...]) -> None:
    r = rng(6)
    a = r.uniform(0, 1, size=a_shape).astype(np.float32)  # a sigmoid gate
    x = r.normal(size=x_shape).astype(np.float32)
    y = r.normal(size=x_shape).astype(np.float32)
    feeds = {"conv2_1_1x1_up": a, "conv2_1_1x1_increase": x, "conv2_1_1x1_proj": y}
    text = se_resnext_net(a_shape, x_shape)
    want = caffe_axpy(a, x, y)
    assert_close(run(convert_text(text), feeds)["conv2_1"], want, "conv2_1", atol=1e-6, rtol=1e-6)
    dy = r.normal(size=x_shape).astype(np.float32)
    top, grads = train(text, feeds, "conv2_1", dy)
    assert_close(top, want, "conv2_1 (trainer)", atol=1e-6, rtol=1e-6)
    da, dx, dyy = caffe_axpy_backward(a, x, dy)
    assert_close(grads["conv2_1_1x1_up"], da, "scale diff", atol=1e-5, rtol=1e-5)
    assert_close(grads["conv2_1_1x1_increase"], dx, "x diff", atol=1e-6, rtol=1e-6)
    assert_close(grads["conv2_1_1x1_proj"], dyy, "y diff", atol=0, rtol=0)


@pytest.mark.parametrize(("a_shape", "x_shape", "y_shape", "message"), [
    ((2, 6, 2, 1), (2, 6, 4, 5), None, r"the scale a \(bottom 0\) is \[2, 6, 2, 1\] but x is \[2, 6, 4, 5\]"),
    ((2, 5, 1, 1), (2, 6, 4, 5), None, r"a must be N x C or N x C x 1 x 1 with x's N and C \(\[2, 6\]\)"),
    ((2, 6, 1, 1), (2, 6, 4, 5), (2, 6, 5, 4), r"y \(bottom 2\) is \[2, 6, 5, 4\] but x \(bottom 1\) is \[2, 6, 4, 5\]"),
    ((2, 6, 1, 1, 1), (2, 6, 4, 5, 1), None, r"x \(bottom 1\) is \[2, 6, 4, 5, 1\]; Axpy takes x of 2 to 4 axes"),
])
def test_axpy_errors(a_shape: tuple[int, ...], x_shape: tuple[int, ...], y_shape: tuple[int, ...] | None,
                     message: str) -> None:
    with pytest.raises(LayerError, match=message):
        convert_text(se_resnext_net(a_shape, x_shape, y_shape))


# --- the batch stays dynamic, and to-caffe gives the layers back -------------------------------------------

SHUFFLE_SR_SE = """name: "fork-rearrangements"
input: "feat"
input_shape { dim: 2 dim: 12 dim: 3 dim: 4 }
input: "gate"
input_shape { dim: 2 dim: 3 dim: 1 dim: 1 }
input: "skip"
input_shape { dim: 2 dim: 3 dim: 6 dim: 8 }
layer {
  name: "shuffle"
  type: "ShuffleChannel"
  bottom: "feat"
  top: "shuffle"
  shuffle_channel_param {
    group: 3
  }
}
layer {
  name: "upscale"
  type: "PixelShuffle"
  bottom: "shuffle"
  top: "upscale"
  pixelshuffle_param {
    upscale_factor: 2
  }
}
layer {
  name: "fuse"
  type: "Axpy"
  bottom: "gate"
  bottom: "upscale"
  bottom: "skip"
  top: "fuse"
}
"""


def reference_chain(feeds: dict[str, np.ndarray]) -> np.ndarray:
    shuffled = caffe_shuffle_channel(feeds["feat"], 3)
    return caffe_axpy(feeds["gate"], caffe_pixel_shuffle(shuffled, 2), feeds["skip"])


def chain_feeds(batch: int) -> dict[str, np.ndarray]:
    r = rng(7)
    return {"feat": r.normal(size=(batch, 12, 3, 4)).astype(np.float32),
            "gate": r.uniform(size=(batch, 3, 1, 1)).astype(np.float32),
            "skip": r.normal(size=(batch, 3, 6, 8)).astype(np.float32)}


@pytest.mark.parametrize("opset", [21, 9])
def test_another_batch_size_runs_through_the_same_graph(opset: int) -> None:
    """The prototxt says batch 2; the ONNX graph keeps the batch free (Reshape copies it, never bakes it in)."""
    converted = convert_text(SHUFFLE_SR_SE, opset=opset)
    for batch in (2, 5):
        feeds = chain_feeds(batch)
        assert_close(run(converted, feeds)["fuse"], reference_chain(feeds), f"fuse (batch {batch})", 1e-6, 1e-6)


def test_round_trip_through_to_caffe(tmp_path: Path) -> None:
    """prototxt -> ONNX -> prototxt: the same three layers (inisis/caffe's pixelshuffle_param kept), the same graph."""
    proto, model = tmp_path / "deploy.prototxt", tmp_path / "deploy.caffemodel"
    proto.write_text(SHUFFLE_SR_SE)
    write_caffemodel(model, parse_prototxt(SHUFFLE_SR_SE, "<test>"), {})
    first = convert_files(proto, model)
    first.save(tmp_path / "m.onnx")
    convert_to_caffe_files(tmp_path / "m.onnx", tmp_path / "back.prototxt", tmp_path / "back.caffemodel")
    back = load_net(tmp_path / "back.prototxt")
    assert net_without_blobs(back) == net_without_blobs(load_net(proto))
    assert back.layer[-2].HasField("pixelshuffle_param") and not back.layer[-2].HasField("pixel_shuffle_param")
    second = convert_files(tmp_path / "back.prototxt", tmp_path / "back.caffemodel")
    assert second.model.graph == first.model.graph
    feeds = chain_feeds(2)
    assert_close(run(second, feeds)["fuse"], reference_chain(feeds), "fuse after the round trip", 1e-6, 1e-6)
