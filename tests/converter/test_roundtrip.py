"""Caffe -> ONNX -> Caffe -> ONNX: the net, the blobs and the ONNX graph all come back."""
from __future__ import annotations

import json

import numpy as np
import pytest

from caffeonnx.converter.caffe_to_onnx import convert_files, load_net, load_weights
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.converter.metadata import net_without_blobs
from caffeonnx.converter.onnx_to_caffe import convert_to_caffe_files
from caffeonnx.converter.verify import compare_blobs, load_npz
from tests.helpers import REFERENCE

FORWARD_CASES = sorted(
    p.name for p in REFERENCE.iterdir()
    if (p / "case.json").exists() and json.loads((p / "case.json").read_text())["kind"] == "forward"
)


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_round_trip_restores_net_blobs_and_graph(case: str, tmp_path) -> None:
    d = REFERENCE / case
    first = convert_files(d / "net.prototxt", d / "weights.caffemodel")
    onnx_path = tmp_path / "first.onnx"
    first.save(onnx_path)
    proto, weights = tmp_path / "back.prototxt", tmp_path / "back.caffemodel"
    convert_to_caffe_files(onnx_path, proto, weights)

    assert net_without_blobs(load_net(proto)) == net_without_blobs(load_net(d / "net.prototxt"))
    original, back = load_weights(d / "weights.caffemodel"), load_weights(weights)
    assert sorted(k for k, v in back.blobs.items() if v) == sorted(k for k, v in original.blobs.items() if v)
    for layer, blobs in original.blobs.items():
        for i, blob in enumerate(blobs):
            got = back.blobs[layer][i].data
            assert got.tobytes() == np.ascontiguousarray(blob.data).tobytes(), f"{layer} blob {i} bytes differ"

    second = convert_files(proto, weights)
    assert second.model.graph == first.model.graph
    assert {k: v.tobytes() for k, v in second.weights.items()} == {k: v.tobytes() for k, v in first.weights.items()}
    meta = json.loads((d / "case.json").read_text())
    checks = compare_blobs(convert_files(proto, weights, ConvertOptions(all_blobs=True)),
                           load_npz(d / "inputs.npz", "inputs"), load_npz(d / "blobs.npz", "blobs"),
                           atol=meta["atol"], rtol=meta["rtol"])
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]


def test_shared_blob_is_stored_once_per_user_layer(tmp_path) -> None:
    d = REFERENCE / "tied_ae"
    onnx_path = tmp_path / "m.onnx"
    convert_files(d / "net.prototxt", d / "weights.caffemodel").save(onnx_path)
    convert_to_caffe_files(onnx_path, tmp_path / "n.prototxt", tmp_path / "w.caffemodel")
    back = load_weights(tmp_path / "w.caffemodel")
    enc, dec = back.blobs["encode1"][0].data, back.blobs["decode1"][0].data
    assert enc.shape == dec.shape == (64, 784) and np.array_equal(enc, dec)
    net = load_net(tmp_path / "n.prototxt")
    decode1 = next(layer for layer in net.layer if layer.name == "decode1")
    assert decode1.inner_product_param.transpose and decode1.param[0].name == "encode1_matrix"


def test_trained_weights_come_back(tmp_path) -> None:
    """Values edited in the ONNX initializers (as training does) are what the caffemodel holds."""
    import onnx
    from onnx import numpy_helper

    d = REFERENCE / "tied_ae"
    model = convert_files(d / "net.prototxt", d / "weights.caffemodel").to_proto()
    w = model.graph.initializer[0]
    new = numpy_helper.to_array(w) * 2
    w.CopyFrom(numpy_helper.from_array(new, w.name))
    onnx.save(model, tmp_path / "trained.onnx")
    convert_to_caffe_files(tmp_path / "trained.onnx", tmp_path / "n.prototxt", tmp_path / "w.caffemodel")
    back = load_weights(tmp_path / "w.caffemodel")
    assert np.array_equal(back.blobs["encode1"][0].data, new)
    assert np.array_equal(back.blobs["decode1"][0].data, new)
