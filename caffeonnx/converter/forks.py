"""The Caffe forks caffeonnx reads, and the field numbers where they disagree with BVLC.

Why this exists: most Caffe models people still convert were trained with a fork
(SSD, SegNet, DeepLab/PSPNet, ShuffleNet, Faster R-CNN, R-FCN, DeconvNet), whose caffe.proto
adds layer types and fields to BVLC's.  Text prototxts name fields, so one schema with every
fork's fields parses them all.  Binary caffemodels number fields, and some forks reused
numbers BVLC, or another fork, gives to something else:

- SegNet's `upsample_param` is 137 (BVLC: `embed_param`), DeepLab's `interp_param` is 143
  (BVLC: `input_param`), OpenCV's `proposal_param` is 201 (SSD: `multibox_loss_param`).
  These are told apart by the layer's type: on a layer of type Upsample, field 137 is the
  upsample_param (`FORK_FIELDS`).
- Two forks define a layer type "BN": SegNet's `bn_param` is 45 with scale_filler,
  shift_filler, bn_mode at 1, 2, 3; PSPNet's is 152 with slope_filler, bias_filler, momentum
  at 1, 2, 3.  On a BN layer field 152 is PSPNet's, and its fields 1-3 move too (a
  `ForkField`'s `inner` numbers); a BN layer setting PSPNet's fields is written back that way
  (`marks`), and is labelled PSPNet's rather than SegNet's (`layer_fork`).
- DenseBox's Resize layer went into three forks under three numbers: `resize_param` is 231 in
  caffe-windows (caffe.proto's number), 3001 in DenseBox, 251 in inisis/caffe.  The other two
  are read on a Resize layer (`read_only` entries) and written back at 231.
- `pooling_param` field 13 is BVLC master's `round_mode` enum (CEIL = 0, FLOOR = 1) and the
  forks' `ceil_mode` bool (true = 1 = ceil): the same bytes mean opposite things and the
  layer type cannot tell.  The prototxt's spelling decides (`adopt_spelling`): a caffemodel
  read alone is taken as BVLC's round_mode; read with a prototxt that spells `ceil_mode`
  for that layer, field 13 is the fork's ceil_mode.

caffe.proto declares each conflicting fork field under a private number; this module moves
it to and from the fork's number when caffemodel bytes are read or written.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from caffeonnx.proto import caffe_pb2


@dataclass(frozen=True)
class Fork:
    """A Caffe fork whose layer types caffeonnx converts."""

    key: str  # as `register_layer(..., fork=key)` and `to-caffe --target` spell it
    name: str
    source: str  # the repository whose caffe.proto and layers/*.cpp define its semantics
    models: str  # public models written for it


FORKS: dict[str, Fork] = {f.key: f for f in (
    Fork("bvlc", "BVLC Caffe", "BVLC/caffe", "the BVLC model zoo"),
    Fork("ssd", "SSD", "weiliu89/caffe (ssd branch)", "MobileNet-SSD, the res10 face detector, VGG-SSD"),
    Fork("segnet", "SegNet", "alexgkendall/caffe-segnet", "SegNet, Bayesian SegNet, ENet"),
    Fork("deeplab", "DeepLab / PSPNet", "hszhao/PSPNet, DeepLab's deeplab-public-ver2", "PSPNet, DeepLab v2, ICNet"),
    Fork("shufflenet", "ShuffleNet", "farmingyard/ShuffleNet", "ShuffleNet v1/v2"),
    Fork("senet", "SENet", "hujie-frank/SENet", "SE-ResNet, SE-BN-Inception (Axpy)"),
    Fork("mobilenet", "MobileNet forks", "yonghenglh6/DepthwiseConvolution, farmingyard/caffe-mobilenet (depthwise "
         "layers); inisis/caffe, Zeitzmz/micronet-caffe, eric612/MobileNet-YOLO, synopsys-caffe (activations)",
         "MobileNet v1/v2/v3 and MobileNet-SSD variants (depthwise layers, ReLU6, HardSwish, HardSigmoid)"),
    Fork("pixel-shuffle", "PixelShuffle forks", "inisis/caffe, wj1tr0y/gait_extractor", "sub-pixel upsampling (PixelShuffle)"),
    Fork("ceil-mode", "forks with pooling ceil_mode", "BVLC/caffe PR #3057, carried by most forks",
         "DenseNet, ENet, PSPNet (pooling_param { ceil_mode })"),
    Fork("fast-rcnn", "Fast/Faster R-CNN", "rbgirshick/caffe-fast-rcnn", "Fast R-CNN, Faster R-CNN"),
    Fork("rfcn", "R-FCN", "daijifeng001/caffe-rfcn", "R-FCN"),
    Fork("opencv", "OpenCV DNN's Caffe schema", "opencv/opencv (modules/dnn, opencv-caffe.proto)",
         "Faster R-CNN with a C++ Proposal layer"),
    Fork("deconvnet", "DeconvNet", "HyeonwooNoh/caffe (V1 nets only)",
         "DeconvNet, EDeconvNet (V1 type UNPOOLING; its BN is SegNet's)"),
    Fork("caffe-windows", "caffe-windows / DenseBox", "happynear/caffe-windows; yangyi02/densebox (where its Resize "
         "comes from), inisis/caffe", "DenseBox and its multi-scale detectors (Resize with is_pyramid_test)"),
)}

# PSPNet's bn_param fields (SegNet's BNParameter has scale_filler, shift_filler, bn_mode).
PSPNET_BN_FIELDS = ("slope_filler", "bias_filler", "momentum", "eps", "frozen", "engine")


@dataclass(frozen=True)
class ForkField:
    """A LayerParameter field that a fork numbers differently from caffe.proto, on layers of one type.

    `inner` gives the fork's numbers of fields inside the message that caffe.proto declares
    under private numbers.  `marks` names the message fields only this fork has, for a layer
    type a second fork also defines with the field at caffe.proto's number: a layer setting
    one of them is this fork's (written at `number`), any other the second fork's.
    """

    layer_type: str
    field: str  # LayerParameter field name
    number: int  # the fork's number for it
    fork: str  # FORKS key
    inner: tuple[tuple[str, int], ...] = ()  # (sub-message field name, the fork's number for it)
    marks: tuple[str, ...] = ()
    read_only: bool = False  # another fork's number for a field caffe.proto declares at its own: read, never written


FORK_FIELDS: tuple[ForkField, ...] = (
    ForkField("Upsample", "upsample_param", 137, "segnet"),
    ForkField("Interp", "interp_param", 143, "deeplab"),
    ForkField("Proposal", "proposal_param", 201, "opencv"),
    ForkField("BN", "bn_param", 152, "deeplab", (("slope_filler", 1), ("bias_filler", 2), ("momentum", 3)),
              PSPNET_BN_FIELDS),
    # caffe.proto has resize_param at caffe-windows' 231; DenseBox's and inisis/caffe's caffemodels hold it here
    ForkField("Resize", "resize_param", 3001, "caffe-windows", read_only=True),
    ForkField("Resize", "resize_param", 251, "caffe-windows", read_only=True),
)

# A renumbering: a field's number as found -> (its number to write, the renumbering inside its message).
Renumbering = Mapping[int, tuple[int, "Renumbering"]]

_LAYER_FIELDS = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name


def _moves(entry: ForkField) -> tuple[int, dict[int, int]]:
    """caffe.proto's number of `entry`'s field, and {caffe.proto's number: the fork's} inside its message."""
    descriptor = _LAYER_FIELDS[entry.field]
    inner = descriptor.message_type.fields_by_name
    return descriptor.number, {inner[name].number: number for name, number in entry.inner}


# layer type -> the renumbering that reads its fork fields
_READ: dict[str, dict[int, tuple[int, Renumbering]]] = {}
for _entry in FORK_FIELDS:
    _schema, _inner = _moves(_entry)
    _READ.setdefault(_entry.layer_type, {})[_entry.number] = (
        _schema, {fork: (schema, {}) for schema, fork in _inner.items()})


def _marked(layer: caffe_pb2.LayerParameter, entry: ForkField) -> bool:
    """Whether `layer` sets one of the fields that only `entry`'s fork has."""
    message = getattr(layer, entry.field)
    return any(message.HasField(name) for name in entry.marks)


