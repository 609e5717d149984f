"""Bring V0/V1 nets and legacy input fields to the current NetParameter form.

Mirrors what Caffe's upgrade_proto does when it loads an old file, in pure Python,
so every later stage sees only `layer {}` entries with string types and Input layers.
"""
from __future__ import annotations

from caffeonnx.errors import CaffeOnnxError
from caffeonnx.proto import caffe_pb2

V1 = caffe_pb2.V1LayerParameter
_V1_TYPE_NAMES: dict[int, str] = {
    V1.ABSVAL: "AbsVal", V1.ACCURACY: "Accuracy", V1.ARGMAX: "ArgMax", V1.BNLL: "BNLL",
    V1.CONCAT: "Concat", V1.CONTRASTIVE_LOSS: "ContrastiveLoss", V1.CONVOLUTION: "Convolution",
    V1.DATA: "Data", V1.DECONVOLUTION: "Deconvolution", V1.DROPOUT: "Dropout",
    V1.DUMMY_DATA: "DummyData", V1.EUCLIDEAN_LOSS: "EuclideanLoss", V1.ELTWISE: "Eltwise",
    V1.EXP: "Exp", V1.FLATTEN: "Flatten", V1.HDF5_DATA: "HDF5Data", V1.HDF5_OUTPUT: "HDF5Output",
    V1.HINGE_LOSS: "HingeLoss", V1.IM2COL: "Im2col", V1.IMAGE_DATA: "ImageData",
    V1.INFOGAIN_LOSS: "InfogainLoss", V1.INNER_PRODUCT: "InnerProduct", V1.LRN: "LRN",
    V1.MEMORY_DATA: "MemoryData", V1.MULTINOMIAL_LOGISTIC_LOSS: "MultinomialLogisticLoss",
    V1.MVN: "MVN", V1.POOLING: "Pooling", V1.POWER: "Power", V1.RELU: "ReLU",
    V1.SIGMOID: "Sigmoid", V1.SIGMOID_CROSS_ENTROPY_LOSS: "SigmoidCrossEntropyLoss",
    V1.SILENCE: "Silence", V1.SOFTMAX: "Softmax", V1.SOFTMAX_LOSS: "SoftmaxWithLoss",
    V1.SPLIT: "Split", V1.SLICE: "Slice", V1.TANH: "TanH", V1.WINDOW_DATA: "WindowData",
    V1.THRESHOLD: "Threshold",
    # Forks' V1 types.  DeconvNet's Caffe (HyeonwooNoh/caffe) has no V2 layers, so nothing of its
    # own names these: BN is SegNet's V2 type (the same layer and message), Unpooling its C++ class.
    V1.BN: "BN", V1.UNPOOLING: "Unpooling",
}

# V1 sub-messages that have the same type (and name) in LayerParameter.
_V1_SHARED_PARAMS = (
    "accuracy_param", "argmax_param", "concat_param", "contrastive_loss_param",
    "convolution_param", "data_param", "dropout_param", "dummy_data_param", "eltwise_param",
    "exp_param", "hdf5_data_param", "hdf5_output_param", "hinge_loss_param",
    "image_data_param", "infogain_loss_param", "inner_product_param", "lrn_param",
    "memory_data_param", "mvn_param", "pooling_param", "power_param", "relu_param",
    "sigmoid_param", "softmax_param", "slice_param", "tanh_param", "threshold_param",
    "window_data_param", "transform_param", "loss_param",
    "bn_param", "unpooling_param",  # DeconvNet's
)

_V0_TYPES: dict[str, int] = {
    "accuracy": V1.ACCURACY, "bnll": V1.BNLL, "concat": V1.CONCAT, "conv": V1.CONVOLUTION,
    "data": V1.DATA, "dropout": V1.DROPOUT, "euclidean_loss": V1.EUCLIDEAN_LOSS,
    "flatten": V1.FLATTEN, "hdf5_data": V1.HDF5_DATA, "hdf5_output": V1.HDF5_OUTPUT,
    "im2col": V1.IM2COL, "images": V1.IMAGE_DATA, "infogain_loss": V1.INFOGAIN_LOSS,
    "innerproduct": V1.INNER_PRODUCT, "lrn": V1.LRN, "multinomial_logistic_loss":
    V1.MULTINOMIAL_LOGISTIC_LOSS, "pool": V1.POOLING, "relu": V1.RELU, "sigmoid": V1.SIGMOID,
    "softmax": V1.SOFTMAX, "softmax_loss": V1.SOFTMAX_LOSS, "split": V1.SPLIT,
    "tanh": V1.TANH, "window_data": V1.WINDOW_DATA,
}


