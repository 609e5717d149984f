"""The forks' schema: field names in text, the forks' own numbers in caffemodels, pooling's
ceil_mode vs round_mode (field 13), `to-caffe --target`, and forks named by inspect/layers.

Pooling outputs are compared with OpenCV DNN's Caffe importer, whose schema reads
`ceil_mode` as the forks do (exact: max pooling picks values, no arithmetic)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from caffeonnx.converter import forks
from caffeonnx.converter.caffe_io import parse_prototxt, read_caffemodel, write_caffemodel
from caffeonnx.errors import CaffeOnnxError, PrototxtError
from caffeonnx.proto import caffe_pb2
from caffeonnx.wire import key, length_delimited
from tests.helpers import convert_text, rng, run

cv2 = pytest.importorskip("cv2")

# DenseNet-121 (shicai/DenseNet-Caffe) writes its stem pooling this way.
DENSENET_STEM = """name: "DENSENET_121"
input: "data"
input_dim: 1
input_dim: 3
input_dim: 13
input_dim: 13
layer {{
  name: "pool1"
  type: "Pooling"
  bottom: "data"
  top: "pool1"
  pooling_param {{
    pool: MAX
    kernel_size: 3
    stride: 2
    pad: {pad}
    {rounding}
  }}
}}
"""


def _layer_bytes(name: str, type_: str, fields: bytes) -> bytes:
    """A LayerParameter as a fork's Caffe serialises it: name, type, then `fields` verbatim."""
    body = length_delimited(1, len(name)) + name.encode() + length_delimited(2, len(type_)) + type_.encode() + fields
    return length_delimited(100, len(body)) + body


@pytest.mark.parametrize(("rounding", "ceil"), [
    ("ceil_mode: false", False), ("ceil_mode: true", True), ("", True),
    ("round_mode: FLOOR", False), ("round_mode: CEIL", True),
])
@pytest.mark.parametrize("pad", [0, 1])
def test_both_spellings_give_the_same_windows(tmp_path: Path, rounding: str, ceil: bool, pad: int) -> None:
    text = DENSENET_STEM.format(pad=pad, rounding=rounding)
    x = rng(3).normal(size=(1, 3, 13, 13)).astype(np.float32)
    got = run(convert_text(text), {"data": x})["pool1"]
    size = (13 + 2 * pad - 3) / 2
    assert got.shape[-1] == (int(np.ceil(size)) if ceil else int(np.floor(size))) + 1 - (1 if ceil and pad and (
        int(np.ceil(size)) * 2 >= 13 + pad) else 0)
    if "round_mode" not in rounding:  # OpenCV's schema spells the forks' ceil_mode only
        proto = tmp_path / "densenet.prototxt"
        proto.write_text(text)
        net = cv2.dnn.readNetFromCaffe(str(proto))
        net.setInput(x)
        np.testing.assert_array_equal(got, net.forward(), err_msg=f"pool1 with {rounding!r}, pad {pad}")


def test_both_spellings_at_once_are_refused() -> None:
    with pytest.raises(CaffeOnnxError, match="both round_mode .* and ceil_mode"):
        convert_text(DENSENET_STEM.format(pad=0, rounding="ceil_mode: false round_mode: FLOOR"))


@pytest.mark.parametrize("ceil", [False, True])
def test_a_forks_caffemodel_field_13_follows_the_prototxt_spelling(tmp_path: Path, ceil: bool) -> None:
    """A fork wrote `ceil_mode: false` as field 13 = 0, which BVLC's schema reads as round_mode CEIL."""
    pooling = (key(13, 0) + bytes([int(ceil)]))
    pooling = key(1, 0) + b"\x00" + key(2, 0) + b"\x03" + key(3, 0) + b"\x02" + pooling
    data = _layer_bytes("pool1", "Pooling", length_delimited(121, len(pooling)) + pooling)
    path = tmp_path / "densenet.caffemodel"
    path.write_bytes(data)
    alone = read_caffemodel(path).net.layer[0].pooling_param
    assert alone.round_mode == (caffe_pb2.PoolingParameter.FLOOR if ceil else caffe_pb2.PoolingParameter.CEIL)
    spelled = parse_prototxt(DENSENET_STEM.format(pad=0, rounding=f"ceil_mode: {str(ceil).lower()}"))
    binary = read_caffemodel(path).net
    forks.adopt_spelling(binary, spelled)
    p = binary.layer[0].pooling_param
    assert p.HasField("ceil_mode") and p.ceil_mode == ceil and not p.HasField("round_mode")
    # the prototxt spelling round_mode keeps BVLC's meaning
    bvlc = read_caffemodel(path).net
    forks.adopt_spelling(bvlc, parse_prototxt(DENSENET_STEM.format(pad=0, rounding="round_mode: CEIL")))
    assert not bvlc.layer[0].pooling_param.HasField("ceil_mode")


