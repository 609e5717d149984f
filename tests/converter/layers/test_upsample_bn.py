"""SegNet's Upsample and the BN layers of SegNet and PSPNet against numpy transcriptions of their C++
(tests/spatial_fork_reference.py), forward through onnxruntime and the trainer, backward through autograd.

The pooling masks come from the Pooling reference of tests/converter/layers/caffe_ref_spatial.py.
OpenCV DNN implements neither layer (its Caffe importer has no "Upsample" or "BN" layer), so the
numpy transcriptions are the only reference.  Tolerances: Upsample moves values, so it is exact;
BN atol 1e-5, rtol 1e-4 against a float64 reference, tops and gradients (measured: below 1e-6).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffeonnx.converter.caffe_io import parse_prototxt, write_caffemodel
from caffeonnx.converter.caffe_to_onnx import convert_files, load_net, load_weights
from caffeonnx.converter.metadata import net_without_blobs
from caffeonnx.converter.onnx_to_caffe import convert_to_caffe_files
from caffeonnx.errors import LayerError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.graph_module import GraphModule
from tests.converter.layers.caffe_ref_spatial import caffe_pool
from tests.converter.layers.graph_grad import forward_backward
from tests.helpers import assert_close, convert_text, rng, run
from tests.spatial_fork_reference import (
    pspnet_bn_backward,
    pspnet_bn_forward,
    segnet_bn_backward,
    segnet_bn_forward,
    upsample_backward,
    upsample_forward,
    upsample_size,
)


def _input(shape: tuple[int, ...], name: str = "data") -> str:
    """The legacy input header SegNet's and PSPNet's deploy files start with (input_shape when not 4-D)."""
    if len(shape) != 4:
        return f'input: "{name}"\ninput_shape {{ ' + " ".join(f"dim: {d}" for d in shape) + " }\n"
    return f'input: "{name}"\n' + "".join(f"input_dim: {d}\n" for d in shape)


# --- Upsample ---------------------------------------------------------------------------------

# (input H, W, pooling_param, upsample_param, scale, pad_out, upsample size) in SegNet's own spellings
UPSAMPLE_CASES = [
    (8, 10, "pool: MAX\n    kernel_size: 2\n    stride: 2", "scale: 2", (2, 2), (False, False), None),
    # odd input: ceil pooling gives 3x4, pad_out takes the padded row/column back off
    (5, 7, "pool: MAX\n    kernel_size: 2\n    stride: 2", "scale: 2\n    pad_out_h: true\n    pad_out_w: true",
     (2, 2), (True, True), None),
    # the driving web demo spells the exact size (its 45x60 input, here 9x12)
    (9, 12, "pool: MAX\n    kernel_size: 2\n    stride: 2", "scale: 2\n    upsample_w: 12\n    upsample_h: 9",
     (2, 2), (False, False), (9, 12)),
    (6, 9, "pool: MAX\n    kernel_h: 2\n    kernel_w: 3\n    stride_h: 2\n    stride_w: 3",
     "scale_h: 2\n    scale_w: 3", (2, 3), (False, False), None),
]


def _segnet_unpool(height: int, width: int, pooling: str, upsample: str) -> str:
    """Pooling with its mask top, then Upsample, laid out as segnet_inference.prototxt writes them."""
    return _input((1, 3, height, width)) + f"""layer {{
  name: "pool1"
  type: "Pooling"
  bottom: "data"
  top: "pool1"
  top: "pool1_mask"
  pooling_param {{
    {pooling}
  }}
}}
layer {{
  name: "upsample1"
  type: "Upsample"
  bottom: "pool1"
  top: "pool1_D"
  bottom: "pool1_mask"
  upsample_param {{
    {upsample}
  }}
}}
"""


def _pooling_geometry(pooling: str) -> tuple[tuple[int, int], tuple[int, int]]:
    p = text_format.Parse(pooling.replace("\n", " "), caffe_pb2.PoolingParameter())
    kernel = (p.kernel_size, p.kernel_size) if p.HasField("kernel_size") else (p.kernel_h, p.kernel_w)
    stride = (p.stride, p.stride) if p.HasField("stride") else (p.stride_h, p.stride_w)
    return kernel, stride


@pytest.mark.parametrize(("height", "width", "pooling", "upsample", "scale", "pad_out", "size"), UPSAMPLE_CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_pooling_then_upsample_matches_segnet(height: int, width: int, pooling: str, upsample: str,
                                              scale: tuple[int, int], pad_out: tuple[bool, bool],
                                              size: tuple[int, int] | None, ties: bool) -> None:
    """Pool with mask, unpool: onnxruntime and the trainer give Caffe's top; the trainer's input gradient
    is Upsample's gather composed with Pooling's routing to the argmax (batch 4 on a net declared for 1)."""
    g = rng(height * width + ties)
    x = (g.integers(0, 3, size=(4, 3, height, width)) if ties else g.normal(size=(4, 3, height, width)))
    x = x.astype(np.float32)
    kernel, stride = _pooling_geometry(pooling)
    pooled, mask = caffe_pool(x, "MAX", kernel, stride, (0, 0))
    out_h, out_w = upsample_size(pooled.shape[2], pooled.shape[3], scale, pad_out, size)
    want = upsample_forward(pooled, mask, out_h, out_w)
    text = _segnet_unpool(height, width, pooling, upsample)
    outs = run(convert_text(text, all_blobs=True), {"data": x})
    np.testing.assert_array_equal(outs["pool1_mask"], mask.astype(np.float32))
    np.testing.assert_array_equal(outs["pool1_D"], want)
    dy = rng(7).normal(size=want.shape).astype(np.float32)
    got, grads = forward_backward(text, {"data": x}, "pool1_D", dy, ["data"])
    np.testing.assert_array_equal(got, want)
    d_pooled = upsample_backward(dy, mask)
    dx = np.zeros_like(x).reshape(4, 3, -1)
    for n in range(4):
        for c in range(3):
            np.add.at(dx[n, c], mask[n, c].reshape(-1).astype(np.int64), d_pooled[n, c].reshape(-1))
    np.testing.assert_array_equal(grads["data"], dx.reshape(x.shape))


def _fed_mask_net(shape: tuple[int, ...], param: str) -> str:
    return (_input(shape) + _input(shape, "mask")
            + f'layer {{ name: "up" type: "Upsample" bottom: "data" bottom: "mask" top: "up" upsample_param {{ {param} }} }}\n')


@pytest.mark.parametrize(("shape", "param", "out"), [
    ((2, 3, 4, 5), "upsample_h: 9 upsample_w: 11", (9, 11)),
    ((1, 2, 3, 3), "scale: 3", (9, 9)),
    ((2, 1, 2, 4), "scale_h: 4 scale_w: 2 pad_out_w: true", (8, 7)),  # pad_out_w with scale_w 2 only
])
def test_upsample_scatters_and_gathers_like_caffe(shape: tuple[int, ...], param: str, out: tuple[int, int]) -> None:
    """Any mask of distinct in-range offsets: the top is Forward_cpu's scatter, the data gradient Backward_cpu's gather."""
    g = rng(sum(shape))
    x = g.normal(size=shape).astype(np.float32)
    mask = np.stack([np.stack([g.permutation(out[0] * out[1])[:shape[2] * shape[3]].reshape(shape[2:])
                               for _ in range(shape[1])]) for _ in range(shape[0])]).astype(np.float32)
    want = upsample_forward(x, mask, *out)
    np.testing.assert_array_equal(run(convert_text(_fed_mask_net(shape, param)), {"data": x, "mask": mask})["up"], want)
    dy = g.normal(size=want.shape).astype(np.float32)
    got, grads = forward_backward(_fed_mask_net(shape, param), {"data": x, "mask": mask}, "up", dy, ["data", "mask"])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(grads["data"], upsample_backward(dy, mask))
    assert not grads["mask"].any()  # Caffe propagates nothing to the mask


@pytest.mark.parametrize(("shape", "mask_shape", "param", "match"), [
    ((1, 1, 3, 3), (1, 1, 3, 3), "scale: 1", r"scale \[1, 1\] must be > 1"),
    ((1, 1, 3, 3), (1, 1, 3, 3), "scale_h: 2", r"upsample_h & upsample_w are required, else \(DEPRECATED\)"),
    ((1, 1, 3, 3), (1, 1, 3, 3), "scale: 2 scale_h: 2 scale_w: 2", r"upsample_h & upsample_w are required"),
    ((1, 1, 3, 3), (1, 1, 3, 3), "scale: 3 pad_out_h: true", r"pad_out_h requires scale_h == 2 \(got 3\)"),
    ((1, 1, 3, 3), (1, 1, 3, 3), "upsample_h: 1 upsample_w: 6", r"must both be > 1"),
    ((1, 1, 3, 3), (1, 1, 3, 4), "scale: 2", r"must have the shape of the input"),
    ((1, 3, 3), (1, 3, 3), "scale: 2", r"Input must have 4 axes"),
])
def test_upsample_errors_name_the_problem(shape: tuple[int, ...], mask_shape: tuple[int, ...], param: str,
                                          match: str) -> None:
    text = (_input(shape) + _input(mask_shape, "mask")
            + f'layer {{ name: "up" type: "Upsample" bottom: "data" bottom: "mask" top: "up" upsample_param {{ {param} }} }}\n')
    with pytest.raises(LayerError, match=match):
        convert_text(text)


def test_mask_offset_outside_the_top_fails_at_run_time() -> None:
    """A mask from a pooling of another size: Caffe stops (LOG(FATAL) "upsample top index ... out of range"),
    onnxruntime refuses the ScatterElements indices."""
    converted = convert_text(_fed_mask_net((1, 1, 2, 2), "scale: 2"))
    mask = np.array([[[[0, 16], [5, 7]]]], np.float32)  # the top plane has 16 positions
    with pytest.raises(Exception, match="out of data bounds"):
        run(converted, {"data": np.ones((1, 1, 2, 2), np.float32), "mask": mask})


def test_upsample_needs_opset_11() -> None:
    with pytest.raises(LayerError, match="opset 11 or later"):
        convert_text(_fed_mask_net((1, 1, 2, 2), "scale: 2"), opset=10)


# --- BN (SegNet) ------------------------------------------------------------------------------

def _segnet_bn(shape: tuple[int, ...], mode: str, tops: str = 'top: "conv1_bn"') -> str:
    """A BN layer as SegNet's segnet_train.prototxt / segnet_inference.prototxt write it."""
    mode_line = f"\n    bn_mode: {mode}" if mode else ""
    return _input(shape) + f"""layer {{
  bottom: "data"
  {tops}
  name: "conv1_1_bn"
  type: "BN"
  bn_param {{{mode_line}
    scale_filler {{
      type: "constant"
      value: 1
    }}
    shift_filler {{
      type: "constant"
      value: 0.001
    }}
 }}
}}
"""