def read_numbers(layer_type: str) -> Renumbering:
    """For a caffemodel layer of `layer_type`: fork field number -> (caffe.proto's number, inner renumbering)."""
    return _READ.get(layer_type, {})


def write_numbers(layer: caffe_pb2.LayerParameter) -> Renumbering:
    """For `layer` written to a caffemodel: caffe.proto's number -> (the fork's number, inner renumbering).

    A fork field with `marks` moves only when the layer sets one of them (PSPNet's BN; SegNet's
    BN keeps bn_param at 45).
    """
    moves: dict[int, tuple[int, Renumbering]] = {}
    for entry in FORK_FIELDS:
        if entry.layer_type == layer.type and not entry.read_only and (not entry.marks or _marked(layer, entry)):
            schema, inner = _moves(entry)
            moves[schema] = (entry.number, {s: (f, {}) for s, f in inner.items()})
    return moves


def adopt_spelling(binary: caffe_pb2.NetParameter, text: caffe_pb2.NetParameter) -> None:
    """Read `binary`'s pooling field 13 as the fork's ceil_mode where `text` spells ceil_mode.

    Layers are matched by name, as Caffe matches a caffemodel to a prototxt; the first
    prototxt layer of a name decides.
    """
    spelled: dict[str, bool] = {}
    for layer in text.layer:
        if layer.name not in spelled:
            spelled[layer.name] = layer.pooling_param.HasField("ceil_mode")
    for layer in binary.layer:
        p = layer.pooling_param
        if spelled.get(layer.name) and p.HasField("round_mode") and not p.HasField("ceil_mode"):
            # the fork wrote bool ceil_mode as field 13: 1 (true) reads as FLOOR, 0 (false) as CEIL
            p.ceil_mode = p.round_mode == caffe_pb2.PoolingParameter.FLOOR
            p.ClearField("round_mode")


