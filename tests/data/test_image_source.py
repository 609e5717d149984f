"""Caffe's ImageData layer and OpenCV-style image decoding/resizing, with real PNG/JPEG files made by Pillow."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caffeonnx.converter.caffe_io import parse_prototxt
from caffeonnx.data.image_source import ImageDataSource, decode_image, read_image_list, resize_linear
from caffeonnx.errors import DataError, InputFileError
from caffeonnx.proto import caffe_pb2
from tests.helpers import rng


def encode(rgb: np.ndarray, fmt: str = "PNG") -> bytes:
    """An (H, W, 3|4) RGB(A) or (H, W) gray uint8 array as image file bytes."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_colour_png_decodes_to_bgr_and_gray_to_libpngs_weights() -> None:
    rgb = rng(0).integers(0, 256, size=(5, 7, 3)).astype(np.uint8)
    raw = encode(rgb)
    assert np.array_equal(decode_image(raw, True, "x"), rgb[:, :, ::-1].transpose(2, 0, 1)), "OpenCV's BGR order"
    assert np.array_equal(decode_image(raw, None, "x"), rgb[:, :, ::-1].transpose(2, 0, 1))
    r, g, b = (rgb[:, :, i].astype(np.int64) for i in range(3))
    want = np.where((r == g) & (g == b), r, (9797 * r + 19234 * g + 3737 * b) >> 15)  # png_set_rgb_to_gray
    assert np.array_equal(decode_image(raw, False, "x"), want[None])


def test_gray_images_replicate_for_colour_and_alpha_is_kept_only_unchanged() -> None:
    gray = rng(1).integers(0, 256, size=(4, 6)).astype(np.uint8)
    assert np.array_equal(decode_image(encode(gray), True, "x"), np.stack([gray] * 3))
    assert np.array_equal(decode_image(encode(gray), None, "x"), gray[None])
    rgba = rng(2).integers(0, 256, size=(3, 5, 4)).astype(np.uint8)
    assert np.array_equal(decode_image(encode(rgba), None, "x"), rgba[:, :, [2, 1, 0, 3]].transpose(2, 0, 1))
    assert np.array_equal(decode_image(encode(rgba), True, "x"), rgba[:, :, [2, 1, 0]].transpose(2, 0, 1))


def test_jpeg_gray_is_libjpegs_luma_channel() -> None:
    yy, xx = np.mgrid[0:16, 0:24]
    rgb = np.stack([xx * 10, yy * 15, (xx + yy) * 6], axis=-1).astype(np.uint8)
    raw = encode(rgb, "JPEG")
    colour = decode_image(raw, True, "x").astype(np.float64)
    gray = decode_image(raw, False, "x")[0].astype(np.float64)
    luma = 0.114 * colour[0] + 0.587 * colour[1] + 0.299 * colour[2]  # BGR planes
    assert gray.shape == (16, 24) and np.abs(gray - luma).max() <= 3  # chroma subsampling moves colour, not Y


def test_unreadable_bytes_are_a_data_error() -> None:
    with pytest.raises(DataError, match="where: not a readable image"):
        decode_image(b"not an image", True, "where")


def test_resize_is_opencvs_inter_linear() -> None:
    # [0, 255] to 4 columns: source x = (dx + 0.5) / 2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped)
    assert resize_linear(np.array([[[0, 255]]], np.uint8), 1, 4).tolist() == [[[0, 64, 191, 255]]]
    img = np.array([[[10, 200, 30], [90, 0, 255]]], np.uint8)
    # cv2.resize(img, (5, 3)) and (2, 1), INTER_LINEAR, OpenCV 5.1
    assert resize_linear(img, 3, 5).tolist() == [[[10, 86, 200, 98, 30], [50, 70, 100, 125, 143],
                                                  [90, 54, 0, 153, 255]]]
    assert resize_linear(img, 1, 2).tolist() == [[[63, 132]]]
    assert resize_linear(img, 2, 3) is img


def test_list_lines_split_at_the_last_space(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text("cats/my cat.png 3\r\ndog.jpg 0\n")
    entries = read_image_list(str(tmp_path / "list.txt"), "w")
    assert [(e.path, e.label, e.line) for e in entries] == [("cats/my cat.png", 3, 1), ("dog.jpg", 0, 2)]
    (tmp_path / "bad.txt").write_text("a.png 1\nb.png\n")
    with pytest.raises(DataError, match=r"bad.txt line 2: 'b.png' is not 'path label'"):
        read_image_list(str(tmp_path / "bad.txt"), "w")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="File is empty"):
        read_image_list(str(tmp_path / "empty.txt"), "w")
    with pytest.raises(InputFileError, match="image list .*nowhere.txt.* does not exist"):
        read_image_list(str(tmp_path / "nowhere.txt"), "w")