def _train_grads(text: str, feeds: dict[str, np.ndarray], top: str, dy: np.ndarray,
                 weights: dict[str, list[np.ndarray]] | None = None,
                 phase: int = caffe_pb2.TRAIN) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """`top` from the trainer, the feeds' gradients and every trainable blob's gradient, for Σ top·dy."""
    converted = convert_text(text, weights, phase=phase)
    module = GraphModule(converted.model, converted.weights).train()
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in feeds.items()}
    out = module(tensors, [top])[top]
    (out * torch.as_tensor(dy)).sum().backward()
    blobs = {info.name: p.grad.numpy() for info, p in module.named_blobs() if p.grad is not None}
    return out.detach().numpy(), {k: t.grad.numpy() for k, t in tensors.items()}, blobs


def _blobs(channels: int, seed: int, count: int) -> list[np.ndarray]:
    g = rng(seed)
    return [(g.normal(size=(1, channels, 1, 1)) + (1.5 if i == 0 else 0)).astype(np.float32) for i in range(count)]


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (5, 2, 1, 3)])
@pytest.mark.parametrize("phase", [caffe_pb2.TRAIN, caffe_pb2.TEST])
def test_segnet_bn_learn_uses_batch_statistics_in_both_phases(shape: tuple[int, ...], phase: int) -> None:
    """LEARN: (x − E[x]) / √(E[x²] − E[x]² + 1e-9)·scale + shift in TRAIN and TEST, with the mean and
    variance tops; the trainer's data, scale and shift gradients are Backward_cpu's."""
    x = (rng(1).normal(size=shape) * 3 + 1).astype(np.float32)
    scale, shift = _blobs(shape[1], 2, 2)
    text = _segnet_bn(shape, "", 'top: "conv1_bn"\n  top: "bn_mean"\n  top: "bn_var"')
    want = segnet_bn_forward(x, scale, shift, learn=True)
    outs = run(convert_text(text, {"conv1_1_bn": [scale, shift]}, phase=phase), {"data": x})
    assert_close(outs["conv1_bn"], want["top"], "top")
    assert_close(outs["bn_mean"], want["mean"], "batch mean top")
    assert_close(outs["bn_var"], want["var"], "batch variance top")
    dy = rng(3).normal(size=shape).astype(np.float32)
    got, grads, blobs = _train_grads(text, {"data": x}, "conv1_bn", dy, {"conv1_1_bn": [scale, shift]})
    assert_close(got, want["top"], "top (trainer)")
    back = segnet_bn_backward(x, scale, dy, learn=True)
    assert_close(grads["data"], back["bottom"], "bottom diff")
    assert_close(blobs["conv1_1_bn.scale"], back["scale"], "scale diff")
    assert_close(blobs["conv1_1_bn.shift"], back["shift"], "shift diff")


