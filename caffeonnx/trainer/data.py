"""Training data for the net's input blobs: the net's own data layers, or .npz/.npy/IDX arrays.

`net_source` reads what Caffe's data layers read (Data: LMDB/LevelDB, HDF5Data,
ImageData, DummyData), each layer with its own cursor and batch size, as Caffe's
forward pass does.  `load_source` takes user arrays (--data) for Input/MemoryData nets:
samples in order, in batches of the input blob's batch size, wrapping around at the end;
a layer's `transform_param` (scale, mean_value) is applied as Caffe computes it,
(x − mean)·scale.  In both, batch number k is a pure function of k, so a resumed run
sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from caffeonnx.converter.caffe_io import check_input_file
from caffeonnx.converter.fillers import fill
from caffeonnx.data.hdf5_source import Hdf5Source
from caffeonnx.data.image_source import ImageDataSource
from caffeonnx.data.lmdb_source import DataLayerSource
from caffeonnx.errors import DataError, InputFileError
from caffeonnx.npz import load_npz
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


def _declared_shape(layer: caffe_pb2.LayerParameter, top_index: int) -> list[int]:
    """The shape an Input layer declares for its top `top_index` (one shape for all tops, or one each); [] if none."""
    shapes = layer.input_param.shape
    if layer.type != "Input" or not shapes:
        return []
    return [int(d) for d in (shapes[top_index] if len(shapes) > 1 else shapes[0]).dim]


def _batch_size(layer: caffe_pb2.LayerParameter, top_index: int) -> int | None:
    """The batch size a Caffe data layer gives its top `top_index`."""
    if layer.type == "Input":
        shape = _declared_shape(layer, top_index)
        return shape[0] if shape else None
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
    """Caffe's batch shape of each graph input: the data layer's batch size, then the graph's sample dims.

    A graph input whose batch is not axis 0 (an LSTM's (T, N, ...) x) has a symbolic later axis:
    it is taken from the Input layer's declared shape, as Caffe's net has it.
    """
    batch: dict[str, int] = {}
    declared: dict[str, list[int]] = {}
    for layer in layers:
        for i, top in enumerate(layer.top):
            size = _batch_size(layer, i)
            if size:
                batch.setdefault(top, size)
            shape = _declared_shape(layer, i)
            if shape:
                declared.setdefault(top, shape)
    shapes = {}
    for name, dims in graph_inputs.items():
        first = int(dims[0]) if dims and int(dims[0]) > 0 else batch.get(name)
        if first is None:
            raise DataError(f"input blob {name!r} has no batch size in the net; give its data layer a batch size")
        known = declared.get(name, [])
        rest = [int(d) if int(d) > 0 or k + 1 >= len(known) else int(known[k + 1]) for k, d in enumerate(dims[1:])]
        shapes[name] = (first, *rest)
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
        check_input_file(path, "data file")
        with open(path, "rb") as fh:
            is_zip = fh.read(4) == b"PK\x03\x04"
        if is_zip:
            arrays = load_npz(path, "data")
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


class LayerSource(Protocol):
    """What one data layer gives: its tops' batch shapes, record counts and batch k."""

    where: str  # the layer, for messages
    tops: list[str]
    shapes: dict[str, Shape]

    @property
    def samples(self) -> dict[str, int]: ...

    def batch(self, index: int) -> dict[str, np.ndarray]: ...


class DataSource(Protocol):
    """What the trainer reads: batch k of every input blob (a pure function of k)."""

    shapes: dict[str, Shape]

    @property
    def samples(self) -> dict[str, int]: ...

    def batch(self, index: int) -> dict[str, np.ndarray]: ...


class DummySource:
    """A DummyData layer: every forward Caffe refills each top with its filler, except constant ones.

    Non-constant tops of batch k are drawn from a generator seeded with (seed, layer, k, top),
    so batch k is a pure function of k (the values are not Caffe's RNG stream).
    """

    def __init__(self, layer: caffe_pb2.LayerParameter, seed: int, salt: int) -> None:
        p = layer.dummy_data_param
        self.where = where = f"layer {layer.name!r} (DummyData)"
        self.tops = list(layer.top)
        n = len(self.tops)
        if len(p.data_filler) not in (0, 1, n):
            raise DataError(f"{where}: Number of data fillers must be 0, 1 or equal to the number of tops: {n}; you "
                            f"specified {len(p.data_filler)} data fillers.")
        legacy = {"num": p.num, "channels": p.channels, "height": p.height, "width": p.width}
        if any(legacy.values()):
            if p.shape:
                raise DataError(f"{where}: Both shape and legacy fields were specified")
            for field, values in legacy.items():
                if len(values) not in (1, n):
                    raise DataError(f"{where}: Must specify '{field}' once, or once per top blob ({n}); specified "
                                    f"{len(values)}.")
            dims = [tuple(int(v[i] if len(v) > 1 else v[0]) for v in legacy.values()) for i in range(n)]
        else:
            if len(p.shape) not in (1, n):
                raise DataError(f"{where}: Must specify 'shape' once, or once per top blob ({n}); specified "
                                f"{len(p.shape)}.")
            dims = [tuple(int(d) for d in p.shape[i if len(p.shape) > 1 else 0].dim) for i in range(n)]
        default = caffe_pb2.FillerParameter(type="constant", value=0)
        self.fillers = [p.data_filler[i if len(p.data_filler) > 1 else 0] if p.data_filler else default
                        for i in range(n)]
        self.shapes = dict(zip(self.tops, dims))
        self.seed, self.salt = seed, salt
        self.constant = {t: fill(f, self.shapes[t], np.random.default_rng(0))
                         for t, f in zip(self.tops, self.fillers) if f.type == "constant"}

    @property
    def samples(self) -> dict[str, int]:
        """The batch size of each top (DummyData has no records; every batch is new)."""
        return {t: s[0] if s else 1 for t, s in self.shapes.items()}

    def batch(self, index: int) -> dict[str, np.ndarray]:
        """Batch `index`: constant tops as filled once, the others refilled."""
        return {t: self.constant[t] if t in self.constant else
                fill(f, self.shapes[t], np.random.default_rng((self.seed, self.salt, index, i)))
                for i, (t, f) in enumerate(zip(self.tops, self.fillers))}


def _layer_source(layer: caffe_pb2.LayerParameter, train: bool, seed: int, salt: int) -> LayerSource:
    """The reader of one data layer, or a DataError saying what to do instead."""
    kind = layer.type
    if kind == "Data":
        return DataLayerSource(layer, train, seed, salt)
    if kind == "HDF5Data":
        return Hdf5Source(layer, seed, salt)
    if kind == "ImageData":
        return ImageDataSource(layer, train, seed, salt)
    if kind == "DummyData":
        return DummySource(layer, seed, salt)
    if kind in ("Input", "MemoryData"):
        raise DataError(f"layer {layer.name!r} ({kind}) takes its blobs {list(layer.top)} from the caller; pass the "
                        "samples with --data FILE.npz (one array per blob)")
    if kind == "WindowData":
        raise DataError(f"layer {layer.name!r} (WindowData) is not supported for training: crop the windows into "
                        "image files and list them for an ImageData layer, or pass the samples with --data")
    raise DataError(f"layer {layer.name!r} ({kind}) is not a data layer caffeonnx can read; pass the samples of "
                    f"{list(layer.top)} with --data")


class NetSource:
    """Several data layers read side by side, each with its own cursor and batch size, as in Caffe's forward."""

    def __init__(self, sources: Sequence[LayerSource], needed: Sequence[str], shapes: Mapping[str, Shape]) -> None:
        self.sources = list(sources)
        self.needed = list(needed)
        given = {t: s for src in self.sources for t, s in src.shapes.items()}
        self.shapes = {t: tuple(shapes.get(t, given[t])) for t in self.needed}
        for t in self.needed:
            self._check(t, given[t])

    def _check(self, top: str, shape: Shape) -> None:
        want = self.shapes[top]
        if tuple(shape) != want and int(np.prod(shape)) != int(np.prod(want)):
            layer = next(src for src in self.sources if top in src.shapes)
            raise DataError(f"{layer.where} gives {top!r} batches of shape "
                            f"{list(shape)} but the net expects {list(want)}; check the data or --input-shape")

    @property
    def samples(self) -> dict[str, int]:
        """How many records each needed blob's source holds."""
        counts = {t: n for src in self.sources for t, n in src.samples.items()}
        return {t: counts[t] for t in self.needed}

    def batch(self, index: int) -> dict[str, np.ndarray]:
        """Batch number `index` of every needed blob, float32, in the net's shapes."""
        out = {}
        for src in self.sources:
            for top, arr in src.batch(index).items():
                if top in self.shapes:
                    self._check(top, arr.shape)
                    out[top] = np.asarray(arr, dtype=np.float32).reshape(self.shapes[top])
        return out


def net_source(layers: Sequence[caffe_pb2.LayerParameter], needed: Sequence[str], shapes: Mapping[str, Shape],
               train: bool, seed: int) -> DataSource:
    """Batches of the `needed` blobs read by the net's own data layers (already phase/stage-filtered).

    Each layer that produces a needed blob reads its source in order, wrapping mid-batch,
    with its own batch size and cursor; `train` picks the DataTransformer's phase (random
    crops in TRAIN, centred in TEST); `seed` seeds every random draw, keyed by the layer's
    position in `layers` and the batch index.
    """
    producers: dict[str, caffe_pb2.LayerParameter] = {}
    feeding: list[tuple[int, caffe_pb2.LayerParameter]] = []
    for salt, layer in enumerate(layers):
        tops = [t for t in layer.top if t in needed] if not layer.bottom else []  # in-place layers rewrite, not feed
        for top in tops:
            if top in producers:
                raise DataError(f"blob {top!r} is produced by both layer {producers[top].name!r} and layer "
                                f"{layer.name!r}; give them include {{ phase }} rules so one net has one")
            producers[top] = layer
        if tops:
            feeding.append((salt, layer))
    missing = [t for t in needed if t not in producers]
    if missing:
        raise DataError(f"no data layer of the net produces {missing}; pass the samples with --data FILE.npz "
                        "(one array per blob)")
    return NetSource([_layer_source(layer, train, seed, salt) for salt, layer in feeding], needed, shapes)


class LmdbSource(NetSource):
    """One Data layer's batches (LMDB or LevelDB), with Caffe's DataTransformer: net_source for a single layer."""

    def __init__(self, layer: caffe_pb2.LayerParameter, shapes: Mapping[str, Shape], train: bool, seed: int) -> None:
        super().__init__([DataLayerSource(layer, train, seed, 0)], [t for t in layer.top if t in shapes], shapes)


class ShardedSource:
    """Rank `rank`'s share of a TRAIN source among `world` ranks; batch k stays a pure function of k.

    skip (Caffe's DataLayer::Skip): one stream of items, item p being row p mod B of batch p // B
    of the source (B its batch size); rank r keeps the items whose position p has p mod N = r, so its
    batch k holds the items at positions (k·B + i)·N + r, i = 0..B−1, wrapping across epochs as the
    source does.  contiguous: rank r's batch k is the r-th of N consecutive batches, batch k·N + r, so
    N ranks of batch B read exactly what one process with iter_size N reads.  Each blob is sharded
    with its own batch size, as each Caffe data layer skips on its own cursor.
    """

    def __init__(self, source: DataSource, rank: int, world: int, mode: str) -> None:
        self.source = source
        self.rank, self.world, self.mode = rank, world, mode
        self.shapes = dict(source.shapes)

    @property
    def samples(self) -> dict[str, int]:
        """The records of the whole source (every rank reads from all of them)."""
        return self.source.samples

    def batch(self, index: int) -> dict[str, np.ndarray]:
        """Batch `index` of this rank."""
        if self.mode == "contiguous":
            return self.source.batch(index * self.world + self.rank)
        read: dict[int, dict[str, np.ndarray]] = {}
        out = {}
        for name, shape in self.shapes.items():
            size = shape[0]
            positions = (index * size + np.arange(size)) * self.world + self.rank
            rows = []
            for p in positions.tolist():
                k = p // size
                if k not in read:
                    read[k] = self.source.batch(k)
                rows.append(read[k][name][p % size])
            out[name] = np.stack(rows)
        return out
