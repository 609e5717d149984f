"""net_source: a net's own data layers read side by side, as Caffe's forward pass reads them."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import h5py
import lmdb
import numpy as np
import pytest
from PIL import Image

from caffeonnx.converter.caffe_io import parse_prototxt
from caffeonnx.converter.caffe_to_onnx import filter_layers
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.data.lmdb_writer import write_datum_lmdb
from caffeonnx.errors import DataError, LayerError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.data import net_source
from tests.helpers import convert_text, rng

IMAGES = rng(0).integers(0, 256, size=(10, 1, 6, 6)).astype(np.uint8)
TEST_IMAGES = rng(1).integers(0, 256, size=(6, 1, 6, 6)).astype(np.uint8)

# examples/mnist/lenet_train_test.prototxt's two "mnist" layers, plus an HDF5Data layer for a per-sample weight
LENET_DATA = """
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.00390625 } data_param { source: "mnist_train_lmdb" batch_size: 4 backend: LMDB } }
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { scale: 0.00390625 } data_param { source: "mnist_test_lmdb" batch_size: 3 backend: LMDB } }
layer { name: "weights" type: "HDF5Data" top: "weight" hdf5_data_param { source: "weights.txt" batch_size: 3 } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" inner_product_param { num_output: 10 } }
"""


def layers_of(text: str, phase: int) -> list[caffe_pb2.LayerParameter]:
    return filter_layers(parse_prototxt(text, "<test>"), ConvertOptions(phase=phase))


@pytest.fixture
def lenet_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_datum_lmdb(tmp_path / "mnist_train_lmdb", IMAGES, np.arange(10) % 7)
    write_datum_lmdb(tmp_path / "mnist_test_lmdb", TEST_IMAGES, np.arange(6))
    with h5py.File(tmp_path / "weights.h5", "w") as f:
        f["weight"] = np.arange(7, dtype=np.float64) * 10
    (tmp_path / "weights.txt").write_text("weights.h5\n")
    monkeypatch.chdir(tmp_path)  # Caffe opens sources relative to the working directory
    return tmp_path


def test_each_layer_reads_its_own_source_with_its_own_batch_size(lenet_dir: Path) -> None:
    src = net_source(layers_of(LENET_DATA, caffe_pb2.TRAIN), ["data", "label", "weight"], {}, train=True, seed=0)
    assert src.shapes == {"data": (4, 1, 6, 6), "label": (4,), "weight": (3,)}
    assert src.samples == {"data": 10, "label": 10, "weight": 7}
    for k in range(6):
        batch = src.batch(k)
        records = [(4 * k + i) % 10 for i in range(4)]  # each layer wraps mid-batch on its own
        rows = [(3 * k + i) % 7 for i in range(3)]
        assert np.array_equal(batch["data"], IMAGES[records].astype(np.float32) * np.float32(0.00390625))
        assert batch["label"].tolist() == [r % 7 for r in records]
        assert batch["weight"].tolist() == [10.0 * r for r in rows]


def test_the_test_phase_layer_of_the_same_name_reads_the_test_database(lenet_dir: Path) -> None:
    src = net_source(layers_of(LENET_DATA, caffe_pb2.TEST), ["data", "label"], {}, train=False, seed=0)
    batch = src.batch(3)  # records 9, 10, 11 of 6: 3, 4, 5
    assert np.array_equal(batch["data"], TEST_IMAGES[[3, 4, 5]].astype(np.float32) * np.float32(0.00390625))
    assert batch["label"].tolist() == [3.0, 4.0, 5.0]


def test_rand_skip_starts_at_a_seeded_record(lenet_dir: Path) -> None:
    text = LENET_DATA.replace("batch_size: 4 backend: LMDB", "batch_size: 4 backend: LMDB rand_skip: 8")
    layers = layers_of(text, caffe_pb2.TRAIN)
    starts = set()
    for seed in range(6):
        labels = net_source(layers, ["label"], {}, train=True, seed=seed).batch(0)["label"]
        start = next(s for s in range(8) if labels.tolist() == [((s + i) % 10) % 7 for i in range(4)])
        starts.add(start)
        assert np.array_equal(net_source(layers, ["label"], {}, train=True, seed=seed).batch(0)["label"], labels)
    assert len(starts) > 1, "the skip is drawn from [0, rand_skip)"


def test_dummy_data_refills_random_tops_and_keeps_constant_ones() -> None:
    text = """layer { name: "dummy" type: "DummyData" top: "x" top: "ones" top: "y"
      dummy_data_param { shape { dim: 64 dim: 8 } shape { dim: 2 dim: 3 } shape { dim: 4 }
        data_filler { type: "gaussian" mean: 1 std: 0.5 } data_filler { type: "constant" value: 1 }
        data_filler { type: "uniform" min: -2 max: -1 } } }"""
    src = net_source(layers_of(text, caffe_pb2.TRAIN), ["x", "ones", "y"], {}, train=True, seed=4)
    first, second = src.batch(0), src.batch(1)
    assert np.array_equal(first["ones"], np.ones((2, 3), np.float32)) and np.array_equal(second["ones"], first["ones"])
    assert not np.array_equal(first["x"], second["x"]), "non-constant fillers refill every forward"
    assert np.array_equal(src.batch(1)["x"], second["x"]), "batch k is a pure function of k"
    assert abs(first["x"].mean() - 1) < 0.1 and abs(first["x"].std() - 0.5) < 0.1
    assert first["y"].shape == (4,) and ((first["y"] >= -2) & (first["y"] <= -1)).all()
    legacy = """layer { name: "dummy" type: "DummyData" top: "a" top: "b"
      dummy_data_param { num: 2 channels: 3 channels: 1 height: 4 width: 5 } }"""
    batch = net_source(layers_of(legacy, caffe_pb2.TRAIN), ["a", "b"], {}, train=True, seed=0).batch(0)
    assert batch["a"].shape == (2, 3, 4, 5) and batch["b"].shape == (2, 1, 4, 5) and not batch["a"].any()
    bad = legacy.replace("num: 2", "num: 2 num: 2 num: 2")
    with pytest.raises(DataError, match=r"Must specify 'num' once, or once per top blob \(2\); specified 3."):
        net_source(layers_of(bad, caffe_pb2.TRAIN), ["a"], {}, train=True, seed=0)


@pytest.mark.parametrize(("layer", "message"), [
    ('type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } }',
     "from the caller; pass the samples with --data"),
    ('type: "MemoryData" top: "data" memory_data_param { batch_size: 2 channels: 1 height: 2 width: 2 }',
     r"layer 'src' \(MemoryData\) takes its blobs \['data'\] from the caller; pass the samples with --data"),
    ('type: "WindowData" top: "data" window_data_param { source: "w.txt" batch_size: 2 }',
     r"layer 'src' \(WindowData\) is not supported for training.*ImageData layer, or pass the samples with --data"),
])
def test_layers_without_a_readable_source_say_what_to_do(layer: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        net_source(layers_of(f'layer {{ name: "src" {layer} }}', caffe_pb2.TRAIN), ["data"], {}, True, 0)
    with pytest.raises(DataError, match=r"no data layer of the net produces \['other'\]"):
        net_source(layers_of(f'layer {{ name: "src" {layer} }}', caffe_pb2.TRAIN), ["other"], {}, True, 0)


def test_a_batch_that_does_not_fit_the_net_is_refused(lenet_dir: Path) -> None:
    with pytest.raises(DataError, match=r"layer 'mnist' \(Data\) gives 'data' batches of shape \[4, 1, 6, 6\] but "
                                        r"the net expects \[4, 1, 5, 5\]"):
        net_source(layers_of(LENET_DATA, caffe_pb2.TRAIN), ["data"], {"data": (4, 1, 5, 5)}, train=True, seed=0)


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def test_encoded_datums_decode_to_bgr_and_crop_each_at_its_centre(tmp_path: Path) -> None:
    """convert_imageset --encoded: PNG files in the Datum, of different sizes, with crop_size (no resize)."""
    images = [rng(2).integers(0, 256, size=(5, 6, 3)).astype(np.uint8),
              rng(3).integers(0, 256, size=(7, 4, 3)).astype(np.uint8)]
    env = lmdb.open(str(tmp_path / "enc"), map_size=1 << 22)
    with env.begin(write=True) as txn:
        for i, im in enumerate(images):
            txn.put(f"{i:08d}".encode(), caffe_pb2.Datum(data=png(im), encoded=True, label=i).SerializeToString())
    env.close()
    text = (f'layer {{ name: "data" type: "Data" top: "data" top: "label" transform_param {{ crop_size: 4 }} '
            f'data_param {{ source: "{tmp_path / "enc"}" batch_size: 2 backend: LMDB }} }}')
    batch = net_source(layers_of(text, caffe_pb2.TEST), ["data", "label"], {}, train=False, seed=0).batch(0)
    bgr = [im[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) for im in images]
    assert np.array_equal(batch["data"], np.stack([bgr[0][:, 0:4, 1:5], bgr[1][:, 1:5, 0:4]]))
    gray = text.replace("crop_size: 4", "crop_size: 4 force_gray: true")
    assert net_source(layers_of(gray, caffe_pb2.TEST), ["data"], {}, False, 0).shapes["data"] == (2, 1, 4, 4)
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in convert_text(gray).model.graph.input}
    assert shapes["data"][1:] == [1, 4, 4]


def write_leveldb(path: Path, images: np.ndarray) -> Path:
    """A LevelDB of Datums as convert_mnist_data --backend=leveldb writes one."""
    import plyvel

    db = plyvel.DB(str(path), create_if_missing=True)
    for i, im in enumerate(images):
        c, h, w = im.shape
        db.put(f"{i:08d}".encode(), caffe_pb2.Datum(channels=c, height=h, width=w, data=im.tobytes(),
                                                    label=i).SerializeToString())
    db.close()
    return path


def test_leveldb_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("plyvel")
    source = write_leveldb(tmp_path / "mnist_leveldb", IMAGES)
    text = (f'layer {{ name: "mnist" type: "Data" top: "data" top: "label" transform_param {{ scale: 0.5 }} '
            f'data_param {{ source: "{source}" batch_size: 4 backend: LEVELDB }} }}')
    batch = net_source(layers_of(text, caffe_pb2.TRAIN), ["data", "label"], {}, True, 0).batch(2)
    assert np.array_equal(batch["data"], IMAGES[[8, 9, 0, 1]].astype(np.float32) * 0.5)
    assert batch["label"].tolist() == [8, 9, 0, 1]
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in convert_text(text).model.graph.input}
    assert shapes["data"][1:] == [1, 6, 6]
    monkeypatch.setitem(sys.modules, "plyvel", None)  # as if the extra were not installed
    with pytest.raises(DataError, match=r"LEVELDB database, which needs the plyvel package: "
                                        r"pip install caffeonnx\[leveldb\]"):
        net_source(layers_of(text.replace("mnist_leveldb", "other_leveldb"), caffe_pb2.TRAIN), ["data"], {}, True, 0)


def test_converter_image_data_and_window_data(tmp_path: Path) -> None:
    Image.fromarray(rng(4).integers(0, 256, size=(9, 11, 3)).astype(np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "list.txt").write_text("a.png 1\n")
    text = (f'layer {{ name: "data" type: "ImageData" top: "data" top: "label" transform_param {{ crop_size: 0 }} '
            f'image_data_param {{ source: "{tmp_path / "list.txt"}" root_folder: "{tmp_path}/" batch_size: 5 }} }}')

    def dims(net: str) -> dict[str, list[int]]:
        return {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim][1:] for i in
                convert_text(net).model.graph.input}

    assert dims(text) == {"data": [3, 9, 11], "label": []}
    assert dims(text.replace("batch_size: 5", "batch_size: 5 new_height: 32 new_width: 40 is_color: false")
                .replace("crop_size: 0", "crop_size: 28"))["data"] == [1, 28, 28]
    # R-CNN's window_file_2007 nets (models/bvlc_reference_rcnn_ilsvrc13 era): windows warped to crop_size
    window = ('layer { name: "win" type: "WindowData" top: "data" top: "label" transform_param { mirror: true '
              'crop_size: 227 mean_file: "imagenet_mean.binaryproto" } window_data_param { source: '
              '"window_file_2007_trainval.txt" batch_size: 128 fg_threshold: 0.5 bg_threshold: 0.5 fg_fraction: 0.25 '
              'context_pad: 16 crop_mode: "warp" } }')
    assert dims(window) == {"data": [3, 227, 227], "label": []}
    assert dims(window.replace("crop_size: 227 ", "").replace("batch_size: 128", "batch_size: 128 crop_size: 99")) \
        == {"data": [3, 99, 99], "label": []}
    with pytest.raises(LayerError, match=r"WindowData needs transform_param \{ crop_size \} > 0"):
        convert_text(window.replace("crop_size: 227 ", ""))


def test_in_place_layers_do_not_count_as_sources_but_two_data_layers_do(lenet_dir: Path) -> None:
    in_place = LENET_DATA + 'layer { name: "shift" type: "Power" bottom: "data" top: "data" power_param { shift: 1 } }'
    src = net_source(layers_of(in_place, caffe_pb2.TRAIN), ["data"], {}, train=True, seed=0)
    assert src.shapes == {"data": (4, 1, 6, 6)}
    twice = LENET_DATA.replace("include { phase: TEST }", "")
    with pytest.raises(DataError, match="blob 'data' is produced by both layer 'mnist' and layer 'mnist'"):
        net_source(layers_of(twice, caffe_pb2.TRAIN), ["data"], {}, train=True, seed=0)