def test_segnet_bn_inference_is_scale_and_shift() -> None:
    """INFERENCE (segnet_inference.prototxt after compute_bn_statistics.py): scale·x + shift, and its diffs."""
    shape = (2, 4, 3, 3)
    x = rng(4).normal(size=shape).astype(np.float32)
    scale, shift = _blobs(4, 5, 2)
    text = _segnet_bn(shape, "INFERENCE")
    want = segnet_bn_forward(x, scale, shift, learn=False)["top"]
    assert_close(run(convert_text(text, {"conv1_1_bn": [scale, shift]}), {"data": x})["conv1_bn"], want, "top")
    dy = rng(6).normal(size=shape).astype(np.float32)
    got, grads, blobs = _train_grads(text, {"data": x}, "conv1_bn", dy, {"conv1_1_bn": [scale, shift]})
    back = segnet_bn_backward(x, scale, dy, learn=False)
    assert_close(got, want, "top (trainer)")
    assert_close(grads["data"], back["bottom"], "bottom diff")
    assert_close(blobs["conv1_1_bn.scale"], back["scale"], "scale diff")
    assert_close(blobs["conv1_1_bn.shift"], back["shift"], "shift diff")


def test_segnet_bn_fillers_and_legacy_top_shape() -> None:
    """Without a caffemodel the blobs come from scale_filler/shift_filler; a 2-D bottom gives Caffe's 4-D top."""
    x = rng(8).normal(size=(6, 5)).astype(np.float32)
    converted = convert_text(_segnet_bn((6, 5), "INFERENCE"))
    assert_close(run(converted, {"data": x})["conv1_bn"], x.reshape(6, 5, 1, 1) + np.float32(0.001), "top")
    assert [w.shape for w in converted.weights.values()] == [(1, 5, 1, 1)] * 2


