"""`encode` reads what Caffe's data layers read and transforms it as the model's data layer records.

Small nets (data layer -> InnerProduct) keep each case fast; each expectation is a numpy reference of
Caffe's DataTransformer in the TEST phase ((x − mean) over the centre crop, times scale), or for
ImageData the batch `caffeonnx train`'s own source feeds.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image

from caffeonnx.data.image_source import ImageDataSource
from caffeonnx.data.lmdb_writer import write_datum_lmdb
from caffeonnx.errors import CaffeOnnxError, InputFileError
from caffeonnx.proto import caffe_pb2
from caffeonnx.runtime.encode import encode_file, model_transform
from caffeonnx.runtime.encoder import extract_encoder, save_model
from caffeonnx.runtime.inputs import open_inputs
from caffeonnx.runtime.session import EncoderSession, SessionConfig
from tests.helpers import assert_close, convert_text, rng

MEAN = (10.0, 20.0, 30.0)  # per channel, in the Datum's (BGR) channel order


def _data_net(source: Path, transform: str) -> str:
    return (f'layer {{ name: "data" type: "Data" top: "data" top: "label" transform_param {{ {transform} }} '
            f'data_param {{ source: "{source}" batch_size: 2 backend: LMDB }} }}\n'
            'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
            'inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } '
            'bias_filler { type: "gaussian" std: 0.1 } } }\n'
            'layer { name: "silence" type: "Silence" bottom: "label" }\n')


def _model(tmp: Path, images: np.ndarray, transform: str, seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    """An LMDB of `images` (N, C, H, W) uint8 and the Data -> InnerProduct net reading it, cut at "ip" (which
    drops the label input) so that the transform is read from an encoder's metadata."""
    write_datum_lmdb(tmp / "lmdb", images, np.arange(len(images)))
    converted = convert_text(_data_net(tmp / "lmdb", transform), seed=seed)
    save_model(extract_encoder(converted.to_proto(), "ip")[0], tmp / "net.onnx")
    return tmp / "net.onnx", converted.weights


def _encode(model: Path, src: Path, out: Path) -> np.ndarray:
    """encode_file as the API gives it: the transform is read from the model file's metadata."""
    encode_file(EncoderSession(model, SessionConfig(device="cpu", intra_threads=1, warmup=())), src, out, 3)
    return np.load(out)


def _reference(images: np.ndarray, weights: dict[str, np.ndarray], mean: np.ndarray, crop: int,
               scale: float) -> np.ndarray:
    """Caffe's TEST-phase transform then the InnerProduct, in float64."""
    h, w = images.shape[-2:]
    top, left = (h - crop) // 2, (w - crop) // 2
    x = ((images.astype(np.float64) - mean)[..., top:top + crop, left:left + crop] * scale).reshape(len(images), -1)
    return x @ weights["ip.weight"].astype(np.float64).T + weights["ip.bias"]


@pytest.mark.parametrize("seed", [0, 1])
def test_lmdb_array_and_colour_images_get_mean_crop_and_scale(tmp_path: Path, seed: int) -> None:
    images = rng(seed).integers(0, 256, (7, 3, 6, 6), dtype=np.uint8)
    transform = "scale: 0.5 crop_size: 4 " + " ".join(f"mean_value: {m}" for m in MEAN)
    model, weights = _model(tmp_path, images, transform, seed)
    want = _reference(images, weights, np.asarray(MEAN).reshape(3, 1, 1), 4, 0.5)
    np.save(tmp_path / "images.npy", images)
    lines = []
    for i, chw in enumerate(images):  # Caffe's Datums hold BGR (OpenCV): a PNG holds RGB
        Image.fromarray(np.ascontiguousarray(chw[::-1].transpose(1, 2, 0)), mode="RGB").save(tmp_path / f"{i}.png")
        lines.append(f"{tmp_path / f'{i}.png'} {i}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    for src in ("lmdb", "images.npy", "list.txt"):
        got = _encode(model, tmp_path / src, tmp_path / "codes.npy")
        assert_close(got, want, f"ip from {src} (mean_value, centre crop 4 of 6, scale 0.5)")


def test_mean_file_is_subtracted_pixel_by_pixel_before_the_crop(tmp_path: Path) -> None:
    images = rng(2).integers(0, 256, (4, 1, 5, 5), dtype=np.uint8)
    mean = rng(3).random((1, 1, 5, 5)).astype(np.float32) * 100
    blob = caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=list(mean.shape)), data=mean.ravel().tolist())
    (tmp_path / "mean.binaryproto").write_bytes(blob.SerializeToString())
    model, weights = _model(tmp_path, images, f'scale: 0.25 crop_size: 3 mean_file: "{tmp_path / "mean.binaryproto"}"')
    got = _encode(model, tmp_path / "lmdb", tmp_path / "codes.npy")
    assert_close(got, _reference(images, weights, mean[0], 3, 0.25), "ip with mean_file, crop 3 of 5, scale 0.25")


