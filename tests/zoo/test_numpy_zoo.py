"""Segmentation architectures in their forks' own form, every blob against a numpy Caffe interpreter.

The prototxts in models/ are scaled-down copies of the public deploy files, in their own
file style: SegNet-Basic (alexgkendall/SegNet-Tutorial segnet_basic_inference: SegNet BN in
INFERENCE mode, MAX pooling with mask tops, Upsample with those masks, pad_out_h on the
odd-height level), ENet (TimoSaemann/ENet enet_deploy: initial block conv ‖ pool, PReLU,
bottlenecks with Eltwise SUM, asymmetric and dilated convs, a downsampling bottleneck's
pooling mask reused by an upsampling bottleneck's Upsample, Deconvolution at the end; its
BN written as BatchNorm + Scale) and PSPNet (hszhao/PSPNet pspnet50_ADE20K_473: PSPNet BN
with frozen: true, dilated residual stages, the pyramid pooling module of AVE pooling at
bins 1/2/3/6 → 1x1 conv → BN → ReLU → Interp height/width → Concat, Interp zoom_factor 8).

OpenCV's DNN implements none of SegNet's Upsample/BN nor PSPNet's BN, so the reference is
tests/caffe_numpy.py, whose fork layers call the numpy transcriptions of the forks' C++ in
tests/spatial_fork_reference.py.  Weights are seeded (BN blobs drawn per fork: positive
scales and variances); caffeonnx converts prototxt + caffemodel and onnxruntime runs every
blob, in-place writes included.  The trainer's GraphModule (TEST phase) runs the same
files, and `to-caffe` gives back the same net and blob bytes.
Tolerance: every top of every layer within atol 1e-4 + rtol 1e-3 (float32 through up to
~130 tops against float64 arithmetic; measured worst |diff| ≈ 1e-6, under 1% of the
tolerance); pooling masks exactly.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from caffeonnx.converter.caffe_io import read_caffemodel, read_prototxt, write_caffemodel
from caffeonnx.converter.caffe_to_onnx import convert_files
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.proto import caffe_pb2
from tests import caffe_numpy
from tests.helpers import rng
from tests.zoo.harness import caffeonnx_blobs, seeded_weights

pytest.importorskip("onnxruntime")

MODELS = Path(__file__).parent / "models" / "numpy"
ATOL, RTOL = 1e-4, 1e-3
CASES = [
    ("segnet_basic", (1, 3, 24, 32)),  # 24 = 8·3: pool4 sees 3 rows, upsample4 needs pad_out_h
    ("enet", (1, 3, 32, 64)),
    ("pspnet", (1, 3, 89, 89)),  # 89 → 12 at stride 8, and zoom_factor 8 gives 89 back
]


def fork_weights(prototxt: Path, tmp: Path, seed: int) -> tuple[Path, Path]:
    """seeded_weights' caffemodel with each BN layer's blobs redrawn as its fork stores them.

    SegNet's INFERENCE BN holds folded statistics (scale ~ U(0.5, 1.5), shift ~ N(0, 0.1));
    PSPNet's holds slope, bias, mean and a positive variance.  The generic draw would give
    a (1, C, 1, 1) blob conv-weight statistics: a variance that may be negative.
    """
    prototxt, path = seeded_weights(prototxt, tmp, seed)
    saved = read_caffemodel(path)
    blobs = {name: [np.array(b.data) for b in arrays] for name, arrays in saved.blobs.items()}
    gen = rng(seed + 1)
    for layer in read_prototxt(prototxt).layer:
        if layer.type != "BN":
            continue
        shape = blobs[layer.name][0].shape
        draws = [gen.uniform(0.5, 1.5, shape), gen.normal(0, 0.1, shape)]
        if len(blobs[layer.name]) == 4:  # PSPNet: slope, bias, running mean, running variance
            draws += [gen.normal(0, 0.2, shape), gen.uniform(0.5, 1.5, shape)]
        blobs[layer.name] = [d.astype(np.float32) for d in draws]
    write_caffemodel(path, saved.net, blobs)
    return prototxt, path


def numpy_tops(prototxt: Path, weights: Path, x: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Every layer's tops (by layer name) from tests/caffe_numpy.py."""
    params = {name: [b.data for b in arrays] for name, arrays in read_caffemodel(weights).blobs.items()}
    tops: dict[str, list[np.ndarray]] = {}
    caffe_numpy.forward(read_prototxt(prototxt), params, {"data": x}, tops)
    return tops


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(prototxt, caffemodel, input, numpy tops by layer) of one model, shared by the tests below."""
    model, shape = request.param
    prototxt, weights = fork_weights(MODELS / f"{model}.prototxt", tmp_path_factory.mktemp(model), seed=21)
    x = rng(22).uniform(-1, 1, shape).astype(np.float32)
    return prototxt, weights, x, numpy_tops(prototxt, weights, x)


def test_every_blob_matches_numpy(case) -> None:
    prototxt, weights, x, want = case
    ours, first_tops = caffeonnx_blobs(prototxt, weights, x)
    layers = [lay for lay in read_prototxt(prototxt).layer if lay.type != "Input"]
    assert set(want) == {lay.name for lay in layers}, "caffe_numpy ran every layer"
    compared = 0
    for lay in layers:
        for i, (top, expected) in enumerate(zip(lay.top, want[lay.name])):
            value = first_tops[lay.name] if i == 0 else top  # a second top (a pooling mask) is never in place
            got = ours[value]
            where = f"{prototxt.stem} layer {lay.name!r} ({lay.type}) top {top!r} (value {value!r})"
            assert got.shape == expected.shape, f"{where}: shape {got.shape} vs numpy {expected.shape}"
            if i == 1 and lay.type == "Pooling":
                np.testing.assert_array_equal(got, expected, err_msg=f"{where}: mask offsets")
            else:
                np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL, err_msg=where)
            compared += 1
    assert compared == sum(len(lay.top) for lay in layers)


def test_fork_layers_are_exercised(case) -> None:
    """The seeded inputs reach the fork layers with values that would expose a wrong layer."""
    prototxt, _, x, want = case
    blobs = {"data": x}  # each blob as the next layer reads it
    for lay in read_prototxt(prototxt).layer:
        if lay.type == "Input":
            continue
        top = want[lay.name][0]
        if lay.type in ("Upsample", "BN", "Interp"):
            assert np.abs(top).std() > 0.05, f"{lay.name}: a near-constant top would hide errors"
        if lay.type == "Upsample":  # every bottom value lands once, the rest of the top is zero
            bottom = blobs[lay.bottom[0]]
            assert np.count_nonzero(bottom) > 0.5 * bottom.size, f"{lay.name}: mostly zero bottom"
            assert np.count_nonzero(top) == np.count_nonzero(bottom) < 0.4 * top.size
            np.testing.assert_allclose(np.sort(top[top != 0]), np.sort(bottom[bottom != 0]), rtol=0, atol=0)
        blobs.update(zip(lay.top, want[lay.name]))


def test_trainer_graph_module_runs_the_fork_layers(case) -> None:
    """The same files in the trainer's GraphModule (TEST phase, eval mode) give every blob numpy gives."""
    from caffeonnx.converter import metadata
    from caffeonnx.trainer.graph_module import GraphModule

    prototxt, weights, x, want = case
    converted = convert_files(prototxt, weights, ConvertOptions(all_blobs=True, phase=caffe_pb2.TEST))
    module = GraphModule(converted.model, converted.weights).eval()
    values = {v: (rec.name, j) for rec in metadata.layer_records(converted.model) if rec.type != "Input"
              for j, v in enumerate(rec.tops)}
    got = module({"data": x}, list(values))
    for value, (layer, j) in values.items():
        np.testing.assert_allclose(got[value].detach().numpy(), want[layer][j], atol=ATOL, rtol=RTOL,
                                   err_msg=f"{prototxt.stem} GraphModule value {value!r} (layer {layer!r} top {j})")


