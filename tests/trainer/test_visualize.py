"""PNG pictures: a valid PNG encoding, filter tiles, input/reconstruction pairs, loss curve, written beside snapshots."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.build import build_module, load_solver, read_weights, train_net
from caffeonnx.trainer.graph_module import GraphModule
from caffeonnx.trainer.loop import Iteration
from caffeonnx.trainer.session import TrainOptions, run_training
from caffeonnx.trainer.visualize import (
    enlarge,
    first_layer_filters,
    image_shape,
    loss_chart,
    png_bytes,
    reconstructions,
)
from tests.helpers import REFERENCE, convert_text, rng


def decode_png(data: bytes) -> np.ndarray:
    """A minimal PNG reader for 8-bit greyscale/RGB images with filter type 0 rows."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, f"bad CRC in {kind!r}"
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    channels = 3 if color == 2 else 1
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = np.frombuffer(raw, np.uint8).reshape(h, 1 + w * channels)
    assert depth == 8 and (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape((h, w, 3) if channels == 3 else (h, w))


@pytest.mark.parametrize("shape", [(5, 7), (4, 6, 3)])
def test_png_round_trip(shape: tuple[int, ...]) -> None:
    img = rng(1).integers(0, 256, size=shape).astype(np.uint8)
    assert np.array_equal(decode_png(png_bytes(img)), img)


def test_image_shapes() -> None:
    assert image_shape((784,)) == (28, 28)
    assert image_shape((1, 28, 28)) == (28, 28)
    assert image_shape((3, 8, 9)) == (8, 9, 3)
    assert image_shape((20,)) is None and image_shape((64, 5, 5)) is None


def tied_module() -> GraphModule:
    """The reference tied autoencoder with its initial weights."""
    d = REFERENCE / "train_tied_sgd"
    param = load_solver(d / "solver.prototxt")
    return build_module(train_net(param, d / "solver.prototxt"), read_weights(d / "init.caffemodel"), seed=0)


def test_filters_and_reconstructions_of_the_tied_autoencoder() -> None:
    module = tied_module()
    filters = first_layer_filters(module)
    assert filters is not None and filters.shape == (8 * 57 + 1, 8 * 57 + 1), "64 tiles of 28x28 drawn 56x56, 8x8"
    w = module.parameter("encode1_matrix").detach().numpy()[0].reshape(28, 28)
    want = np.round((w - w.min()) / (w.max() - w.min()) * 255).astype(np.uint8)
    assert np.array_equal(filters[1:57, 1:57], want.repeat(2, 0).repeat(2, 1)), \
        "tile 0 is row 0 of the weight, min-max scaled, each value a 2x2 block"
    batch = {"data": np.load(REFERENCE / "train_tied_sgd" / "data.npz")["data"][0]}
    pairs = reconstructions(module, batch, count=4)
    assert pairs is not None and pairs.shape == (2 * 57 + 1, 4 * 57 + 1)
    top = np.round(np.clip(batch["data"][0].reshape(28, 28), 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(pairs[1:57, 1:57], enlarge(top)), "the top row shows the inputs"


@pytest.mark.parametrize(("side", "factor"), [(5, 7), (28, 2), (32, 1), (40, 1)])
def test_small_tiles_are_enlarged_to_at_least_32_pixels(side: int, factor: int) -> None:
    pic = rng(2).integers(0, 256, size=(side, side)).astype(np.uint8)
    big = enlarge(pic)
    assert big.shape == (side * factor, side * factor) and np.array_equal(big[::factor, ::factor], pic)


CONV_FLATTEN_AE = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 6 dim: 1 dim: 28 dim: 28 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "flatdata" type: "Flatten" bottom: "data" top: "flatdata" }
layer { name: "encode" type: "InnerProduct" bottom: "conv" top: "encode"
  inner_product_param { num_output: 16 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "decode" type: "InnerProduct" bottom: "encode" top: "decode"
  inner_product_param { num_output: 784 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SigmoidCrossEntropyLoss" bottom: "decode" bottom: "flatdata" top: "loss" }
"""


def test_conv_filters_and_flatten_layout_reconstructions() -> None:
    """Caffe's MNIST autoencoder layout: data N x 1 x 28 x 28, the loss against Flatten(data) (N x 784)."""
    converted = convert_text(CONV_FLATTEN_AE, phase=caffe_pb2.TRAIN)
    module = GraphModule(converted.model, converted.weights)
    filters = first_layer_filters(module)
    assert filters is not None and filters.shape == (2 * 36 + 1, 2 * 36 + 1), "4 kernels of 5x5 drawn 35x35, 2x2"
    k = module.parameter(module.records[1].params[0]).detach().numpy()[0, 0]
    want = np.round((k - k.min()) / (k.max() - k.min()) * 255).astype(np.uint8)
    assert np.array_equal(filters[1:36, 1:36], want.repeat(7, 0).repeat(7, 1))
    data = rng(3).random((6, 1, 28, 28)).astype(np.float32)
    pairs = reconstructions(module, {"data": data}, count=3)
    assert pairs is not None and pairs.shape == (2 * 57 + 1, 3 * 57 + 1), "3 inputs over 3 reconstructions"
    top = np.round(data[1, 0] * 255).astype(np.uint8)
    assert np.array_equal(pairs[1:57, 58:114], enlarge(top)), "input 1, from Flatten(data), in its 28x28 layout"
    with torch.no_grad():
        logits = module.eval()({"data": data}, ["decode"])["decode"].numpy()
    bottom = np.round(1 / (1 + np.exp(-logits[0].astype(np.float64))) * 255).reshape(28, 28).astype(np.uint8)
    assert np.abs(pairs[58:114, 1:57].astype(int) - enlarge(bottom)).max() <= 1, "sigmoid of the logits below"


def test_loss_chart_is_a_matplotlib_chart() -> None:
    its = [Iteration(i, 10.0 / (i + 1), 8.0 / (i + 1), 0.1) for i in range(30)]
    data = loss_chart(its, "training loss: s_iter_30")
    assert data is not None and data[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(io.BytesIO(data), format="png")
    assert img.shape[:2] == (400, 640), "6.4 x 4 inches at 100 dpi"
    rgb = img[..., :3]
    dark = (rgb.max(axis=-1) < 0.2).sum()
    grey = (np.abs(rgb - 0.65).max(axis=-1) < 0.05).sum()
    assert dark > 2000 and grey > 200, "axes, ticks, labels, title and the black smoothed curve; the grey loss curve"
    assert loss_chart(its[:1]) is None


def test_pictures_are_written_beside_snapshots(tmp_path: Path) -> None:
    d = REFERENCE / "train_tied_sgd"
    solver = tmp_path / "solver.prototxt"
    solver.write_text((d / "solver.prototxt").read_text().replace('net: "train.prototxt"', f'net: "{d / "train.prototxt"}"')
                      .replace("snapshot: 0", f'snapshot: 5\nsnapshot_prefix: "{tmp_path}/s"'))
    result = run_training(TrainOptions(solver, weights=d / "init.caffemodel", data=str(d / "data.npz"), max_iter=5),
                          say=lambda _: None)
    names = sorted(p.name for p in result.outputs)
    assert names == ["s_iter_5_filters.png", "s_iter_5_loss.png", "s_iter_5_recon.png"]
    for p in result.outputs:
        if p.name.endswith("_loss.png"):
            assert mpimg.imread(p).shape == (400, 640, 4)
        else:
            decode_png(p.read_bytes())