def _v0_to_v1(v1: caffe_pb2.V1LayerParameter, source: str) -> None:
    """Fold a V0 `layer {}` block into its V1 wrapper (Caffe's UpgradeV0LayerParameter)."""
    v0 = v1.layer
    if v0.type not in _V0_TYPES:
        raise CaffeOnnxError(f"{source}: V0 layer {v0.name!r} has unknown type {v0.type!r}; upgrade the net with Caffe's upgrade_net_proto_text")
    v1.name = v0.name
    v1.type = _V0_TYPES[v0.type]
    v1.blobs.extend(v0.blobs)
    v1.blobs_lr.extend(v0.blobs_lr)
    v1.weight_decay.extend(v0.weight_decay)
    t = v0.type
    if t in ("conv", "innerproduct"):
        p = v1.convolution_param if t == "conv" else v1.inner_product_param
        if v0.HasField("num_output"):
            p.num_output = v0.num_output
        if v0.HasField("biasterm"):
            p.bias_term = v0.biasterm
        if v0.HasField("weight_filler"):
            p.weight_filler.CopyFrom(v0.weight_filler)
        if v0.HasField("bias_filler"):
            p.bias_filler.CopyFrom(v0.bias_filler)
        if t == "conv":
            if v0.HasField("pad"):
                p.pad.append(v0.pad)
            if v0.HasField("kernelsize"):
                p.kernel_size.append(v0.kernelsize)
            if v0.HasField("group"):
                p.group = v0.group
            if v0.HasField("stride"):
                p.stride.append(v0.stride)
    elif t == "pool":
        p = v1.pooling_param
        p.pool = v0.pool
        if v0.HasField("kernelsize"):
            p.kernel_size = v0.kernelsize
        if v0.HasField("stride"):
            p.stride = v0.stride
        if v0.HasField("pad"):
            p.pad = v0.pad
    elif t == "dropout" and v0.HasField("dropout_ratio"):
        v1.dropout_param.dropout_ratio = v0.dropout_ratio
    elif t == "lrn":
        p = v1.lrn_param
        for f in ("local_size", "alpha", "beta", "k"):
            if v0.HasField(f):
                setattr(p, f, getattr(v0, f))
    elif t in ("data", "images", "window_data", "hdf5_data"):
        target = {"data": v1.data_param, "images": v1.image_data_param,
                  "window_data": v1.window_data_param, "hdf5_data": v1.hdf5_data_param}[t]
        if v0.HasField("source"):
            target.source = v0.source
        if v0.HasField("batchsize"):
            target.batch_size = v0.batchsize
        tp = v1.transform_param
        if v0.HasField("scale"):
            tp.scale = v0.scale
        if v0.HasField("meanfile"):
            tp.mean_file = v0.meanfile
        if v0.HasField("cropsize"):
            tp.crop_size = v0.cropsize
        if v0.HasField("mirror"):
            tp.mirror = v0.mirror
    elif t == "concat" and v0.HasField("concat_dim"):
        v1.concat_param.concat_dim = v0.concat_dim
    elif t == "hdf5_output" and v0.HasField("hdf5_output_param"):
        v1.hdf5_output_param.CopyFrom(v0.hdf5_output_param)
    v1.ClearField("layer")


def _v1_to_v2(v1: caffe_pb2.V1LayerParameter, source: str) -> caffe_pb2.LayerParameter:
    """Caffe's UpgradeV1LayerParameter: enum type -> string, blobs_lr -> param specs."""
    if v1.HasField("layer"):
        _v0_to_v1(v1, source)
    out = caffe_pb2.LayerParameter()
    out.name = v1.name
    out.bottom.extend(v1.bottom)
    out.top.extend(v1.top)
    out.include.extend(v1.include)
    out.exclude.extend(v1.exclude)
    if v1.HasField("type"):
        if v1.type not in _V1_TYPE_NAMES:
            raise CaffeOnnxError(f"{source}: V1 layer {v1.name!r} has unknown type number {v1.type}")
        out.type = _V1_TYPE_NAMES[v1.type]
    out.blobs.extend(v1.blobs)
    n_specs = max(len(v1.param), len(v1.blob_share_mode), len(v1.blobs_lr), len(v1.weight_decay))
    for i in range(n_specs):
        spec = out.param.add()
        if i < len(v1.param):
            spec.name = v1.param[i]
        if i < len(v1.blob_share_mode):
            spec.share_mode = v1.blob_share_mode[i]
        if i < len(v1.blobs_lr):
            spec.lr_mult = v1.blobs_lr[i]
        if i < len(v1.weight_decay):
            spec.decay_mult = v1.weight_decay[i]
    out.loss_weight.extend(v1.loss_weight)
    for name in _V1_SHARED_PARAMS:
        if v1.HasField(name):
            getattr(out, name).CopyFrom(getattr(v1, name))
    return out


def _upgrade_input_fields(net: caffe_pb2.NetParameter, source: str) -> None:
    """Caffe's UpgradeNetInput: legacy `input:` fields become one leading Input layer."""
    if not net.input:
        return
    layer = caffe_pb2.LayerParameter(name="input", type="Input")
    layer.top.extend(net.input)
    if net.input_shape:
        shapes = [list(s.dim) for s in net.input_shape]
    elif net.input_dim:
        if len(net.input_dim) != 4 * len(net.input):
            raise CaffeOnnxError(
                f"{source}: {len(net.input)} input(s) need {4 * len(net.input)} input_dim values, "
                f"got {len(net.input_dim)}"
            )
        shapes = [list(net.input_dim[4 * i:4 * i + 4]) for i in range(len(net.input))]
    else:
        shapes = []
    for dims in shapes:
        layer.input_param.shape.add().dim.extend(dims)
    layers = [layer, *net.layer]
    del net.layer[:]
    net.layer.extend(layers)
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")


def upgrade_net(net: caffe_pb2.NetParameter, source: str = "<net>") -> caffe_pb2.NetParameter:
    """Return `net` in current form (V1/V0 layers and legacy inputs upgraded), in place."""
    if net.layers:
        if net.layer:
            raise CaffeOnnxError(f"{source}: mixes V1 'layers' and current 'layer' fields; use one form")
        upgraded = [_v1_to_v2(v1, source) for v1 in net.layers]
        net.ClearField("layers")
        net.layer.extend(upgraded)
    _upgrade_input_fields(net, source)
    return net
