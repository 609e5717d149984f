"""Caffe's DataTransformer (src/caffe/data_transformer.cpp), applied to a whole batch at once.

Per sample Caffe draws `do_mirror = mirror && Rand(2)` (in TRAIN *and* TEST: only the
crop offsets depend on the phase), crops `crop_size`×`crop_size` at random offsets in
[0, H − crop] (TRAIN) or at ((H − crop) / 2, (W − crop) / 2) with integer division (TEST),
then writes `(x − mean)·scale` in float, where the mean is the mean_file pixel at the
*uncropped, unmirrored* source position or mean_value[c].  The arithmetic here is the same
float32 arithmetic, so TEST batches (and TRAIN batches given the same draws) are exact.

The random draws of a batch come from the generator the caller passes, seeded with
(seed, layer, batch index) by the sources: batch k is a pure function of k, so a resumed
run sees the batches an uninterrupted one would.  They are not Caffe's RNG stream
(boost::mt19937 behind caffe_rng_rand), so TRAIN crops and flips are not bit-identical to
a Caffe run's — only distributed the same way.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from caffeonnx.converter.caffe_io import read_blob_file
from caffeonnx.errors import DataError, InputFileError
from caffeonnx.proto import caffe_pb2


def read_mean_file(path: str | Path, where: str) -> np.ndarray:
    """A binaryproto mean image (BlobProto, as compute_image_mean writes it) as a (C, H, W) float32 array."""
    values = read_blob_file(path, f"{where}: transform_param.mean_file")
    if values.ndim < 3:
        raise InputFileError(f"{where}: mean_file {str(path)!r} has shape {list(values.shape)}, not (1,) C, H, W")
    return values.reshape(values.shape[-3:])


class DataTransformer:
    """transform_param of one data layer: crop, mirror, mean (file or values) and scale, batched."""

    def __init__(self, param: caffe_pb2.TransformationParameter, train: bool, where: str) -> None:
        if param.HasField("mean_file") and len(param.mean_value):
            raise DataError(f"{where}: Cannot specify mean_file and mean_value at the same time")
        self.where = where
        self.train = train
        self.crop = int(param.crop_size)
        self.mirror = bool(param.mirror)
        self.scale = np.float32(param.scale)
        self.force_color = bool(param.force_color)
        self.force_gray = bool(param.force_gray)
        self.mean_image = read_mean_file(param.mean_file, where) if param.HasField("mean_file") else None
        self.mean_values = np.asarray(param.mean_value, dtype=np.float32)

    def decode_color(self) -> bool | None:
        """How an encoded Datum is decoded: True colour, False gray, None as stored (DecodeDatumToCVMatNative)."""
        if self.force_color and self.force_gray:
            raise DataError(f"{self.where}: cannot set both force_color and force_gray")
        return True if self.force_color else (False if self.force_gray else None)

    def output_shape(self, chw: Sequence[int]) -> tuple[int, int, int]:
        """InferBlobShape: the per-sample (C, H, W) after the crop, or Caffe's error if the image is too small."""
        c, h, w = (int(d) for d in chw)
        if self.crop and (h < self.crop or w < self.crop):
            raise DataError(f"{self.where}: crop_size {self.crop} is larger than the {h}x{w} (HxW) image")
        return (c, self.crop, self.crop) if self.crop else (c, h, w)

    def _check(self, c: int, h: int, w: int) -> None:
        if self.mean_image is not None and self.mean_image.shape != (c, h, w):
            raise DataError(f"{self.where}: mean_file is {list(self.mean_image.shape)} (C, H, W) but the data is "
                            f"{[c, h, w]}; Caffe needs the mean image to match the uncropped data")
        if self.mean_values.size not in (0, 1, c):
            raise DataError(f"{self.where}: Specify either 1 mean_value or as many as channels: {c}")

    def _draws(self, n: int, h: np.ndarray, w: np.ndarray, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per sample: mirror coin, row offset, column offset (Caffe's Rand(2), Rand(H − crop + 1), ...)."""
        flip = rng.integers(2, size=n).astype(bool) if self.mirror else np.zeros(n, dtype=bool)
        if not self.crop:
            return flip, np.zeros(n, dtype=np.intp), np.zeros(n, dtype=np.intp)
        if self.train:
            return flip, rng.integers(h - self.crop + 1), rng.integers(w - self.crop + 1)
        return flip, (h - self.crop) // 2, (w - self.crop) // 2

    def __call__(self, images: np.ndarray | Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        """Transformed float32 (N, C, h, w) batch of `images`: one (N, C, H, W) array, or (C, H, W) arrays of
        different sizes (allowed by Caffe only with crop_size)."""
        n = len(images)
        if isinstance(images, np.ndarray):
            sizes = np.broadcast_to(np.asarray(images.shape[1:], dtype=np.intp), (n, images.ndim - 1))
        else:
            sizes = np.asarray([im.shape for im in images], dtype=np.intp).reshape(n, -1)
        if sizes.shape[1] != 3:
            raise DataError(f"{self.where}: DataTransformer takes (C, H, W) images, got {sizes.shape[1]}-D samples")
        c = int(sizes[0, 0])
        if (sizes[:, 0] != c).any():
            raise DataError(f"{self.where}: the images of one batch have {sorted(set(sizes[:, 0].tolist()))} "
                            "channels; Caffe needs the same number")
        ragged = (sizes != sizes[0]).any()
        if ragged and not self.crop:
            raise DataError(f"{self.where}: the images of one batch have different sizes "
                            f"{sorted({tuple(s) for s in sizes.tolist()})}; Caffe needs one size per batch (or "
                            "crop_size, or new_height/new_width for ImageData)")
        for size in (sizes[:1] if not ragged else np.unique(sizes, axis=0)):
            self._check(*(int(d) for d in size))
            self.output_shape(size)
        flip, top, left = self._draws(n, sizes[:, 1], sizes[:, 2], rng)
        oh, ow = (self.crop, self.crop) if self.crop else (int(sizes[0, 1]), int(sizes[0, 2]))
        mean = self.mean_image
        if ragged:
            x = np.stack([im[:, t:t + oh, q:q + ow] for im, t, q in zip(images, top.tolist(), left.tolist())])
        elif self.crop:
            # every sample's window at its own offset, gathered in one indexing step
            x = sliding_window_view(np.asarray(images), (oh, ow), axis=(2, 3))[np.arange(n), :, top, left]
            if mean is not None:  # the mean pixel at each sample's uncropped source position
                mean = sliding_window_view(mean, (oh, ow), axis=(1, 2))[:, top, left].transpose(1, 0, 2, 3)
        else:
            x = np.asarray(images)
        x = x.astype(np.float32, copy=False)
        if mean is not None:
            x = x - mean
        elif self.mean_values.size:
            x = x - np.broadcast_to(self.mean_values, (c,)).reshape(1, c, 1, 1)
        x = x * self.scale
        # Caffe writes a mirrored sample's source column w to output column width-1-w: the same values, reversed
        return np.where(flip[:, None, None, None], x[..., ::-1], x) if flip.any() else x