def image_folder(root: Path, n: int, size: tuple[int, int] = (6, 8)) -> list[np.ndarray]:
    """`n` RGB PNGs img<i>.png under `root` and a list file "list.txt" naming them with label i % 3."""
    root.mkdir(parents=True, exist_ok=True)
    images = [rng(10 + i).integers(0, 256, size=(*size, 3)).astype(np.uint8) for i in range(n)]
    for i, im in enumerate(images):
        (root / f"img{i}.png").write_bytes(encode(im))
    (root / "list.txt").write_text("".join(f"img{i}.png {i % 3}\n" for i in range(n)))
    return images


def image_layer(root: Path, params: str, transform: str = "") -> caffe_pb2.LayerParameter:
    text = (f'layer {{ name: "data" type: "ImageData" top: "data" top: "label" transform_param {{ {transform} }} '
            f'image_data_param {{ source: "{root / "list.txt"}" root_folder: "{root}/" {params} }} }}')
    return parse_prototxt(text, "<test>").layer[0]


def test_batches_wrap_mid_batch_with_the_test_transform(tmp_path: Path) -> None:
    images = image_folder(tmp_path, 5)
    src = ImageDataSource(image_layer(tmp_path, "batch_size: 3", "crop_size: 4 mean_value: 104 mean_value: 117 "
                                      "mean_value: 123 scale: 0.5"), train=False, seed=0, salt=0)
    assert src.shapes == {"data": (3, 3, 4, 4), "label": (3,)} and src.samples == {"data": 5, "label": 5}
    batch = src.batch(1)  # lines 3, 4, 0
    bgr = [images[i][:, :, ::-1].transpose(2, 0, 1).astype(np.float32) for i in (3, 4, 0)]
    mean = np.array([104, 117, 123], np.float32).reshape(3, 1, 1)
    want = np.stack([(x[:, 1:5, 2:6] - mean) * np.float32(0.5) for x in bgr])  # centre: (6-4)/2, (8-4)/2
    assert np.array_equal(batch["data"], want)
    assert batch["label"].tolist() == [0.0, 1.0, 0.0] and batch["label"].dtype == np.float32


def test_resize_and_gray(tmp_path: Path) -> None:
    images = image_folder(tmp_path, 2)
    src = ImageDataSource(image_layer(tmp_path, "batch_size: 2 new_height: 3 new_width: 5 is_color: false"),
                          train=True, seed=0, salt=0)
    got = src.batch(0)["data"]
    assert got.shape == (2, 1, 3, 5)
    for x, im in zip(got, images):
        gray = decode_image(encode(im), False, "x")
        assert np.array_equal(x, resize_linear(gray, 3, 5).astype(np.float32))


def test_shuffle_permutes_each_epoch_and_rand_skip_starts_later(tmp_path: Path) -> None:
    image_folder(tmp_path, 6)
    layer = image_layer(tmp_path, "batch_size: 4 shuffle: true")
    src = ImageDataSource(layer, train=True, seed=3, salt=0)
    order = np.concatenate([src.indices(k) for k in range(6)])  # 24 items = 4 epochs of 6
    epochs = order.reshape(4, 6)
    assert all(sorted(e) == list(range(6)) for e in epochs), "every epoch reads each line once"
    assert len({tuple(e) for e in epochs}) > 1, "a fresh permutation after each wrap"
    again = ImageDataSource(layer, train=True, seed=3, salt=0)
    assert np.array_equal(again.indices(5), src.indices(5)), "batch k is a pure function of k"
    skipping = ImageDataSource(image_layer(tmp_path, "batch_size: 4 rand_skip: 5"), train=True, seed=1, salt=0)
    assert 0 <= skipping.skip < 5
    assert skipping.indices(0).tolist() == [(skipping.skip + i) % 6 for i in range(4)]


def test_missing_image_names_the_line(tmp_path: Path) -> None:
    image_folder(tmp_path, 2)
    (tmp_path / "list.txt").write_text("img0.png 0\nmissing.png 1\n")
    src = ImageDataSource(image_layer(tmp_path, "batch_size: 1"), train=True, seed=0, salt=0)
    with pytest.raises(DataError, match=r"layer 'data' \(ImageData\): .*list.txt line 2: Could not load "
                                        r"'.*missing.png'"):
        src.batch(1)


@pytest.mark.parametrize(("params", "message"), [
    ("batch_size: 2 new_height: 4", "requires new_height and new_width to be set at the same time"),
    ("batch_size: 0", "Positive batch size required"),
])
def test_image_data_refusals(tmp_path: Path, params: str, message: str) -> None:
    image_folder(tmp_path, 1)
    with pytest.raises(DataError, match=message):
        ImageDataSource(image_layer(tmp_path, params), train=True, seed=0, salt=0)