@pytest.mark.parametrize("ceil", [False, True])
def test_ceil_mode_is_written_where_the_forks_read_it(tmp_path: Path, ceil: bool) -> None:
    net = parse_prototxt(DENSENET_STEM.format(pad=0, rounding=f"ceil_mode: {str(ceil).lower()}"))
    path = tmp_path / "out.caffemodel"
    write_caffemodel(path, net, {})
    raw = path.read_bytes()
    assert key(13, 0) + bytes([int(ceil)]) in raw  # field 13, the forks' bool: 1 = ceil
    # read back with the same prototxt: the same meaning
    back = read_caffemodel(path).net
    forks.adopt_spelling(back, net)
    assert back.layer[0].pooling_param.ceil_mode == ceil


# SegNet's decoder (alexgkendall/caffe-segnet, segnet_basic_inference.prototxt) and PSPNet's pyramid.
SEGNET_UPSAMPLE = {"upsample_param": caffe_pb2.UpsampleParameter(scale=2, upsample_h=90, upsample_w=120)}


@pytest.mark.parametrize(("type_", "field", "fork_number", "message"), [
    ("Upsample", "upsample_param", 137, caffe_pb2.UpsampleParameter(scale=2, upsample_h=90, upsample_w=120)),
    ("Interp", "interp_param", 143, caffe_pb2.InterpParameter(zoom_factor=8, pad_beg=0, pad_end=0)),
    ("Proposal", "proposal_param", 201, caffe_pb2.ProposalParameter(feat_stride=16, ratio=[0.5, 1, 2])),
])
def test_fork_field_numbers_are_read_by_layer_type(tmp_path: Path, type_: str, field: str, fork_number: int,
                                                   message: object) -> None:
    """The fork numbered the field as BVLC numbers another one; the layer type tells which is meant."""
    payload = message.SerializeToString()
    fork_layer = _layer_bytes("fork", type_, length_delimited(fork_number, len(payload)) + payload)
    embed = caffe_pb2.EmbedParameter(num_output=3, input_dim=4).SerializeToString()
    bvlc_layer = _layer_bytes("embed", "Embed", length_delimited(137, len(embed)) + embed)
    path = tmp_path / "fork.caffemodel"
    path.write_bytes(fork_layer + bvlc_layer)
    net = read_caffemodel(path).net
    assert getattr(net.layer[0], field) == message
    assert net.layer[1].embed_param.num_output == 3  # BVLC's own field 137 is untouched
    # and written back at the fork's number
    out = tmp_path / "again.caffemodel"
    write_caffemodel(out, net, {})
    assert length_delimited(fork_number, len(payload)) + payload in out.read_bytes()