# --- BN (PSPNet) ------------------------------------------------------------------------------

def _pspnet_bn(shape: tuple[int, ...], frozen: bool) -> str:
    """conv5_3_pool1_conv/bn of pspnet50_ADE20K_473.prototxt (in place, four ParamSpecs), frozen or not."""
    frozen_line = "\n    frozen: true" if frozen else ""
    return _input(shape) + f"""layer {{
  name: "conv5_3_pool1_conv/bn"
  type: "BN"
  bottom: "data"
  top: "data"
  param {{
    lr_mult: 10
    decay_mult: 0
  }}
  param {{
    lr_mult: 10
    decay_mult: 0
  }}
  param {{
    lr_mult: 0
    decay_mult: 1
  }}
  param {{
    lr_mult: 0
    decay_mult: 0
  }}
  bn_param {{
    slope_filler {{
      type: "constant"
      value: 1
    }}
    bias_filler {{
      type: "constant"
      value: 0
    }}{frozen_line}
    momentum: 0.95
  }}
}}
"""


def _pspnet_blobs(channels: int, seed: int) -> list[np.ndarray]:
    slope, bias, mean, var = _blobs(channels, seed, 4)
    return [slope, bias, mean, np.abs(var) + np.float32(0.1)]


@pytest.mark.parametrize(("frozen", "phase"), [(True, caffe_pb2.TEST), (True, caffe_pb2.TRAIN),
                                               (False, caffe_pb2.TEST), (False, caffe_pb2.TRAIN)])
