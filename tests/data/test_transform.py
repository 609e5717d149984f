"""Caffe's DataTransformer on whole batches, checked against data_transformer.cpp's rules written per sample."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from caffeonnx.data.transform import DataTransformer, read_mean_file
from caffeonnx.errors import DataError, InputFileError
from caffeonnx.proto import caffe_pb2
from tests.helpers import rng

TP = caffe_pb2.TransformationParameter


def write_mean(path: Path, mean: np.ndarray, legacy: bool = False) -> Path:
    """A binaryproto mean image as compute_image_mean writes it (legacy: num/channels/height/width fields)."""
    c, h, w = mean.shape
    blob = (caffe_pb2.BlobProto(num=1, channels=c, height=h, width=w) if legacy
            else caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[1, c, h, w])))
    blob.data.extend(mean.ravel().tolist())
    path.write_bytes(blob.SerializeToString())
    return path


def caffe_transform(datum: np.ndarray, crop: int, h_off: int, w_off: int, mirror: bool, mean: np.ndarray | None,
                    mean_values: list[float], scale: float) -> np.ndarray:
    """Transform(const Datum&, Dtype*) element by element: top_index from (c, h, w), data_index uncropped."""
    c_n, height, width = datum.shape
    oh, ow = (crop, crop) if crop else (height, width)
    values = mean_values * c_n if len(mean_values) == 1 else mean_values
    out = np.empty((c_n, oh, ow), dtype=np.float32)
    for c in range(c_n):
        for h in range(oh):
            for w in range(ow):
                element = np.float32(datum[c, h_off + h, w_off + w])
                if mean is not None:
                    v = (element - mean[c, h_off + h, w_off + w]) * np.float32(scale)
                elif values:
                    v = (element - np.float32(values[c])) * np.float32(scale)
                else:
                    v = element * np.float32(scale)
                out[c, h, ow - 1 - w if mirror else w] = v
    return out


@pytest.mark.parametrize("shape", [(3, 7, 8), (1, 6, 6), (2, 9, 5)])
def test_test_phase_centre_crop_subtracts_the_mean_at_the_uncropped_position(tmp_path: Path,
                                                                             shape: tuple[int, int, int]) -> None:
    batch = rng(1).integers(0, 256, size=(5, *shape)).astype(np.uint8)
    mean = rng(2).uniform(0, 255, size=shape).astype(np.float32)
    param = TP(crop_size=4, scale=0.017, mean_file=str(write_mean(tmp_path / "mean.binaryproto", mean)))
    got = DataTransformer(param, train=False, where="t")(batch, np.random.default_rng(0))
    _, h, w = shape
    h_off, w_off = (h - 4) // 2, (w - 4) // 2  # Caffe's integer division: (7-4)/2 = 1, (9-4)/2 = 2
    want = np.stack([caffe_transform(x, 4, h_off, w_off, False, mean, [], 0.017) for x in batch])
    assert got.dtype == np.float32 and got.shape == (5, shape[0], 4, 4)
    assert np.array_equal(got, want), f"max error {np.abs(got - want).max()}"


@pytest.mark.parametrize(("means", "scale"), [([104.0, 117.0, 123.0], 1.0), ([128.0], 0.0078125), ([], 0.00390625)])
def test_mean_values_one_or_per_channel_then_scale(means: list[float], scale: float) -> None:
    batch = rng(3).integers(0, 256, size=(4, 3, 5, 6)).astype(np.uint8)
    got = DataTransformer(TP(mean_value=means, scale=scale), train=True, where="t")(batch, np.random.default_rng(1))
    want = np.stack([caffe_transform(x, 0, 0, 0, False, None, means, scale) for x in batch])
    assert np.array_equal(got, want)


def test_float_data_is_transformed_like_bytes() -> None:
    batch = rng(4).normal(size=(3, 2, 4, 4)).astype(np.float32)
    got = DataTransformer(TP(crop_size=2, mean_value=[0.5, -1.0], scale=2.0), train=False, where="t")(
        batch, np.random.default_rng(0))
    want = np.stack([caffe_transform(x, 2, 1, 1, False, None, [0.5, -1.0], 2.0) for x in batch])
    assert np.array_equal(got, want)


def test_train_phase_draws_a_crop_and_a_coin_per_sample_and_repeats_them_for_the_same_seed(tmp_path: Path) -> None:
    batch = rng(5).integers(0, 256, size=(64, 3, 8, 7)).astype(np.uint8)
    mean = rng(6).uniform(0, 255, size=(3, 8, 7)).astype(np.float32)
    param = TP(crop_size=5, mirror=True, scale=0.5, mean_file=str(write_mean(tmp_path / "m.binaryproto", mean)))
    t = DataTransformer(param, train=True, where="t")
    got = t(batch, np.random.default_rng((7, 0)))
    assert np.array_equal(got, t(batch, np.random.default_rng((7, 0)))), "the same seed draws the same batch"
    assert not np.array_equal(got, t(batch, np.random.default_rng((7, 1)))), "another batch index draws anew"
    offsets, flips = set(), set()
    for x, y in zip(batch, got):
        matches = [(h, w, m) for h in range(4) for w in range(3) for m in (False, True)
                   if np.array_equal(y, caffe_transform(x, 5, h, w, m, mean, [], 0.5))]
        assert matches, "each sample is Caffe's transform at some offset, mirrored or not"
        offsets.add(matches[0][:2])
        flips.add(matches[0][2])
    assert len(offsets) > 6 and flips == {False, True}, "offsets are uniform in [0, H - crop], mirror a coin"


def test_test_phase_mirrors_at_random_as_caffe_does() -> None:
    """Caffe draws do_mirror = mirror && Rand(2) in both phases; only the crop is centred in TEST."""
    batch = rng(8).integers(0, 256, size=(32, 1, 6, 6)).astype(np.uint8)
    got = DataTransformer(TP(crop_size=4, mirror=True), train=False, where="t")(batch, np.random.default_rng(3))
    plain = [np.array_equal(y, caffe_transform(x, 4, 1, 1, False, None, [], 1.0)) for x, y in zip(batch, got)]
    flipped = [np.array_equal(y, caffe_transform(x, 4, 1, 1, True, None, [], 1.0)) for x, y in zip(batch, got)]
    assert all(p or f for p, f in zip(plain, flipped)) and any(plain) and any(flipped)


def test_images_of_different_sizes_are_cropped_each_at_its_own_centre() -> None:
    images = [rng(i).integers(0, 256, size=(3, h, w)).astype(np.uint8) for i, (h, w) in enumerate([(5, 5), (8, 6)])]
    got = DataTransformer(TP(crop_size=4, mean_value=[10]), train=False, where="t")(images, np.random.default_rng(0))
    want = [caffe_transform(images[0], 4, 0, 0, False, None, [10], 1.0),
            caffe_transform(images[1], 4, 2, 1, False, None, [10], 1.0)]
    assert np.array_equal(got, np.stack(want))


def test_mean_file_reads_legacy_blob_dims(tmp_path: Path) -> None:
    mean = rng(9).uniform(size=(3, 2, 4)).astype(np.float32)
    assert np.array_equal(read_mean_file(write_mean(tmp_path / "m", mean, legacy=True), "t"), mean)


@pytest.mark.parametrize(("param", "message"), [
    (TP(mean_value=[1, 2]), "Specify either 1 mean_value or as many as channels: 3"),
    (TP(crop_size=9), "crop_size 9 is larger than the 5x6"),
    (TP(mean_file="MEAN", mean_value=[1]), "Cannot specify mean_file and mean_value at the same time"),
    (TP(mean_file="MEAN"), r"mean_file is \[3, 4, 4\] \(C, H, W\) but the data is \[3, 5, 6\]"),
])
def test_caffe_refusals(tmp_path: Path, param: caffe_pb2.TransformationParameter, message: str) -> None:
    if param.mean_file:
        param.mean_file = str(write_mean(tmp_path / "mean.binaryproto", np.zeros((3, 4, 4), np.float32)))
    with pytest.raises(DataError, match=message):
        DataTransformer(param, train=True, where="layer 'data'")(np.zeros((2, 3, 5, 6), np.uint8),
                                                                 np.random.default_rng(0))


def test_missing_mean_file_and_both_forced_decodings_are_errors(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="mean_file .*nowhere.binaryproto.* does not exist"):
        DataTransformer(TP(mean_file=str(tmp_path / "nowhere.binaryproto")), train=True, where="t")
    with pytest.raises(DataError, match="cannot set both force_color and force_gray"):
        DataTransformer(TP(force_color=True, force_gray=True), train=True, where="t").decode_color()