def test_the_data_mdb_file_itself_and_a_leveldb_are_databases_too(tmp_path: Path) -> None:
    plyvel = pytest.importorskip("plyvel")
    images = rng(4).integers(0, 256, (3, 1, 4, 4), dtype=np.uint8)
    model, weights = _model(tmp_path, images, "scale: 0.00390625")
    want = _reference(images, weights, np.zeros(1), 4, 0.00390625)
    shutil.copy(tmp_path / "lmdb" / "data.mdb", tmp_path / "copy.mdb")
    assert_close(_encode(model, tmp_path / "copy.mdb", tmp_path / "codes.npy"), want, "ip from a bare data.mdb")
    db = plyvel.DB(str(tmp_path / "leveldb"), create_if_missing=True)  # Caffe's older backend, same records
    for i, chw in enumerate(images):
        datum = caffe_pb2.Datum(channels=1, height=4, width=4, data=chw.tobytes())
        db.put(f"{i:08d}".encode(), datum.SerializeToString())
    db.close()
    assert_close(_encode(model, tmp_path / "leveldb", tmp_path / "codes.npy"), want, "ip from a LevelDB")


HDF5_NET = """
layer { name: "data" type: "HDF5Data" top: "data" hdf5_data_param { source: "train.txt" batch_size: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
"""


def test_hdf5_file_and_list_use_the_dataset_named_like_the_input_untransformed(tmp_path: Path) -> None:
    converted = convert_text(HDF5_NET, input_shapes={"data": (2, 6)})
    converted.save(tmp_path / "net.onnx")
    parts = [rng(k).random((n, 6)).astype(np.float32) for k, n in ((5, 4), (6, 3))]
    for k, part in enumerate(parts):
        with h5py.File(tmp_path / f"{k}.h5", "w") as h5:
            h5["label"] = np.zeros(len(part), np.float32)
            h5["data"] = part
    (tmp_path / "list.txt").write_text(f"{tmp_path / '0.h5'}\n{tmp_path / '1.h5'}\n")
    w, b = converted.weights["ip.weight"], converted.weights["ip.bias"]
    assert model_transform(tmp_path / "net.onnx", "data")[0].describe() == (
        "scale 1 (HDF5Data layer 'data': Caffe's HDF5Data applies no transform)")
    got = _encode(tmp_path / "net.onnx", tmp_path / "0.h5", tmp_path / "codes.npy")
    assert_close(got, parts[0] @ w.T + b, "ip from one HDF5 file (HDF5Data: no transform)")
    got = _encode(tmp_path / "net.onnx", tmp_path / "list.txt", tmp_path / "codes.npy")
    assert_close(got, np.concatenate(parts) @ w.T + b, "ip from an HDF5Data list of two files")


def test_hdf5_without_a_matching_dataset_asks_for_key(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "x.h5", "w") as h5:
        h5["a"] = np.zeros((2, 6), np.float32)
        h5["b"] = np.ones((2, 6), np.float32)
    with pytest.raises(InputFileError, match=r"holds datasets \['a', 'b'\] and none is named like the model's input "
                                             r"'data'; choose one with --key NAME"):
        with open_inputs(tmp_path / "x.h5", blob="data"):
            pass
    with open_inputs(tmp_path / "x.h5", "b", blob="data") as opened:
        assert opened.kind == "HDF5" and float(np.asarray(opened.samples[0:2]).sum()) == 12


@pytest.mark.parametrize("make, message", [
    (lambda p: (p / "list.txt").write_text(f"{p / 'missing.png'} 0\n") and p / "list.txt",
     r"list.txt line 1: Could not load .*missing.png.*check the list file and root_folder"),
    (lambda p: (p / "list.txt").write_text(f"{p / 'a.png'}\n") and p / "list.txt",
     r"line 1: .*a.png' is not 'path label'"),
    (lambda p: p, r"is a directory without data.mdb \(LMDB\) or CURRENT \(LevelDB\)"),
    (lambda p: (p / "junk.bin").write_bytes(b"\xff\xfe\x00garbage") and p / "junk.bin",
     r"junk.bin: not an .npy, .npz, IDX, HDF5 or LMDB file, nor a text list"),
])
def test_bad_caffe_inputs_are_user_errors(tmp_path: Path, make, message: str) -> None:
    """Caffe's own wording where `caffeonnx train` reads the same files (caffeonnx/data), one line each."""
    with pytest.raises(CaffeOnnxError, match=message):
        with open_inputs(make(tmp_path)):
            pass