def test_pspnet_bn(frozen: bool, phase: int) -> None:
    """TEST or frozen: the stored mean and variance; non-frozen TRAIN: the batch's (two-pass variance), with
    Backward_cpu's data gradient; frozen layers train nothing, the statistics never (lr_mult forced to 0)."""
    shape = (3, 4, 5, 2)
    x = (rng(9).normal(size=shape) * 2 - 1).astype(np.float32)
    blobs = _pspnet_blobs(4, 10)
    text = _pspnet_bn(shape, frozen)
    stored = frozen or phase == caffe_pb2.TEST
    want = pspnet_bn_forward(x, *blobs, eps=1e-5, stored=stored)["top"]
    converted = convert_text(text, {"conv5_3_pool1_conv/bn": blobs}, phase=phase)
    assert_close(run(converted, {"data": x})["data@conv5_3_pool1_conv/bn"], want, "top")
    lr = {info.name: info.lr_mult for info, _ in GraphModule(converted.model, converted.weights).named_blobs()}
    assert lr == {"conv5_3_pool1_conv/bn.slope": 0.0 if frozen else 10.0,
                  "conv5_3_pool1_conv/bn.bias": 0.0 if frozen else 10.0,
                  "conv5_3_pool1_conv/bn.mean": 0.0, "conv5_3_pool1_conv/bn.variance": 0.0}
    if phase == caffe_pb2.TRAIN:
        dy = rng(11).normal(size=shape).astype(np.float32)
        got, grads, trained = _train_grads(text, {"data": x}, "data@conv5_3_pool1_conv/bn", dy,
                                           {"conv5_3_pool1_conv/bn": blobs})
        assert_close(got, want, "top (trainer)")
        assert_close(grads["data"], pspnet_bn_backward(x, blobs[0], blobs[3], 1e-5, dy, frozen), "bottom diff")
        assert sorted(trained) == ([] if frozen else ["conv5_3_pool1_conv/bn.bias", "conv5_3_pool1_conv/bn.slope"])


def test_pspnet_bn_fillers_without_caffemodel() -> None:
    """Fresh blobs: slope 1, bias 0, mean 0 and variance 1 when frozen (0 otherwise), as LayerSetUp fills them."""
    converted = convert_text(_pspnet_bn((1, 3, 2, 2), frozen=True))
    values = [w.reshape(-1).tolist() for w in converted.weights.values()]
    assert values == [[1.0] * 3, [0.0] * 3, [0.0] * 3, [1.0] * 3]