def spell_for_wire(layer: caffe_pb2.LayerParameter) -> None:
    """Put a fork's ceil_mode in field 13 as the forks write it (bool true = 1), in place: `adopt_spelling`'s inverse.

    Field 13 is round_mode in caffe.proto, so the bool goes in as the enum value of the same number.
    """
    p = layer.pooling_param
    if p.HasField("ceil_mode"):
        ceil = p.ceil_mode
        p.ClearField("ceil_mode")
        p.round_mode = caffe_pb2.PoolingParameter.FLOOR if ceil else caffe_pb2.PoolingParameter.CEIL


def ceil_rounding(p: caffe_pb2.PoolingParameter) -> bool:
    """Whether a pooling layer rounds its output size up, whichever spelling it uses."""
    if p.HasField("ceil_mode"):
        return p.ceil_mode
    return p.round_mode == caffe_pb2.PoolingParameter.CEIL


def fork_of_type(layer_type: str) -> str:
    """The fork that defines `layer_type` ("bvlc" for BVLC's own and for types caffeonnx does not know)."""
    from caffeonnx.converter.registry import get_handler

    handler = get_handler(layer_type)
    return handler.fork if handler is not None else "bvlc"


def layer_fork(layer: caffe_pb2.LayerParameter) -> str:
    """The fork that defines `layer`'s type as the layer uses it.

    A type two forks define is told by the fields the layer sets (a BN layer with PSPNet's
    bn_param fields is PSPNet's, else SegNet's); otherwise the type's fork (`fork_of_type`).
    """
    for entry in FORK_FIELDS:
        if entry.layer_type == layer.type and entry.marks and _marked(layer, entry):
            return entry.fork
    return fork_of_type(layer.type)


def fork_of(layer: caffe_pb2.LayerParameter) -> str:
    """The fork a layer needs: its type's fork (told by its fields where two forks define the type),
    else the fork of a fork-only field it sets."""
    fork = layer_fork(layer)
    if fork != "bvlc":
        return fork
    if layer.pooling_param.HasField("ceil_mode"):
        return "ceil-mode"
    return "bvlc"


def retarget(net: caffe_pb2.NetParameter, target: str) -> None:
    """Make `net` loadable by the Caffe `target` ("any", "bvlc" or a fork key), in place.

    Pooling's ceil_mode becomes BVLC's round_mode for a BVLC target (same windows; the forks
    carry ceil_mode, so it stays for them); a layer type the target lacks cannot be rewritten,
    so all of them are reported at once.  A layer type two forks define belongs to the fork
    whose fields the layer sets (`layer_fork`).
    """
    from caffeonnx.errors import CaffeOnnxError

    if target == "any":
        return
    if target not in FORKS:
        raise CaffeOnnxError(f"--target {target!r} is not a Caffe caffeonnx knows; use any, "
                             + ", ".join(sorted(FORKS)))
    if target == "deconvnet":
        raise CaffeOnnxError("DeconvNet's Caffe reads only V1 nets (layers { type: UNPOOLING }) and to-caffe writes "
                             "current `layer {}` nets, which it cannot load; use --target any")
    if target == "bvlc":
        for layer in net.layer:
            p = layer.pooling_param
            if p.HasField("ceil_mode"):
                ceil = p.ceil_mode
                p.ClearField("ceil_mode")
                if not ceil:
                    p.round_mode = caffe_pb2.PoolingParameter.FLOOR
    foreign = [(layer.name, layer.type, fork) for layer in net.layer
               if (fork := layer_fork(layer)) not in ("bvlc", target)]
    if foreign:
        listed = "; ".join(f"{name!r} ({type_}, from {FORKS[fork].name})" for name, type_, fork in foreign)
        raise CaffeOnnxError(
            f"{FORKS[target].name} has no layer type for {len(foreign)} layer(s): {listed}. Write for the Caffe "
            f"that has them (--target {foreign[0][2]}) or --target any"
        )
