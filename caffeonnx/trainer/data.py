"""Training data for the net's input blobs: .npz/.npy arrays and MNIST IDX files.

Like Caffe's Data layer, samples are consumed in order, in batches of the input blob's
batch size, wrapping around at the end, with no shuffling.  Batch number k is a pure
function of k, so a resumed run sees exactly the batches an uninterrupted run would.
A layer's `transform_param` (scale, mean_value) is applied to the blobs it produces:
Caffe computes (x − mean)·scale.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from caffeonnx.errors import DataError, InputFileError
from caffeonnx.proto import caffe_pb2
from caffeonnx.runtime.inputs import open_samples

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Transform:
    """Caffe's DataTransformer for numeric data: (x − mean_value[c])·scale."""

    scale: float = 1.0
    mean: tuple[float, ...] = ()

    def apply(self, batch: np.ndarray) -> np.ndarray:
        """The transformed batch as float32."""
        x = batch.astype(np.float32)
        if self.mean:
            mean = np.asarray(self.mean, dtype=np.float32)
            if len(self.mean) > 1:
                if x.ndim < 2 or x.shape[1] != len(self.mean):
                    raise DataError(f"transform_param has {len(self.mean)} mean_value(s) but the blob has shape "
                                    f"{list(x.shape)}; give one mean_value or one per channel")
                mean = mean.reshape((1, -1) + (1,) * (x.ndim - 2))
            x = x - mean
        return x * np.float32(self.scale) if self.scale != 1.0 else x


def transforms_of(layers: Sequence[caffe_pb2.LayerParameter]) -> dict[str, Transform]:
    """The transform of each top blob whose layer has a transform_param (data layers)."""
    found = {}
    for layer in layers:
        if layer.HasField("transform_param"):
            t = layer.transform_param
            for top in layer.top[:1]:  # Caffe transforms the data top, never the label
                found[top] = Transform(float(t.scale), tuple(float(m) for m in t.mean_value))
    return found


def _batch_size(layer: caffe_pb2.LayerParameter, top_index: int) -> int | None:
    """The batch size a Caffe data layer gives its top `top_index`."""
    if layer.type == "Input":
        shapes = layer.input_param.shape
        shape = shapes[top_index] if len(shapes) > 1 else (shapes[0] if shapes else None)
        return int(shape.dim[0]) if shape is not None and shape.dim else None
    if layer.type == "DummyData":
        shapes = layer.dummy_data_param.shape
        if shapes:
            return int((shapes[top_index] if len(shapes) > 1 else shapes[0]).dim[0])
        nums = layer.dummy_data_param.num
        return int(nums[top_index] if len(nums) > 1 else nums[0]) if nums else None
    sizes = {"Data": layer.data_param.batch_size, "MemoryData": layer.memory_data_param.batch_size,
             "HDF5Data": layer.hdf5_data_param.batch_size, "ImageData": layer.image_data_param.batch_size,
             "WindowData": layer.window_data_param.batch_size}
    return int(sizes[layer.type]) if sizes.get(layer.type) else None


def input_shapes(graph_inputs: Mapping[str, Sequence[int]], layers: Sequence[caffe_pb2.LayerParameter]) -> dict[str, Shape]:
    """Caffe's batch shape of each graph input: the data layer's batch size, then the graph's sample dims."""
    batch: dict[str, int] = {}
    for layer in layers:
        for i, top in enumerate(layer.top):
            size = _batch_size(layer, i)
            if size:
                batch.setdefault(top, size)
    shapes = {}
    for name, dims in graph_inputs.items():
        first = int(dims[0]) if dims and int(dims[0]) > 0 else batch.get(name)
        if first is None:
            raise DataError(f"input blob {name!r} has no batch size in the net; give its data layer a batch size")
        shapes[name] = (first, *(int(d) for d in dims[1:]))
    return shapes


