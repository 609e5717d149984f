"""Caffe Data layers read from LMDB: Datums in key order, Caffe's transform (crop, mirror, mean, scale), training."""
from __future__ import annotations

from pathlib import Path

import lmdb
import numpy as np
import pytest

from caffeonnx.converter.caffe_io import parse_prototxt
from caffeonnx.data.lmdb_source import DatumDB, first_datum_shape
from caffeonnx.errors import DataError, InputFileError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.data import LmdbSource
from caffeonnx.trainer.session import TrainOptions, run_training
from tests.helpers import rng

IMAGES = rng(0).integers(0, 256, size=(10, 1, 6, 6)).astype(np.uint8)


def make_lmdb(path: Path, images: np.ndarray = IMAGES, encoded: bool = False) -> Path:
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, img in enumerate(images):
            d = caffe_pb2.Datum(channels=img.shape[0], height=img.shape[1], width=img.shape[2], data=img.tobytes(),
                                label=i % 3, encoded=encoded)
            txn.put(f"{i:08d}".encode(), d.SerializeToString())
    env.close()
    return path


def data_layer(source: Path, transform: str) -> caffe_pb2.LayerParameter:
    text = (f'layer {{ name: "mnist" type: "Data" top: "data" top: "label" data_param {{ source: "{source}" '
            f'batch_size: 4 backend: LMDB }} transform_param {{ {transform} }} }}')
    return parse_prototxt(text, "<test>").layer[0]


def test_records_come_in_key_order_and_shapes_are_read(tmp_path: Path) -> None:
    db = DatumDB(make_lmdb(tmp_path / "db"))
    data, labels = db.read([0, 9, 10])
    assert np.array_equal(data, IMAGES[[0, 9, 0]]) and labels.tolist() == [0, 0, 0]
    assert first_datum_shape(tmp_path / "db") == (1, 6, 6)


def test_test_phase_centre_crop_mean_scale_and_wrap_around(tmp_path: Path) -> None:
    layer = data_layer(make_lmdb(tmp_path / "db"), "crop_size: 4 scale: 0.5 mean_value: 100")
    src = LmdbSource(layer, {"data": (4, 1, 4, 4), "label": (4,)}, train=False, seed=0)
    batch = src.batch(2)  # records 8, 9, 0, 1
    want = (IMAGES[[8, 9, 0, 1], :, 1:5, 1:5].astype(np.float32) - 100) * 0.5
    assert np.array_equal(batch["data"], want)
    assert batch["label"].tolist() == [2, 0, 0, 1]


def test_train_phase_random_crops_and_mirrors_are_valid_and_repeatable(tmp_path: Path) -> None:
    layer = data_layer(make_lmdb(tmp_path / "db"), "crop_size: 3 mirror: true")
    src = LmdbSource(layer, {"data": (4, 1, 3, 3), "label": (4,)}, train=True, seed=5)
    seen_flip = seen_plain = False
    for b in range(5):
        batch = src.batch(b)["data"]
        assert np.array_equal(batch, src.batch(b)["data"]), "batch k draws the same crops every time"
        for j, x in enumerate(batch):
            img = IMAGES[(b * 4 + j) % 10, 0].astype(np.float32)
            crops = [img[t:t + 3, s:s + 3] for t in range(4) for s in range(4)]
            plain = any(np.array_equal(x[0], c) for c in crops)
            flipped = any(np.array_equal(x[0], c[:, ::-1]) for c in crops)
            assert plain or flipped, f"batch {b} sample {j} is no crop of its image"
            seen_plain |= plain
            seen_flip |= flipped and not plain
    assert seen_flip and seen_plain, "mirror is a coin flip per sample"


def test_training_without_data_reads_the_data_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_lmdb(tmp_path / "train_lmdb")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.prototxt").write_text("""
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  data_param { source: "train_lmdb" batch_size: 4 backend: LMDB } transform_param { scale: 0.00390625 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 1 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "label" top: "loss" }
""")
    (tmp_path / "solver.prototxt").write_text('net: "net.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 5\n'
                                              "snapshot_after_train: false\n")
    said: list[str] = []
    result = run_training(TrainOptions(tmp_path / "solver.prototxt"), say=said.append)
    assert "reading train batches from Data layer 'mnist' ('train_lmdb')" in said
    labels = np.arange(4) % 3  # the first batch's labels
    first = float(np.square(labels).sum() / 4 / 2)  # the ip starts at zero: Caffe's loss is Σ label² / N / 2
    assert result.iterations[0].loss == pytest.approx(first, rel=1e-6)
    assert result.iterations[-1].loss < result.iterations[0].loss


def test_lmdb_errors(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="LMDB .*nowhere.* does not exist"):
        DatumDB(tmp_path / "nowhere")
    db = DatumDB(make_lmdb(tmp_path / "enc", encoded=True))
    with pytest.raises(DataError, match="JPEG/PNG-encoded"):
        db.read([0])