@pytest.mark.parametrize(("text", "match"), [
    (_input((1, 2, 2, 2)) + 'layer { name: "bn" type: "BN" bottom: "data" top: "bn" bn_param { bn_mode: INFERENCE '
     'frozen: true } }\n', r"mixes SegNet's BN fields \(bn_mode\) with PSPNet's \(frozen\)"),
    (_segnet_bn((1, 2, 2, 2), "INFERENCE", 'top: "a" top: "b" top: "c"'), r"INFERENCE mode has 1 top"),
    (_input((1, 2, 2, 2)) + 'layer { name: "bn" type: "BN" bottom: "data" top: "a" top: "b" bn_param { frozen: true '
     '} }\n', r"PSPNet's BN Layer produces 1 top"),
    (_input((1, 2, 2, 2, 2)) + 'layer { name: "bn" type: "BN" bottom: "data" top: "bn" }\n', r"at most 4"),
])
def test_bn_errors_name_the_problem(text: str, match: str) -> None:
    with pytest.raises(LayerError, match=match):
        convert_text(text)


# --- to-caffe ---------------------------------------------------------------------------------

ROUND_TRIP = _input((1, 3, 6, 8)) + """layer {
  bottom: "data"
  top: "conv1_bn"
  name: "bn1"
  type: "BN"
  bn_param {
    bn_mode: INFERENCE
    scale_filler { type: "constant" value: 1 }
    shift_filler { type: "constant" value: 0.001 }
  }
}
layer {
  name: "pool1"
  type: "Pooling"
  bottom: "conv1_bn"
  top: "pool1"
  top: "pool1_mask"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 }
}
layer {
  name: "upsample1"
  type: "Upsample"
  bottom: "pool1"
  top: "pool1_D"
  bottom: "pool1_mask"
  upsample_param { scale: 2 }
}
layer {
  name: "conv5_3_pool1_conv/bn"
  type: "BN"
  bottom: "pool1_D"
  top: "pool1_D"
  param { lr_mult: 10 decay_mult: 0 }
  param { lr_mult: 10 decay_mult: 0 }
  param { lr_mult: 0 decay_mult: 1 }
  param { lr_mult: 0 decay_mult: 0 }
  bn_param {
    slope_filler { type: "constant" value: 1 }
    bias_filler { type: "constant" value: 0 }
    frozen: true
    momentum: 0.95
  }
}
"""


def test_segnet_and_pspnet_layers_round_trip(tmp_path) -> None:
    """Convert, write back with to-caffe, convert again: the same layers, blobs and ONNX graph."""
    text = ROUND_TRIP
    net = parse_prototxt(text, "<test>")
    prototxt, weights = tmp_path / "segnet.prototxt", tmp_path / "segnet.caffemodel"
    prototxt.write_text(text)
    write_caffemodel(weights, net, {"bn1": _blobs(3, 12, 2), "conv5_3_pool1_conv/bn": _pspnet_blobs(3, 13)})
    first = convert_files(prototxt, weights)
    first.save(tmp_path / "m.onnx")
    convert_to_caffe_files(tmp_path / "m.onnx", tmp_path / "back.prototxt", tmp_path / "back.caffemodel")
    assert net_without_blobs(load_net(tmp_path / "back.prototxt")) == net_without_blobs(load_net(prototxt))
    original, back = load_weights(weights), load_weights(tmp_path / "back.caffemodel")
    for layer in ("bn1", "conv5_3_pool1_conv/bn"):
        assert [b.data.tobytes() for b in back.blobs[layer]] == [b.data.tobytes() for b in original.blobs[layer]]
    second = convert_files(tmp_path / "back.prototxt", tmp_path / "back.caffemodel")
    assert second.model.graph == first.model.graph