INPUT_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 784 } }
  transform_param { scale: 0.00390625 } }
layer { name: "code" type: "InnerProduct" bottom: "data" top: "code"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.05 } } }
"""


def test_input_layer_transform_param_is_honoured_as_train_applies_it(tmp_path: Path) -> None:
    """`caffeonnx train` scales an Input blob by its transform_param (docs/guide.md trains so at 1/256)."""
    converted = convert_text(INPUT_NET, seed=5)
    converted.save(tmp_path / "net.onnx")
    pixels = rng(6).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "pixels.npy", pixels)
    got = _encode(tmp_path / "net.onnx", tmp_path / "pixels.npy", tmp_path / "codes.npy")
    x = pixels.reshape(5, -1) * 0.00390625
    assert_close(got, x @ converted.weights["code.weight"].T + converted.weights["code.bias"], "code at 1/256")
    assert model_transform(tmp_path / "net.onnx", "data")[0].describe() == (
        "scale 0.00390625 (transform_param of Input layer 'data')")


def test_encoded_png_datums_are_decoded_as_caffe_does(tmp_path: Path) -> None:
    """convert_imageset --encoded stores PNG bytes in each Datum; the Data layer decodes them."""
    import io

    import lmdb

    pixels = rng(8).integers(0, 256, (5, 1, 6, 6), dtype=np.uint8)
    env = lmdb.open(str(tmp_path / "lmdb"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        for i, image in enumerate(pixels):
            png = io.BytesIO()
            Image.fromarray(image[0], mode="L").save(png, format="PNG")
            datum = caffe_pb2.Datum(channels=1, height=6, width=6, data=png.getvalue(), encoded=True, label=i)
            txn.put(f"{i:08d}".encode(), datum.SerializeToString())
    env.close()
    converted = convert_text(_data_net(tmp_path / "lmdb", "scale: 0.00390625"), seed=9)
    save_model(extract_encoder(converted.to_proto(), "ip")[0], tmp_path / "net.onnx")
    got = _encode(tmp_path / "net.onnx", tmp_path / "lmdb", tmp_path / "codes.npy")
    want = _reference(pixels, converted.weights, np.zeros(1), 6, 0.00390625)
    assert_close(got, want, "ip from PNG-encoded Datums")


def test_imagedata_model_decodes_its_list_as_train_feeds_it(tmp_path: Path) -> None:
    """An ImageData net's own settings (root_folder, is_color: false, new_height/new_width, crop, scale) apply;
    the codes equal the InnerProduct of the very batch `caffeonnx train`'s ImageData source produces."""
    g = rng(10)
    (tmp_path / "img").mkdir()
    for i in range(4):
        rgb = g.integers(0, 256, (9, 7, 3), dtype=np.uint8)
        Image.fromarray(rgb, mode="RGB").save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "list.txt").write_text("".join(f"{i}.png {i}\n" for i in range(4)))
    text = (f'layer {{ name: "data" type: "ImageData" top: "data" top: "label" transform_param {{ scale: 0.02 '
            f'crop_size: 5 mean_value: 100 }} image_data_param {{ source: "{tmp_path / "list.txt"}" batch_size: 4 '
            f'root_folder: "{tmp_path / "img"}/" is_color: false new_height: 6 new_width: 8 }} }}\n'
            'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
            'inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }\n')
    converted = convert_text(text, seed=11)
    save_model(extract_encoder(converted.to_proto(), "ip")[0], tmp_path / "net.onnx")
    layer = text_format.Parse(text, caffe_pb2.NetParameter()).layer[0]
    fed = ImageDataSource(layer, train=False, seed=0, salt=0).batch(0)["data"]
    assert fed.shape == (4, 1, 5, 5)
    got = _encode(tmp_path / "net.onnx", tmp_path / "list.txt", tmp_path / "codes.npy")
    w, b = converted.weights["ip.weight"], converted.weights["ip.bias"]
    assert_close(got, fed.reshape(4, -1) @ w.T + b, "ip from the ImageData list, as train feeds it")
