"""PNG pictures: a valid PNG encoding, filter tiles, input/reconstruction pairs, loss curve, written beside snapshots."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from caffeonnx.trainer.build import build_module, load_solver, read_weights, train_net
from caffeonnx.trainer.graph_module import GraphModule
from caffeonnx.trainer.loop import Iteration
from caffeonnx.trainer.session import TrainOptions, run_training
from caffeonnx.trainer.visualize import first_layer_filters, image_shape, loss_curve, png_bytes, reconstructions
from tests.helpers import REFERENCE, rng


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
    assert filters is not None and filters.shape == (8 * 29 + 1, 8 * 29 + 1), "64 tiles of 28x28 in an 8x8 grid"
    w = module.parameter("encode1_matrix").detach().numpy()[0].reshape(28, 28)
    want = np.round((w - w.min()) / (w.max() - w.min()) * 255).astype(np.uint8)
    assert np.array_equal(filters[1:29, 1:29], want), "tile 0 is row 0 of the weight, min-max scaled"
    batch = {"data": np.load(REFERENCE / "train_tied_sgd" / "data.npz")["data"][0]}
    pairs = reconstructions(module, batch, count=4)
    assert pairs is not None and pairs.shape == (2 * 29 + 1, 4 * 29 + 1)
    top = np.round(np.clip(batch["data"][0].reshape(28, 28), 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(pairs[1:29, 1:29], top), "the top row shows the inputs"


def test_loss_curve_draws_both_series() -> None:
    its = [Iteration(i, 10.0 / (i + 1), 8.0 / (i + 1), 0.1) for i in range(30)]
    img = loss_curve(its)
    assert img is not None and img.shape == (300, 480)
    assert (img == 170).any() and (img[:-9, 9:] == 0).any(), "grey loss and black smoothed loss are drawn"
    assert loss_curve(its[:1]) is None


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
        decode_png(p.read_bytes())
