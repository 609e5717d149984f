"""Caffe's own autoencoder layouts: BVLC's mnist_autoencoder (4-D data, flat reconstruction, repeated
layer names, staged Data layers) and a conv autoencoder, cut with `caffeonnx encoder` and encoded with
`caffeonnx encode` from an LMDB, HDF5 files and an image list at the scale the net records.

The MNIST net is written as BVLC's examples/mnist/mnist_autoencoder.prototxt has it (three Data
layers named "data" chosen by phase and stage, Flatten of the data for the losses, two layers named
"loss"); batch 4 and 8-image LMDBs keep it fast.
"""
from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from caffeonnx.cli import app
from caffeonnx.converter import metadata
from caffeonnx.converter.caffe_io import parse_prototxt
from caffeonnx.converter.caffe_to_onnx import ConvertedModel, convert_net
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.converter.upgrade import upgrade_net
from caffeonnx.data.lmdb_writer import write_datum_lmdb
from caffeonnx.errors import CaffeOnnxError
from caffeonnx.proto import caffe_pb2
from caffeonnx.runtime.encoder import KEY_ENCODER, extract_encoder
from tests.helpers import assert_close, convert_text, rng, run

SIZES = (784, 1000, 500, 250, 30)
LENET_SCALE = 0.00390625  # 1/256: Caffe's MNIST LeNet nets
BVLC_AE_SCALE = 0.0039215684  # ~1/255: BVLC's mnist_autoencoder.prototxt


def _inner_product(name: str, bottom: str, num_output: int) -> str:
    return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" '
            'param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 1 decay_mult: 0 } '
            f'inner_product_param {{ num_output: {num_output} weight_filler {{ type: "gaussian" std: 1 sparse: 15 }} '
            'bias_filler { type: "constant" value: 0 } } }\n')


def _sigmoid(name: str, bottom: str) -> str:
    return f'layer {{ name: "{name}" type: "Sigmoid" bottom: "{bottom}" top: "{name}" }}\n'


def mnist_autoencoder(train: Path, test: Path, scale: float) -> str:
    """BVLC's mnist_autoencoder.prototxt with its LMDB sources replaced."""
    text = 'name: "MNISTAutoencoder"\n'
    for rule, source in (("phase: TRAIN", train), ('phase: TEST stage: "test-on-train"', train),
                         ('phase: TEST stage: "test-on-test"', test)):
        text += (f'layer {{ name: "data" type: "Data" top: "data" include {{ {rule} }} '
                 f'transform_param {{ scale: {scale} }} '
                 f'data_param {{ source: "{source}" batch_size: 4 backend: LMDB }} }}\n')
    text += 'layer { name: "flatdata" type: "Flatten" bottom: "data" top: "flatdata" }\n'
    bottom = "data"
    for k, n in enumerate(SIZES[1:], 1):
        text += _inner_product(f"encode{k}", bottom, n)
        bottom = f"encode{k}"
        if k < 4:
            text += _sigmoid(f"encode{k}neuron", bottom)
            bottom = f"encode{k}neuron"
    for k in range(4, 0, -1):
        text += _inner_product(f"decode{k}", bottom, SIZES[k - 1])
        if k > 1:
            text += _sigmoid(f"decode{k}neuron", f"decode{k}")
            bottom = f"decode{k}neuron"
    text += ('layer { name: "loss" type: "SigmoidCrossEntropyLoss" bottom: "decode1" bottom: "flatdata" '
             'top: "cross_entropy_loss" loss_weight: 1 }\n')
    text += _sigmoid("decode1neuron", "decode1")
    text += ('layer { name: "loss" type: "EuclideanLoss" bottom: "decode1neuron" bottom: "flatdata" top: "l2_error" '
             'loss_weight: 0 }\n')
    return text


def convert_mnist_autoencoder(tmp: Path, scale: float, phase: int = caffe_pb2.TEST,
                              stages: tuple[str, ...] = ("test-on-test",)) -> tuple[ConvertedModel, np.ndarray]:
    """The net converted for `phase`/`stages` (filler weights, seeded) and the 8 test images (uint8) it reads."""
    g = rng(7)
    train, test = g.integers(0, 256, (2, 8, 28, 28), dtype=np.uint8)
    write_datum_lmdb(tmp / "mnist_train_lmdb", train, np.arange(8))
    write_datum_lmdb(tmp / "mnist_test_lmdb", test, np.arange(8))
    text = mnist_autoencoder(tmp / "mnist_train_lmdb", tmp / "mnist_test_lmdb", scale)
    net = upgrade_net(parse_prototxt(text, "mnist_autoencoder.prototxt"), "mnist_autoencoder.prototxt")
    converted = convert_net(net, None, ConvertOptions(phase=phase, stages=stages, seed=3), "mnist_autoencoder.prototxt")
    return converted, test


