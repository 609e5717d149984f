"""Caffe's HDF5Data layer on real .h5 files: order across files, wrap-around, shuffle, refusals, the converter."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from caffeonnx.converter.caffe_io import parse_prototxt
from caffeonnx.data.hdf5_source import Hdf5Source
from caffeonnx.errors import DataError, InputFileError, LayerError
from caffeonnx.proto import caffe_pb2
from tests.helpers import convert_text, rng


def write_h5(path: Path, rows: int, start: int) -> Path:
    """examples/hdf5_classification style: float64 data (rows, 4) and integer labels; row i holds start + i."""
    with h5py.File(path, "w") as f:
        f["data"] = (start + np.arange(rows, dtype=np.float64))[:, None] + rng(start).uniform(0, 0.1, (rows, 4))
        f["label"] = (start + np.arange(rows)).astype(np.int32)
    return path


def two_files(d: Path) -> Path:
    """train.txt listing a.h5 (rows 0..4) and b.h5 (rows 100..102)."""
    write_h5(d / "a.h5", 5, 0)
    write_h5(d / "b.h5", 3, 100)
    (d / "train.txt").write_text(f"{d / 'a.h5'}\n{d / 'b.h5'}\n")
    return d / "train.txt"


def hdf5_layer(source: Path, params: str = "batch_size: 3", extra: str = "") -> caffe_pb2.LayerParameter:
    text = (f'layer {{ name: "data" type: "HDF5Data" top: "data" top: "label" {extra} '
            f'hdf5_data_param {{ source: "{source}" {params} }} }}')
    return parse_prototxt(text, "<test>").layer[0]


def test_rows_run_across_the_files_and_wrap(tmp_path: Path) -> None:
    src = Hdf5Source(hdf5_layer(two_files(tmp_path)), seed=0, salt=0)
    assert src.shapes == {"data": (3, 4), "label": (3,)} and src.samples == {"data": 8, "label": 8}
    order = [0, 1, 2, 3, 4, 100, 101, 102]  # a.h5's rows, then b.h5's
    for k in range(5):
        want = [order[(3 * k + i) % 8] for i in range(3)]
        batch = src.batch(k)
        assert batch["label"].tolist() == want and batch["label"].dtype == np.float32
        assert np.array_equal(np.floor(batch["data"][:, 0]), want) and batch["data"].dtype == np.float32
    with h5py.File(tmp_path / "b.h5") as f:
        assert np.array_equal(src.batch(1)["data"][2], f["data"][0].astype(np.float32)), "doubles read as float32"


def test_shuffle_permutes_files_and_rows_per_epoch(tmp_path: Path) -> None:
    layer = hdf5_layer(two_files(tmp_path), "batch_size: 4 shuffle: true")
    src = Hdf5Source(layer, seed=1, salt=0)
    labels = np.concatenate([src.batch(k)["label"] for k in range(20)]).reshape(10, 8)  # 10 epochs of 8 rows
    for epoch in labels:
        assert sorted(epoch) == [0, 1, 2, 3, 4, 100, 101, 102]
        in_b = epoch >= 100
        assert in_b[:3].all() or in_b[-3:].all(), "one file's rows stay together, as Caffe loads one file at a time"
    assert len({tuple(e) for e in labels}) > 5, "files and rows are reshuffled every epoch"
    assert np.array_equal(Hdf5Source(layer, seed=1, salt=0).batch(13)["label"], src.batch(13)["label"])


def test_hdf5_refusals(tmp_path: Path) -> None:
    source = two_files(tmp_path)
    with pytest.raises(DataError, match=r"HDF5Data does not transform data"):
        Hdf5Source(hdf5_layer(source, extra="transform_param { scale: 0.5 }"), seed=0, salt=0)
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f["data"] = np.zeros((2, 4))
    (tmp_path / "c.txt").write_text(f"{tmp_path / 'c.h5'}\n")
    with pytest.raises(DataError, match=r"Failed to find HDF5 dataset 'label' in '.*c.h5'"):
        Hdf5Source(hdf5_layer(tmp_path / "c.txt"), seed=0, salt=0)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["data"] = np.zeros((2, 5))
        f["label"] = np.zeros(2)
    (tmp_path / "d.txt").write_text(f"{tmp_path / 'a.h5'} {tmp_path / 'd.h5'}")
    with pytest.raises(DataError, match=r"'.*d.h5' has rows of shape"):
        Hdf5Source(hdf5_layer(tmp_path / "d.txt"), seed=0, salt=0)
    (tmp_path / "e.txt").write_text(f"{tmp_path / 'nowhere.h5'}\n")
    with pytest.raises(InputFileError, match=r"Failed opening HDF5 file: '.*nowhere.h5' does not exist"):
        Hdf5Source(hdf5_layer(tmp_path / "e.txt"), seed=0, salt=0)
    with pytest.raises(InputFileError, match="Failed to open source file"):
        Hdf5Source(hdf5_layer(tmp_path / "none.txt"), seed=0, salt=0)


def test_converter_reads_the_shapes_from_the_first_file(tmp_path: Path) -> None:
    source = two_files(tmp_path)
    net = (f'layer {{ name: "data" type: "HDF5Data" top: "data" top: "label" hdf5_data_param {{ source: "{source}" '
           'batch_size: 10 } }\nlayer { name: "fc1" type: "InnerProduct" bottom: "data" top: "fc1" '
           "inner_product_param { num_output: 2 } }")
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in convert_text(net).model.graph.input}
    assert shapes["data"][1:] == [4] and shapes["label"][1:] == []
    overridden = convert_text(net, input_shapes={"data": (10, 4), "label": (10,)}).model.graph.input
    assert [d.dim_value for d in overridden[0].type.tensor_type.shape.dim][1:] == [4]
    with pytest.raises(LayerError, match=r"cannot read the dataset shapes from source .*nowhere.txt.* "
                                         r"--input-shape data=N,\.\.\."):
        convert_text(net.replace(str(source), str(tmp_path / "nowhere.txt")))
