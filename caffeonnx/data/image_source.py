"""Caffe's ImageData layer (src/caffe/layers/image_data_layer.cpp) and its image decoding, without OpenCV.

Caffe reads images with OpenCV: `cv::imread`/`cv::imdecode` give 8-bit pixels in **BGR**
order (BGRA with alpha when decoded unchanged), colour or gray as asked.  Here Pillow
decodes and the channels are reordered the same way, and gray decoding follows OpenCV's
routes: a colour JPEG decodes to libjpeg's own Y channel, a colour PNG goes through
libpng's rgb_to_gray weights, other formats through cvtColor's BT.601 fixed point.
Measured against OpenCV 5.1's imdecode: JPEG, PNG, BMP and TIFF pixels equal in colour,
gray and unchanged modes (same libjpeg-turbo IDCT).  The EXIF orientation tag is ignored,
as OpenCV 2.4 (which Caffe 1.0 was built against) did.

`new_height`/`new_width` resizing is cv::resize with INTER_LINEAR, re-implemented in
numpy with OpenCV's coordinate mapping and its 11-bit fixed-point weights; OpenCV's
vectorised, scalar and IPP code paths round the last step differently, so results are
within 1 grey level of cv::resize (measured: most pixels equal).
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from caffeonnx.data.transform import DataTransformer
from caffeonnx.errors import DataError, InputFileError
from caffeonnx.proto import caffe_pb2

_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS: bilinear weights are integers out of 2048


def _to_bgr(img: Image.Image, color: bool | None, where: str) -> np.ndarray:
    """A decoded Pillow image as OpenCV gives it: (C, H, W) uint8, BGR(A) or 1 gray channel."""
    if img.mode.startswith("I") or img.mode == "F":
        raise DataError(f"{where}: {img.mode} images are not 8-bit; Caffe's DataTransformer needs unsigned bytes")
    if color is True:
        img = img.convert("RGB")
    elif color is False:
        if img.mode in ("1", "L", "LA"):
            return np.asarray(img.convert("L"))[None]
        return _gray(np.asarray(img.convert("RGB")), img.format == "PNG")[None]
    elif img.mode in ("LA", "RGBA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")  # IMREAD_UNCHANGED keeps alpha, gray+alpha as BGRA
    elif img.mode not in ("L", "RGB"):
        img = img.convert("L" if img.mode == "1" else "RGB")
    arr = np.asarray(img)
    if arr.ndim == 2:
        return arr[None]
    order = [2, 1, 0, 3][: arr.shape[2]]  # RGB(A) -> BGR(A)
    return np.ascontiguousarray(arr[:, :, order].transpose(2, 0, 1))


def _gray(rgb: np.ndarray, png: bool) -> np.ndarray:
    """OpenCV's gray decoding of a colour image: libpng's rgb_to_gray for PNG, cvtColor's BT.601 otherwise."""
    r, g, b = (rgb[:, :, i].astype(np.int32) for i in range(3))
    if png:  # png_set_rgb_to_gray(0.299, 0.587): 15-bit weights, truncated; gray pixels pass through
        y = (9797 * r + 19234 * g + 3737 * b) >> 15
        return np.where((r == g) & (g == b), r, y).astype(np.uint8)
    return ((4899 * r + 9617 * g + 1868 * b + (1 << 13)) >> 14).astype(np.uint8)  # 14-bit, rounded


def decode_image(raw: bytes, color: bool | None, where: str) -> np.ndarray:
    """Encoded image bytes as OpenCV's imdecode gives them (color True/False/None = COLOR/GRAYSCALE/UNCHANGED)."""
    try:
        img = Image.open(io.BytesIO(raw))
        if color is False and img.format == "JPEG" and img.mode != "L":
            img.draft("L", img.size)  # libjpeg's own gray output (the Y channel), as OpenCV asks libjpeg for
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{where}: not a readable image ({exc})") from None
    return _to_bgr(img, color, where)


def _taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's INTER_LINEAR source indices and fixed-point weights along one axis."""
    f = ((np.arange(dst) + 0.5) * (src / dst) - 0.5).astype(np.float32)  # centres aligned, in float as OpenCV
    s = np.floor(f).astype(np.intp)
    f = f - s.astype(np.float32)
    edge = (s < 0) | (s >= src - 1)  # outside: the border pixel, whole weight
    f[edge] = 0
    s = np.clip(s, 0, src - 1)
    one = np.float32(1 << _COEF_BITS)
    w0 = np.rint((np.float32(1) - f) * one).astype(np.int64)  # saturate_cast<short>: round half to even
    w1 = np.rint(f * one).astype(np.int64)
    return s, np.minimum(s + 1, src - 1), w0, w1


def resize_linear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """cv::resize(image, Size(width, height)) with INTER_LINEAR on a (C, H, W) uint8 image."""
    h, w = image.shape[1:]
    if (h, w) == (height, width):
        return image
    x0, x1, a0, a1 = _taps(w, width)
    y0, y1, b0, b1 = _taps(h, height)
    src = image.astype(np.int64)
    rows = src[:, :, x0] * a0 + src[:, :, x1] * a1  # horizontal pass: values * 2048
    # OpenCV's vectorised vertical pass: (((r0 >> 4)·b0 >> 16) + ((r1 >> 4)·b1 >> 16) + 2) >> 2
    top = ((rows[:, y0] >> 4) * b0[:, None]) >> 16
    bottom = ((rows[:, y1] >> 4) * b1[:, None]) >> 16
    return np.clip((top + bottom + 2) >> 2, 0, 255).astype(np.uint8)