def numpy_encode4(converted: ConvertedModel, pixels: np.ndarray, scale: float) -> np.ndarray:
    """Caffe's forward to encode4 in float64: Data scales the pixels, InnerProduct flattens N×1×28×28."""
    h = pixels.reshape(len(pixels), -1).astype(np.float64) * scale
    for k in range(1, 5):
        w, b = (converted.weights[f"encode{k}.{p}"].astype(np.float64) for p in ("weight", "bias"))
        h = h @ w.T + b
        if k < 4:
            h = 1 / (1 + np.exp(-h))
    return h


@pytest.fixture(scope="module")
def mnist_ae(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ConvertedModel, np.ndarray]:
    """The BVLC autoencoder at scale 1/256 as an .onnx file (TEST, test-on-test), its weights and test images."""
    tmp = tmp_path_factory.mktemp("mnist_ae")
    converted, test = convert_mnist_autoencoder(tmp, LENET_SCALE)
    converted.save(tmp / "mnist_autoencoder.onnx")
    return tmp / "mnist_autoencoder.onnx", converted, test


@pytest.mark.parametrize("phase, stages, source", [
    (caffe_pb2.TEST, ("test-on-test",), "mnist_test_lmdb"),
    (caffe_pb2.TEST, ("test-on-train",), "mnist_train_lmdb"),
    (caffe_pb2.TRAIN, (), "mnist_train_lmdb"),
])
def test_bvlc_mnist_autoencoder_is_cut_at_encode4(tmp_path: Path, phase: int, stages: tuple[str, ...],
                                                  source: str) -> None:
    converted, _ = convert_mnist_autoencoder(tmp_path, BVLC_AE_SCALE, phase, stages)
    enc, choice = extract_encoder(converted.to_proto())
    assert (choice.input, choice.code, choice.width) == ("data", "encode4", 30), choice
    assert choice.reconstruction == "decode1neuron", "the flat N×784 reconstruction of the N×1×28×28 data"
    net = metadata.caffe_net_from(enc)
    assert net is not None
    assert [layer.name for layer in net.layer] == ["data", "encode1", "encode1neuron", "encode2", "encode2neuron",
                                                   "encode3", "encode3neuron", "encode4"]
    assert net.layer[0].data_param.source.endswith(source), "the Data layer of the converted phase/stage survives"
    assert net.layer[0].transform_param.scale == pytest.approx(BVLC_AE_SCALE)
    assert [r.index for r in metadata.layer_records(enc)] == list(range(8)), "positions renumbered after the cut"
    state = metadata.net_state(enc)
    assert state is not None and (state.phase, list(state.stage)) == (phase, list(stages))
    assert metadata.input_shapes(enc) == {"data": [4, 1, 28, 28]}
    assert json.loads(metadata.read_metadata(enc)[KEY_ENCODER])["dropped_layers"][:1] == ["flatdata"]