class BatchSource:
    """Sequential, wrapping batches of several arrays, one per input blob."""

    def __init__(self, arrays: Mapping[str, np.ndarray], shapes: Mapping[str, Shape],
                 transforms: Mapping[str, Transform] | None = None) -> None:
        self.arrays = dict(arrays)
        self.shapes = dict(shapes)
        self.transforms = dict(transforms or {})

    def batch(self, index: int) -> dict[str, np.ndarray]:
        """Batch number `index` (0-based) of every input."""
        out = {}
        for name, arr in self.arrays.items():
            shape = self.shapes[name]
            size, n = shape[0], arr.shape[0]
            start = (index * size) % n
            rows = np.arange(start, start + size) % n if start + size > n else slice(start, start + size)
            chunk = np.asarray(arr[rows]).reshape(shape)
            transform = self.transforms.get(name)
            out[name] = transform.apply(chunk) if transform else chunk.astype(np.float32)
        return out

    @property
    def samples(self) -> dict[str, int]:
        """How many samples each input has."""
        return {k: int(v.shape[0]) for k, v in self.arrays.items()}


def fit(name: str, arr: np.ndarray, shape: Shape, source: str) -> np.ndarray:
    """`arr` as (samples, *per-sample shape of the blob), or a DataError saying why it does not fit."""
    sample = tuple(shape[1:])
    if arr.ndim >= 1 and tuple(arr.shape[1:]) == sample:
        return arr
    if arr.ndim >= 2 and arr.shape[1] == shape[0] and tuple(arr.shape[2:]) == sample:
        return arr.reshape((-1, *sample))  # (iterations, batch, ...): one batch per row
    per = int(np.prod(sample))
    if arr.ndim >= 1 and arr.shape[0] > 0 and int(np.prod(arr.shape[1:])) == per:
        return arr.reshape((arr.shape[0], *sample))
    raise DataError(
        f"{source}: array {name!r} has shape {list(arr.shape)} but input blob {name!r} takes batches of shape "
        f"{list(shape)}: each sample needs {per} value(s) (shape {list(sample)}), not "
        f"{int(np.prod(arr.shape[1:])) if arr.ndim else 0}; check the array or the net's input shape"
    )


def _load_array(path: Path) -> np.ndarray:
    """One .npy / IDX / gzip array, read into memory."""
    with open_samples(path, scratch_dir=tempfile.gettempdir()) as arr:
        return np.array(arr)


def _mnist_labels_beside(path: Path) -> Path | None:
    """The MNIST labels file that goes with an images file (train-images-idx3-ubyte -> train-labels-idx1-ubyte)."""
    if "images-idx3" not in path.name:
        return None
    labels = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
    return labels if labels.exists() else None


def load_source(spec: str | os.PathLike[str], inputs: Mapping[str, Shape],
                transforms: Mapping[str, Transform] | None = None) -> BatchSource:
    """Arrays for the net's `inputs` (name -> batch shape) from `spec`.

    `spec` is an .npz holding one array per input blob; or one .npy/IDX file (gzip ok) for
    the first input (an MNIST images file brings its labels file along for the second);
    or `blob=path,blob=path` naming the file of each input.
    """
    names = list(inputs)
    text = str(spec)
    arrays: dict[str, np.ndarray] = {}
    if "=" in text:
        for item in text.split(","):
            blob, _, file = item.partition("=")
            if blob not in inputs:
                raise DataError(f"--data names {blob!r}, which is not an input blob of the net (inputs: {names})")
            arrays[blob] = _read_one(Path(file))
    else:
        path = Path(text)
        if not path.exists():
            raise InputFileError(f"data file {text!r} does not exist; check the path")
        if path.is_dir():
            raise InputFileError(f"data {text!r} is a directory; pass an .npz, .npy or IDX file")
        with open(path, "rb") as fh:
            is_zip = fh.read(4) == b"PK\x03\x04"
        if is_zip:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            unknown = sorted(set(arrays) - set(inputs))
            if unknown:
                raise DataError(f"{text}: arrays {unknown} match no input blob of the net (inputs: {names}); "
                                "name each array after the blob it feeds")
        else:
            arrays[names[0]] = _read_one(path)
            labels = _mnist_labels_beside(path)
            if labels is not None and len(names) > 1:
                arrays[names[1]] = _read_one(labels)
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DataError(f"{text}: no data for input blob(s) {missing}; the net reads {names}")
    fitted = {n: fit(n, arrays[n], tuple(inputs[n]), text) for n in names}
    return BatchSource(fitted, inputs, transforms)


def _read_one(path: Path) -> np.ndarray:
    if not path.exists():
        raise InputFileError(f"data file {str(path)!r} does not exist; check the path")
    return _load_array(path)