def read_image(path: str, height: int, width: int, color: bool, where: str) -> np.ndarray:
    """Caffe's ReadImageToCVMat: the file decoded colour or gray, resized when height and width are > 0."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{where}: Could not load {path!r} ({exc.strerror or exc}); check the list file and "
                        "root_folder") from None
    img = decode_image(raw, color, f"{where}: Could not load {path!r}")
    return resize_linear(img, height, width) if height > 0 and width > 0 else img


@dataclass(frozen=True)
class ListEntry:
    """One `path label` line of an ImageData list file."""

    path: str
    label: int
    line: int


def read_image_list(source: str, where: str) -> list[ListEntry]:
    """The list file's lines, split at the LAST space as Caffe 1.0 does (file names may hold spaces)."""
    p = Path(source)
    if not p.is_file():
        raise InputFileError(f"{where}: image list {source!r} does not exist; check image_data_param.source "
                             "(Caffe reads it relative to the current directory)")
    text = p.read_text(encoding="utf-8", errors="surrogateescape")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    entries = []
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        path, space, label = line.rpartition(" ")
        try:
            value = int(label)
        except ValueError:
            value = None
        if not space or not path or value is None:
            raise DataError(f"{where}: {source} line {number}: {line!r} is not 'path label' (an image path, a "
                            "space, an integer label)")
        entries.append(ListEntry(path, value, number))
    if not entries:
        raise DataError(f"{where}: {source}: File is empty")
    return entries


class ImageDataSource:
    """An ImageData layer: list-file images, resized, through the DataTransformer; labels from the list.

    As Caffe: `shuffle` permutes the list at start and again at every wrap (here a fresh
    permutation per epoch, seeded with (seed, layer, epoch) — not Caffe's RNG), `rand_skip`
    starts the first epoch at a random line in [0, rand_skip), and each batch takes the
    next `batch_size` lines, wrapping mid-batch.
    """

    def __init__(self, layer: caffe_pb2.LayerParameter, train: bool, seed: int, salt: int) -> None:
        p = layer.image_data_param
        self.where = f"layer {layer.name!r} (ImageData)"
        if not ((p.new_height == 0 and p.new_width == 0) or (p.new_height > 0 and p.new_width > 0)):
            raise DataError(f"{self.where}: Current implementation requires new_height and new_width to be set at "
                            "the same time.")
        if p.batch_size <= 0:
            raise DataError(f"{self.where}: Positive batch size required (image_data_param.batch_size)")
        self.param = p
        self.tops = list(layer.top)
        self.seed, self.salt = seed, salt
        self.entries = read_image_list(p.source, self.where)
        self.transformer = DataTransformer(layer.transform_param, train, self.where)
        self.skip = int(np.random.default_rng((seed, salt, 1)).integers(p.rand_skip)) if p.rand_skip else 0
        if self.skip >= len(self.entries):
            raise DataError(f"{self.where}: Not enough points to skip ({self.skip} of {len(self.entries)} lines)")
        first = self._load(self._order(0)[self.skip])
        batch = int(p.batch_size)
        self.shapes = {self.tops[0]: (batch, *self.transformer.output_shape(first.shape))}
        if len(self.tops) > 1:
            self.shapes[self.tops[1]] = (batch,)

    @property
    def samples(self) -> dict[str, int]:
        """How many lines the list file has (for each top)."""
        return {t: len(self.entries) for t in self.tops}

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.entries)
        if not self.param.shuffle:
            return np.arange(n)
        return np.random.default_rng((self.seed, self.salt, 2, epoch)).permutation(n)

    def _load(self, i: int) -> np.ndarray:
        e = self.entries[i]
        return read_image(self.param.root_folder + e.path, self.param.new_height, self.param.new_width,
                          self.param.is_color, f"{self.where}: {self.param.source} line {e.line}")

    def indices(self, index: int) -> np.ndarray:
        """The list lines (0-based) batch `index` reads, in order."""
        n = len(self.entries)
        positions = self.skip + index * int(self.param.batch_size) + np.arange(self.param.batch_size)
        epochs = positions // n
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._order(int(epoch))[positions[mask] % n]
        return out

    def batch(self, index: int) -> dict[str, np.ndarray]:
        """Batch number `index`: transformed images and their labels as float (Caffe's blobs are float)."""
        rows = self.indices(index)
        images: Sequence[np.ndarray] = [self._load(int(i)) for i in rows]
        if len({im.shape for im in images}) == 1:
            images = np.stack(images)
        rng = np.random.default_rng((self.seed, self.salt, 0, index))
        out = {self.tops[0]: self.transformer(images, rng)}
        if len(self.tops) > 1:
            out[self.tops[1]] = np.asarray([self.entries[int(i)].label for i in rows], dtype=np.float32)
        return out


def first_image_shape(layer: caffe_pb2.LayerParameter) -> tuple[int, int, int]:
    """(channels, height, width) of an ImageData layer's top, from its first listed image (after the crop)."""
    return ImageDataSource(layer, train=False, seed=0, salt=0).shapes[layer.top[0]][1:]