def test_every_fork_message_parses_as_the_public_models_write_it() -> None:
    """Text snippets as they appear in MobileNet-SSD, res10, SegNet, PSPNet, ShuffleNet, py-faster-rcnn, R-FCN."""
    net = parse_prototxt("""
layer { name: "conv4_3_norm" type: "Normalize" bottom: "conv4_3" top: "conv4_3_norm"
  norm_param { across_spatial: false scale_filler { type: "constant" value: 20 } channel_shared: false } }
layer { name: "conv11_mbox_priorbox" type: "PriorBox" bottom: "conv11" bottom: "data" top: "conv11_mbox_priorbox"
  prior_box_param { min_size: 60.0 aspect_ratio: 2.0 flip: true clip: false variance: 0.1 variance: 0.1
    variance: 0.2 variance: 0.2 offset: 0.5 } }
layer { name: "detection_out" type: "DetectionOutput" bottom: "mbox_loc" bottom: "mbox_conf_flatten"
  bottom: "mbox_priorbox" top: "detection_out" include { phase: TEST }
  detection_output_param { num_classes: 21 share_location: true background_label_id: 0
    nms_param { nms_threshold: 0.45 top_k: 100 } code_type: CENTER_SIZE keep_top_k: 100
    confidence_threshold: 0.25 } }
layer { name: "upsample4" type: "Upsample" bottom: "conv5_1_D" bottom: "pool4_mask" top: "pool4_D"
  upsample_param { scale: 2 upsample_w: 60 upsample_h: 45 } }
layer { name: "conv1_1_bn" type: "BN" bottom: "conv1_1" top: "conv1_1" bn_param { bn_mode: INFERENCE
  scale_filler { type: "constant" value: 1 } shift_filler { type: "constant" value: 0.001 } } }
layer { name: "conv5_3_pool1_interp" type: "Interp" bottom: "conv5_3_pool1_conv" top: "conv5_3_pool1_interp"
  interp_param { height: 60 width: 60 } }
layer { name: "shuffle2" type: "ShuffleChannel" bottom: "resx2_conv1" top: "shuffle2"
  shuffle_channel_param { group: 3 } }
layer { name: "roi_pool5" type: "ROIPooling" bottom: "conv5_3" bottom: "rois" top: "pool5"
  roi_pooling_param { pooled_w: 7 pooled_h: 7 spatial_scale: 0.0625 } }
layer { name: "psroipooled_cls_rois" type: "PSROIPooling" bottom: "rfcn_cls" bottom: "rois"
  top: "psroipooled_cls_rois" psroi_pooling_param { spatial_scale: 0.0625 output_dim: 21 group_size: 7 } }
layer { name: "proposal" type: "Proposal" bottom: "rpn_cls_prob_reshape" bottom: "rpn_bbox_pred"
  bottom: "im_info" top: "rois" proposal_param { ratio: 0.5 ratio: 1.0 ratio: 2.0 scale: 8 scale: 16
    scale: 32 } }
""")
    assert [layer.type for layer in net.layer][:3] == ["Normalize", "PriorBox", "DetectionOutput"]
    assert net.layer[2].detection_output_param.nms_param.top_k == 100


def test_a_field_no_fork_has_is_still_a_clear_error() -> None:
    with pytest.raises(PrototxtError, match=r"<string>:3:\d+: .*has no field named \"zoom\""):
        parse_prototxt('layer {\n  name: "i" type: "Interp"\n  interp_param { zoom: 2 }\n}\n')


PERMUTE_NET = """name: "ssd_head"
input: "data"
input_shape { dim: 1 dim: 4 dim: 3 dim: 5 }
layer {
  name: "conv11_mbox_loc_perm"
  type: "Permute"
  bottom: "data"
  top: "conv11_mbox_loc_perm"
  permute_param { order: 0 order: 2 order: 3 order: 1 }
}
layer {
  name: "pool"
  type: "Pooling"
  bottom: "conv11_mbox_loc_perm"
  top: "pool"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 ceil_mode: false }
}
"""


def test_to_caffe_target(tmp_path: Path) -> None:
    from caffeonnx.converter.onnx_to_caffe import onnx_to_caffe

    model = convert_text(PERMUTE_NET).to_proto()
    with pytest.raises(CaffeOnnxError, match=r"BVLC Caffe has no layer type for 1 layer\(s\): "
                                             r"'conv11_mbox_loc_perm' \(Permute, from SSD\).*--target ssd"):
        onnx_to_caffe(model, target="bvlc")
    with pytest.raises(CaffeOnnxError, match="--target 'caffe2' is not a Caffe"):
        onnx_to_caffe(model, target="caffe2")
    def layer(net: caffe_pb2.NetParameter, name: str) -> caffe_pb2.LayerParameter:
        return next(x for x in net.layer if x.name == name)

    ssd = onnx_to_caffe(model, target="ssd").net
    assert layer(ssd, "pool").pooling_param.ceil_mode is False  # the forks carry ceil_mode: kept
    assert layer(onnx_to_caffe(model).net, "conv11_mbox_loc_perm").type == "Permute"
    # without fork layers, a BVLC target gets round_mode for ceil_mode: same windows
    only_pool = convert_text(PERMUTE_NET.replace('type: "Permute"', 'type: "ReLU"')
                             .replace("permute_param { order: 0 order: 2 order: 3 order: 1 }", "")).to_proto()
    bvlc = onnx_to_caffe(only_pool, target="bvlc").net
    p = layer(bvlc, "pool").pooling_param
    assert not p.HasField("ceil_mode") and p.round_mode == caffe_pb2.PoolingParameter.FLOOR