def _pspnet_moving_averages(xs: list[np.ndarray], mean: np.ndarray, var: np.ndarray,
                            momentum: float) -> tuple[np.ndarray, np.ndarray]:
    """Forward_cpu in TRAIN, not frozen: caffe_cpu_axpby(1 − momentum, batch, momentum, blob) for blobs 2 and 3,
    the batch variance biased (the mean of (x − E[x])² over num, height and width)."""
    mean, var = mean.astype(np.float64), var.astype(np.float64)
    for x in xs:
        x4 = x.astype(np.float64).reshape((*x.shape, 1, 1, 1)[:4])
        batch_mean = x4.mean(axis=(0, 2, 3), keepdims=True)
        batch_var = ((x4 - batch_mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
        mean = (1 - momentum) * batch_mean + momentum * mean
        var = (1 - momentum) * batch_var + momentum * var
    return mean, var


@pytest.mark.parametrize("shape", [(3, 4, 5, 2), (6, 4)])
def test_pspnet_bn_training_accumulates_the_moving_averages(shape: tuple[int, ...]) -> None:
    """Trainer forwards in TRAIN (non-frozen) normalise with the batch's statistics and move blobs 2 and 3 by
    momentum 0.95 as Forward_cpu does; slope and bias stay; the TEST-phase net (onnxruntime and eval()) then
    uses the accumulated statistics.  Tolerances: the module's atol 1e-5, rtol 1e-4 (float32 vs float64)."""
    name, top = "conv5_3_pool1_conv/bn", "data@conv5_3_pool1_conv/bn"
    blobs = _pspnet_blobs(4, 14)
    text = _pspnet_bn(shape, frozen=False)
    converted = convert_text(text, {name: blobs}, phase=caffe_pb2.TRAIN)
    module = GraphModule(converted.model, converted.weights).train()
    assert [ov.layer for ov in module.overrides.values()] == [name]
    xs = [(rng(s).normal(size=shape) * 3 + 1).astype(np.float32) for s in (21, 22, 23)]
    for x in xs:
        with torch.no_grad():
            got = module({"data": x}, [top])[top].numpy()
        x4 = x.reshape((*shape, 1, 1, 1)[:4])
        assert_close(got, pspnet_bn_forward(x4, *blobs, eps=1e-5, stored=False)["top"].reshape(shape), "top (batch)")
    mean, var = _pspnet_moving_averages(xs, blobs[2], blobs[3], float(np.float32(0.95)))
    arrays = module.arrays()
    assert_close(arrays[f"{name}.mean"], mean.astype(np.float32), "mean blob")
    assert_close(arrays[f"{name}.variance"], var.astype(np.float32), "variance blob")
    for i, blob in enumerate(("slope", "bias")):
        assert np.array_equal(arrays[f"{name}.{blob}"], blobs[i]), f"{blob} is not a statistic"

    trained = [arrays[f"{name}.{b}"] for b in ("slope", "bias", "mean", "variance")]
    x = rng(24).normal(size=shape).astype(np.float32)
    want = pspnet_bn_forward(x.reshape((*shape, 1, 1, 1)[:4]), *trained, eps=1e-5, stored=True)["top"].reshape(shape)
    test_net = convert_text(text, {name: trained}, phase=caffe_pb2.TEST)
    assert_close(run(test_net, {"data": x})[top], want, "TEST-phase top (onnxruntime)")
    evaluated = GraphModule(test_net.model, test_net.weights).eval()
    with torch.no_grad():
        assert_close(evaluated({"data": x}, [top])[top].numpy(), want, "TEST-phase top (eval)")


@pytest.mark.parametrize("text", [_pspnet_bn((3, 4, 5, 2), frozen=True), _segnet_bn((3, 4, 5, 2), "LEARN")])
def test_frozen_pspnet_and_segnet_bn_leave_their_blobs_in_training(text: str) -> None:
    """Frozen PSPNet BN reads its stored statistics and SegNet's LEARN keeps none in its blobs: no override,
    and training forwards change no blob."""
    converted = convert_text(text, phase=caffe_pb2.TRAIN)
    module = GraphModule(converted.model, converted.weights).train()
    assert module.overrides == {}
    before = module.arrays()
    with torch.no_grad():
        module({"data": rng(25).normal(size=(3, 4, 5, 2)).astype(np.float32)})
    assert all(np.array_equal(v, before[k]) for k, v in module.arrays().items())