def _mean_file(path: str) -> np.ndarray:
    """A binaryproto mean image (BlobProto) as a (C, H, W) float32 array."""
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"transform_param.mean_file {path!r} does not exist; check the path")
    blob = caffe_pb2.BlobProto.FromString(p.read_bytes())
    dims = list(blob.shape.dim) if blob.HasField("shape") else [blob.num, blob.channels, blob.height, blob.width]
    values = np.asarray(blob.data if len(blob.data) else blob.double_data, dtype=np.float32)
    return values.reshape(dims[-3:])


class LmdbSource:
    """A Caffe Data layer: batches of Datums from its LMDB with Caffe's DataTransformer.

    Per sample, as Caffe: crop (random offsets in TRAIN, centred in TEST), mirror (a coin
    flip when `mirror` is set), subtract the mean (mean_file pixel or mean_value channel),
    multiply by `scale`.  The random draws of batch k come from a generator seeded with
    (seed, k), so a resumed run draws the same crops and flips.
    """

    def __init__(self, layer: caffe_pb2.LayerParameter, shapes: Mapping[str, Shape], train: bool, seed: int) -> None:
        from caffeonnx.data.lmdb_source import DatumDB

        if layer.data_param.backend != caffe_pb2.DataParameter.LMDB:
            raise DataError(f"layer {layer.name!r}: only LMDB Data sources are supported (backend LEVELDB is not); "
                            "convert the database or feed the samples with --data")
        self.db = DatumDB(layer.data_param.source)
        self.layer = layer
        self.tops = list(layer.top)
        self.shapes = {t: tuple(shapes[t]) for t in self.tops if t in shapes}
        self.train = train
        self.seed = seed
        t = layer.transform_param
        self.scale = float(t.scale)
        self.crop = int(t.crop_size)
        self.mirror = bool(t.mirror)
        self.mean_image = _mean_file(t.mean_file) if t.HasField("mean_file") else None
        if self.mean_image is not None and t.mean_value:
            raise DataError(f"layer {layer.name!r}: Cannot specify mean_file and mean_value at the same time")
        self.mean_values = np.asarray(t.mean_value, dtype=np.float32)

    @property
    def samples(self) -> dict[str, int]:
        """How many records the database holds (for each top)."""
        return {t: len(self.db) for t in self.shapes}

    def _transform(self, datum: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        c, h, w = datum.shape
        x = datum.astype(np.float32)
        if self.mean_image is not None:
            if self.mean_image.shape != datum.shape:
                raise DataError(f"mean_file is {list(self.mean_image.shape)} but the Datums are {list(datum.shape)}")
            x = x - self.mean_image
        elif self.mean_values.size:
            if self.mean_values.size not in (1, c):
                raise DataError(f"layer {self.layer.name!r}: Specify either 1 mean_value or as many as channels: {c}")
            x = x - self.mean_values.reshape(-1, 1, 1)
        if self.crop:
            if self.train:
                top, left = int(rng.integers(h - self.crop + 1)), int(rng.integers(w - self.crop + 1))
            else:
                top, left = (h - self.crop) // 2, (w - self.crop) // 2
            x = x[:, top:top + self.crop, left:left + self.crop]
        if self.mirror and rng.integers(2):
            x = x[:, :, ::-1]
        return x * np.float32(self.scale) if self.scale != 1.0 else x

    def batch(self, index: int) -> dict[str, np.ndarray]:
        """Batch number `index`: the data top transformed, the label top as float (Caffe's blobs are float)."""
        size = self.shapes[self.tops[0]][0]
        data, labels = self.db.read(list(range(index * size, (index + 1) * size)))
        rng = np.random.default_rng((self.seed, index))
        out = {self.tops[0]: np.stack([self._transform(d, rng) for d in data]).astype(np.float32)}
        if len(self.tops) > 1 and self.tops[1] in self.shapes:
            out[self.tops[1]] = labels.reshape(self.shapes[self.tops[1]])
        expected = self.shapes[self.tops[0]]
        if out[self.tops[0]].shape != expected:
            raise DataError(f"layer {self.layer.name!r}: transformed batch is {list(out[self.tops[0]].shape)} but "
                            f"the net expects {list(expected)}")
        return out