def test_inspect_and_layers_name_the_fork(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from caffeonnx.cli import app

    proto = tmp_path / "ssd_head.prototxt"
    proto.write_text(PERMUTE_NET)
    runner = CliRunner()
    res = runner.invoke(app, ["inspect", str(proto)])
    assert res.exit_code == 0, res.output
    assert "Permute (SSD)" in res.output and "Pooling (forks with pooling ceil_mode)" in res.output
    res = runner.invoke(app, ["inspect", "--json", str(proto)])
    assert '"fork": "ssd"' in res.output
    res = runner.invoke(app, ["layers"])
    assert any(line.startswith("Permute") and "[SSD]" in line for line in res.output.splitlines())


def test_silenced_last_blob_stays_an_output() -> None:
    """colorization's deploy net: class8_ab feeds only a Silence layer; the model must still have an output."""
    converted = convert_text("""name: "LtoAB"
layer { name: "data_l" type: "Input" top: "data_l" input_param { shape { dim: 1 dim: 1 dim: 8 dim: 8 } } }
layer { name: "conv8_313" type: "Convolution" bottom: "data_l" top: "conv8_313"
  convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "class8_ab" type: "Convolution" bottom: "conv8_313" top: "class8_ab"
  convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "Silence" type: "Silence" bottom: "class8_ab" }
""")
    assert [o.name for o in converted.to_proto().graph.output] == ["class8_ab"]
    assert run(converted, {"data_l": np.ones((1, 1, 8, 8), np.float32)})["class8_ab"].shape == (1, 2, 8, 8)


# --- BN: SegNet's (bn_param 45) and PSPNet's (bn_param 152, its fields 1-3 its own) -------------

def _wire_fields(buf: bytes) -> dict[int, list[int | bytes]]:
    """A message's top-level fields as read off the wire: number -> values (varints as ints, others raw)."""
    def varint(pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = buf[pos]
            value, pos, shift = value | (byte & 0x7F) << shift, pos + 1, shift + 7
            if not byte & 0x80:
                return value, pos

    fields: dict[int, list[int | bytes]] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = varint(pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = varint(pos)
        elif wire == 2:
            size, pos = varint(pos)
            value, pos = buf[pos:pos + size], pos + size
        else:
            width = {1: 8, 5: 4}[wire]
            value, pos = buf[pos:pos + width], pos + width
        fields.setdefault(number, []).append(value)
    return fields


def _filler(value: float) -> bytes:
    return caffe_pb2.FillerParameter(type="constant", value=value).SerializeToString()


# pspnet50_ADE20K_473.prototxt's first BN and segnet_inference.prototxt's, as their Caffes save them
PSPNET_BN_WIRE = (length_delimited(1, len(_filler(1))) + _filler(1) + length_delimited(2, len(_filler(0))) + _filler(0)
                  + key(3, 5) + np.float32(0.95).tobytes() + key(5, 0) + b"\x01")  # slope, bias, momentum, frozen
SEGNET_BN_WIRE = (key(3, 0) + b"\x01" + length_delimited(1, len(_filler(1))) + _filler(1)
                  + length_delimited(2, len(_filler(0.001))) + _filler(0.001))  # bn_mode INFERENCE, scale, shift


def test_pspnet_and_segnet_bn_caffemodels_read_and_write_their_own_numbers(tmp_path: Path) -> None:
    """On a BN layer field 152 is PSPNet's bn_param (its 1/2/3: slope_filler, bias_filler, momentum), field 45
    SegNet's (1/2/3: scale_filler, shift_filler, bn_mode); each is written back where its Caffe reads it."""
    data = (_layer_bytes("conv1_1_3x3_s2/bn", "BN", length_delimited(152, len(PSPNET_BN_WIRE)) + PSPNET_BN_WIRE)
            + _layer_bytes("conv1_1_bn", "BN", length_delimited(45, len(SEGNET_BN_WIRE)) + SEGNET_BN_WIRE)
            + _layer_bytes("conv1_1_3x3_s2/scale", "Scale", length_delimited(152, len(PSPNET_BN_WIRE)) + PSPNET_BN_WIRE))
    path = tmp_path / "pspnet50_ADE20K.caffemodel"
    path.write_bytes(data)
    pspnet, segnet, other = read_caffemodel(path).net.layer
    p = pspnet.bn_param
    assert p.slope_filler == caffe_pb2.FillerParameter(type="constant", value=1)
    assert p.bias_filler == caffe_pb2.FillerParameter(type="constant", value=0)
    assert p.momentum == np.float32(0.95) and p.frozen
    assert not any(p.HasField(f) for f in ("scale_filler", "shift_filler", "bn_mode"))
    s = segnet.bn_param
    assert s.bn_mode == caffe_pb2.BNParameter.INFERENCE
    assert s.scale_filler.value == 1 and s.shift_filler.value == np.float32(0.001)
    assert not any(s.HasField(f) for f in forks.PSPNET_BN_FIELDS)
    assert not other.HasField("bn_param")  # 152 is PSPNet's bn_param on BN layers only
    assert (forks.fork_of(pspnet), forks.fork_of(segnet)) == ("deeplab", "segnet")

    out = tmp_path / "again.caffemodel"
    write_caffemodel(out, read_caffemodel(path).net, {})
    layers = [_wire_fields(layer) for layer in _wire_fields(out.read_bytes())[100]]
    written = _wire_fields(layers[0][152][0])
    assert 45 not in layers[0] and written == {1: [_filler(1)], 2: [_filler(0)], 3: [np.float32(0.95).tobytes()], 5: [1]}
    assert 152 not in layers[1] and _wire_fields(layers[1][45][0]) == _wire_fields(SEGNET_BN_WIRE)
    assert read_caffemodel(out).net.layer[:2] == read_caffemodel(path).net.layer[:2]


PSPNET_BN_TEXT = """layer {
  name: "conv1_1_3x3_s2/bn"
  type: "BN"
  bottom: "conv1_1_3x3_s2"
  top: "conv1_1_3x3_s2"
  param {
    lr_mult: 1
    decay_mult: 0
  }
  bn_param {
    slope_filler {
      type: "constant"
      value: 1
    }
    bias_filler {
      type: "constant"
      value: 0
    }
    frozen: true
    momentum: 0.95
  }
}
"""
SEGNET_BN_TEXT = """layer {
  bottom: "conv1_1"
  top: "conv1_1"
  name: "conv1_1_bn"
  type: "BN"
  bn_param {
    bn_mode: INFERENCE
    scale_filler {
      type: "constant"
      value: 1
    }
    shift_filler {
      type: "constant"
      value: 0.001
    }
 }
}
"""


def test_to_caffe_target_tells_the_two_bns_apart_by_their_fields() -> None:
    """A layer type two forks define belongs to the fork whose fields the layer sets."""
    pspnet, segnet = parse_prototxt(PSPNET_BN_TEXT), parse_prototxt(SEGNET_BN_TEXT)
    forks.retarget(pspnet, "deeplab")
    forks.retarget(segnet, "segnet")
    with pytest.raises(CaffeOnnxError, match=r"'conv1_1_3x3_s2/bn' \(BN, from DeepLab / PSPNet\).*--target deeplab"):
        forks.retarget(pspnet, "segnet")
    with pytest.raises(CaffeOnnxError, match=r"'conv1_1_bn' \(BN, from SegNet\).*--target segnet"):
        forks.retarget(segnet, "deeplab")
    assert forks.layer_fork(pspnet.layer[0]) == "deeplab" and forks.fork_of_type("BN") == "segnet"