def test_to_caffe_round_trips_the_files(case, tmp_path: Path) -> None:
    """Caffe -> ONNX -> Caffe gives back the same net (fork params included) and the same blob bytes."""
    from caffeonnx.converter.caffe_to_onnx import load_net, load_weights
    from caffeonnx.converter.metadata import net_without_blobs
    from caffeonnx.converter.onnx_to_caffe import convert_to_caffe_files

    prototxt, weights, _, _ = case
    first = convert_files(prototxt, weights)
    first.save(tmp_path / "m.onnx")
    convert_to_caffe_files(tmp_path / "m.onnx", tmp_path / "back.prototxt", tmp_path / "back.caffemodel")
    assert net_without_blobs(load_net(tmp_path / "back.prototxt")) == net_without_blobs(load_net(prototxt))
    original, back = load_weights(weights), load_weights(tmp_path / "back.caffemodel")
    assert {k for k, v in back.blobs.items() if v} == {k for k, v in original.blobs.items() if v}
    for layer, blobs in original.blobs.items():
        for i, blob in enumerate(blobs):
            assert back.blobs[layer][i].data.tobytes() == np.ascontiguousarray(blob.data).tobytes(), f"{layer} blob {i}"
    second = convert_files(tmp_path / "back.prototxt", tmp_path / "back.caffemodel")
    assert second.model.graph == first.model.graph