KINDS = {"lmdb": "LMDB", "hdf5": "HDF5", "hdf5-list": "HDF5 list of 1 file(s)", "images": "image list",
         "idx-gz": "array file"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_cli_encodes_caffe_inputs_at_the_recorded_scale(mnist_ae: tuple[Path, ConvertedModel, np.ndarray],
                                                        tmp_path: Path, kind: str) -> None:
    model, converted, test = mnist_ae
    runner = CliRunner()
    enc = tmp_path / "encoder.onnx"
    res = runner.invoke(app, ["encoder", str(model), "-o", str(enc)])
    assert res.exit_code == 0, res.output
    assert "code blob 'encode4' (30 values per sample; narrowest on the path to 'decode1neuron')" in res.output
    if kind == "lmdb":
        src = model.parent / "mnist_test_lmdb"
    elif kind.startswith("hdf5"):
        src = tmp_path / "test.h5"
        with h5py.File(src, "w") as h5:
            h5["data"] = test[:, None]
            h5["label"] = np.arange(8, dtype=np.float32)
        if kind == "hdf5-list":
            (tmp_path / "test.h5.txt").write_text(f"{src}\n")
            src = tmp_path / "test.h5.txt"
    elif kind == "idx-gz":  # MNIST's own t10k-images-idx3-ubyte.gz layout: N×28×28 uint8, big-endian dims
        src = tmp_path / "t10k-images-idx3-ubyte.gz"
        src.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", *test.shape) + test.tobytes()))
    else:
        lines = []
        for i, image in enumerate(test):
            Image.fromarray(image, mode="L").save(tmp_path / f"{i}.png")
            lines.append(f"{tmp_path / f'{i}.png'} {i}")
        src = tmp_path / "test.txt"
        src.write_text("\n".join(lines) + "\n")
    res = runner.invoke(app, ["encode", str(enc), str(src), "-o", str(tmp_path / "codes.npy"), "--batch-size", "3",
                              "--device", "cpu", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert f"read 8 samples from the {KINDS[kind]}; transform: scale 0.00390625 (transform_param of Data layer " \
           "'data')" in res.output
    assert "8 codes of shape [30] (inputs scaled by 0.00390625)" in res.output
    assert_close(np.load(tmp_path / "codes.npy"), numpy_encode4(converted, test, LENET_SCALE), f"encode4 from {kind}")


def test_scale_option_replaces_the_recorded_scale(mnist_ae: tuple[Path, ConvertedModel, np.ndarray],
                                                  tmp_path: Path) -> None:
    model, converted, test = mnist_ae
    enc = tmp_path / "encoder.onnx"
    assert CliRunner().invoke(app, ["encoder", str(model), "-o", str(enc)]).exit_code == 0
    res = CliRunner().invoke(app, ["encode", str(enc), str(model.parent / "mnist_test_lmdb"), "-o",
                                   str(tmp_path / "codes.npy"), "--scale", str(1 / 255), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "transform: scale 0.0039215686 (--scale; transform_param of Data layer 'data')" in res.output
    codes = np.load(tmp_path / "codes.npy")
    assert_close(codes, numpy_encode4(converted, test, 1 / 255), "encode4 at --scale 1/255")
    assert np.abs(codes - numpy_encode4(converted, test, LENET_SCALE)).max() > 1e-3, "the scale must matter"


def test_repeated_layer_name_as_code_is_refused_with_positions(
        mnist_ae: tuple[Path, ConvertedModel, np.ndarray]) -> None:
    _, converted, _ = mnist_ae
    model = converted.to_proto()
    with pytest.raises(CaffeOnnxError, match=(
            r"--code 'loss' is ambiguous \(Caffe allows repeated layer names\): it names layer 'loss' #19 of the "
            r"prototxt \(SigmoidCrossEntropyLoss, top 'cross_entropy_loss'\); layer 'loss' #21 of the prototxt "
            r"\(EuclideanLoss, top 'l2_error'\); pass the blob name")):
        extract_encoder(model, "loss")
    assert extract_encoder(model, "encode3neuron")[1].code == "encode3neuron"


CONV_AE = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 1 dim: 28 dim: 28 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 4 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "deconv1" type: "Deconvolution" bottom: "pool2" top: "deconv1"
  convolution_param { num_output: 4 kernel_size: 5 stride: 3 weight_filler { type: "xavier" } } }
layer { name: "relu3" type: "ReLU" bottom: "deconv1" top: "deconv1" }
layer { name: "deconv2" type: "Deconvolution" bottom: "deconv1" top: "deconv2"
  convolution_param { num_output: 1 kernel_size: 2 stride: 2 weight_filler { type: "xavier" } } }
layer { name: "recon" type: "Sigmoid" bottom: "deconv2" top: "recon" }
"""


@pytest.mark.parametrize("seed", [0, 1])
def test_conv_autoencoder_is_cut_at_its_pooled_code(seed: int) -> None:
    converted = convert_text(CONV_AE, seed=seed, all_blobs=True)
    enc, choice = extract_encoder(converted.to_proto())
    assert (choice.code, choice.width, choice.reconstruction) == ("pool2", 64, "recon"), choice
    assert [n.op_type for n in enc.graph.node if n.op_type in ("ConvTranspose", "Sigmoid")] == []
    x = rng(seed).random((3, 1, 28, 28), dtype=np.float32)
    want = run(converted, {"data": x})["pool2"]
    got = run(ConvertedModel(enc, {}), {"data": x})["pool2"]
    assert_close(got, want, "pool2 (4×4×4 code)")


TIED_WIDTHS = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 20 } } }
layer { name: "enc1" type: "InnerProduct" bottom: "data" top: "enc1" inner_product_param { num_output: 6 } }
layer { name: "enc1neuron" type: "Sigmoid" bottom: "enc1" top: "enc1neuron" }
layer { name: "dec0" type: "InnerProduct" bottom: "enc1neuron" top: "dec0" inner_product_param { num_output: 6 } }
layer { name: "dec1" type: "InnerProduct" bottom: "dec0" top: "dec1" inner_product_param { num_output: 20 } }
"""


def test_tied_code_candidates_are_refused_on_one_line(tmp_path: Path) -> None:
    model = tmp_path / "tie.onnx"
    convert_text(TIED_WIDTHS).save(model)
    proc = subprocess.run([sys.executable, "-m", "caffeonnx.cli", "encoder", str(model), "-o",
                           str(tmp_path / "e.onnx")], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: 2 blobs tie as the narrowest code (6 values per sample): 'enc1neuron' (from layer 'enc1neuron'), "
        "'dec0' (from layer 'dec0'); pass --code BLOB to choose one"], proc.stderr
    assert not (tmp_path / "e.onnx").exists()
    res = CliRunner().invoke(app, ["encoder", str(model), "-o", str(tmp_path / "e.onnx"), "--code", "dec0"])
    assert res.exit_code == 0 and "code blob 'dec0' (6 values per sample; named with --code)" in res.output, res.output
