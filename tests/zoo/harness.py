"""The zoo's shared steps: seeded weights written to a caffemodel, and every blob of the converted model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from caffeonnx.converter import metadata
from caffeonnx.converter.caffe_to_onnx import convert_files
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.converter.onnx_to_caffe import CaffeNet, onnx_to_caffe
from tests.helpers import rng


def seeded_weights(prototxt: Path, tmp: Path, seed: int) -> tuple[Path, Path]:
    """The net's own prototxt and a caffemodel of seeded random blobs for every layer that has params.

    Conv/IP weights ~ N(0, 1/fan_in); BatchNorm statistics with a positive variance and a
    moving-average factor of 1; other blobs (biases, scales) around their filler values.
    """
    converted = convert_files(prototxt)
    caffe = onnx_to_caffe(converted.to_proto())
    gen = rng(seed)
    blobs: dict[int | str, list[np.ndarray]] = {}
    shared: dict[str, np.ndarray] = {}  # a named param is one blob: Caffe keeps its per-layer copies identical
    for position, arrays in caffe.blobs.items():
        layer = caffe.net.layer[position]
        new = []
        for i, arr in enumerate(arrays):
            name = layer.param[i].name if i < len(layer.param) else ""
            if name in shared:
                new.append(shared[name].reshape(arr.shape))
                continue
            if layer.type == "BatchNorm":
                value = [gen.normal(0, 0.2, arr.shape), gen.uniform(0.5, 1.5, arr.shape), np.ones(arr.shape)][i]
            elif arr.ndim >= 2:
                value = gen.normal(0, 1 / np.sqrt(max(1, int(np.prod(arr.shape[1:])))), arr.shape)
            else:
                value = arr + gen.normal(0, 0.1, arr.shape)
            value = value.astype(np.float32)
            if name:
                shared[name] = value
            new.append(value)
        blobs[position] = new
    weights = tmp / f"{prototxt.stem}.caffemodel"
    CaffeNet(caffe.net, blobs).save(tmp / "written.prototxt", weights)
    return prototxt, weights


def input_feeds(prototxt: Path, seed: int) -> dict[str, np.ndarray]:
    """Seeded uniform(-1, 1) values for every input the net declares, batch 1."""
    model = convert_files(prototxt).model
    gen = rng(seed)
    feeds = {}
    for inp in model.graph.input:
        dims = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
        feeds[inp.name] = gen.uniform(-1, 1, dims).astype(np.float32)
    return feeds


def caffeonnx_blobs(prototxt: Path, weights: Path, x: np.ndarray | dict[str, np.ndarray]
                    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every blob of the converted model, and each layer's name -> the ONNX value of its first top.

    `x` feeds the input "data", or is every input by name.
    """
    converted = convert_files(prototxt, weights, ConvertOptions(all_blobs=True))
    model = converted.to_proto()
    tops = {rec.name: rec.tops[0] for rec in metadata.layer_records(model) if rec.tops and rec.type != "Input"}
    have = {o.name for o in model.graph.output}
    for value in tops.values():  # an in-place layer's write before the blob's last one (`blob@layer`)
        if value not in have:
            model.graph.output.append(helper.make_tensor_value_info(value, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = x if isinstance(x, dict) else {"data": x}
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    return outs, tops
