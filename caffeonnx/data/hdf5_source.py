"""Caffe's HDF5Data layer (src/caffe/layers/hdf5_data_layer.cpp, util/hdf5.cpp) read with h5py.

`source` is a text file of .h5 paths (whitespace-separated, as Caffe's `file >> line`
reads them, relative to the current directory).  Each top is the dataset of the same name
in every file; rows are taken in order across the files, wrapping at the end.  Datasets of
any float or integer type are read as float32 (Caffe's H5LTread_dataset_float).  Caffe
applies no transform_param to HDF5 data and refuses a layer that has one.

`shuffle: true` shuffles as Caffe does: the file order once per pass over the list, and the
rows of a file each time it is loaded.  The permutations are seeded with (seed, layer,
epoch[, file]), so batch k is a pure function of k; they are not Caffe's std::random_shuffle.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np

from caffeonnx.errors import DataError, InputFileError
from caffeonnx.proto import caffe_pb2

_CACHED_FILES = 2  # a batch can straddle two files; Caffe itself holds one file in memory


def read_hdf5_list(source: str, where: str) -> list[str]:
    """The .h5 paths named in an HDF5Data source file."""
    p = Path(source)
    if not p.is_file():
        raise InputFileError(f"{where}: Failed to open source file: {source!r}; check hdf5_data_param.source "
                             "(Caffe reads it relative to the current directory)")
    files = p.read_text(encoding="utf-8").split()
    if not files:
        raise DataError(f"{where}: Must have at least 1 HDF5 filename listed in {source}")
    return files


def _open(path: str, where: str) -> h5py.File:
    if not Path(path).is_file():
        raise InputFileError(f"{where}: Failed opening HDF5 file: {path!r} does not exist (listed in the source "
                             "file; paths are relative to the current directory)")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise InputFileError(f"{where}: Failed opening HDF5 file: {path!r} ({exc})") from None


def _dataset(f: h5py.File, name: str, path: str, where: str) -> h5py.Dataset:
    """Dataset `name` of `f`, checked as Caffe's hdf5_load_nd_dataset does."""
    ds = f.get(name)
    if not isinstance(ds, h5py.Dataset):
        raise DataError(f"{where}: Failed to find HDF5 dataset {name!r} in {path!r} (it has "
                        f"{sorted(f.keys())}); each top of an HDF5Data layer names a dataset")
    if ds.dtype.kind not in "fiu":
        raise DataError(f"{where}: dataset {name!r} in {path!r} has type {ds.dtype}; Caffe reads float or integer "
                        "datasets only")
    if ds.ndim < 1:
        raise DataError(f"{where}: dataset {name!r} in {path!r} is a scalar; it needs a row axis")
    return ds


def dataset_shapes(path: str, tops: list[str], where: str) -> tuple[int, dict[str, tuple[int, ...]]]:
    """The row count and each top's per-row shape in one .h5 file (rows must agree across the tops)."""
    with _open(path, where) as f:
        shapes = {t: tuple(int(d) for d in _dataset(f, t, path, where).shape) for t in tops}
    rows = {s[0] for s in shapes.values()}
    if len(rows) != 1:
        raise DataError(f"{where}: the datasets of {path!r} have different row counts "
                        f"{ {t: s[0] for t, s in shapes.items()} }; Caffe needs one row count per file")
    return rows.pop(), {t: s[1:] for t, s in shapes.items()}


class Hdf5Source:
    """An HDF5Data layer: `batch_size` rows of every top dataset per batch, in Caffe's order."""

    def __init__(self, layer: caffe_pb2.LayerParameter, seed: int, salt: int) -> None:
        p = layer.hdf5_data_param
        self.where = f"layer {layer.name!r} (HDF5Data)"
        if layer.HasField("transform_param"):
            raise DataError(f"{self.where}: HDF5Data does not transform data. (remove transform_param; scale the "
                            "data when writing the .h5 files)")
        if p.batch_size <= 0:
            raise DataError(f"{self.where}: hdf5_data_param.batch_size must be positive, got {p.batch_size}")
        self.tops = list(layer.top)
        self.batch_size = int(p.batch_size)
        self.shuffle = bool(p.shuffle)
        self.seed, self.salt = seed, salt
        self.files = read_hdf5_list(p.source, self.where)
        rows, sample = [], None
        for path in self.files:
            count, shapes = dataset_shapes(path, self.tops, self.where)
            if count == 0:
                raise DataError(f"{self.where}: {path!r} holds no rows")
            if sample is not None and shapes != sample:
                raise DataError(f"{self.where}: {path!r} has rows of shape {shapes} but {self.files[0]!r} has "
                                f"{sample}; every file must hold rows of one shape per dataset")
            sample = shapes
            rows.append(count)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.shapes = {t: (self.batch_size, *sample[t]) for t in self.tops}
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    @property
    def samples(self) -> dict[str, int]:
        """How many rows all the files hold together (for each top)."""
        return {t: int(self.rows.sum()) for t in self.tops}

    def _file_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.files))
        return np.random.default_rng((self.seed, self.salt, 3, epoch)).permutation(len(self.files))

    def _row_order(self, epoch: int, file: int) -> np.ndarray:
        n = int(self.rows[file])
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng((self.seed, self.salt, 4, epoch, file)).permutation(n)

    def _load(self, file: int) -> dict[str, np.ndarray]:
        """Every top dataset of one file as float32, as Caffe's LoadHDF5FileData holds it."""
        if file in self._cache:
            self._cache.move_to_end(file)
            return self._cache[file]
        path = self.files[file]
        with _open(path, self.where) as f:
            arrays = {t: np.asarray(_dataset(f, t, path, self.where), dtype=np.float32) for t in self.tops}
        self._cache[file] = arrays
        if len(self._cache) > _CACHED_FILES:
            self._cache.popitem(last=False)
        return arrays

    def locate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The file and the row of each row batch `index` reads, in order (two int arrays)."""
        positions = index * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(positions, int(self.rows.sum()))
        files = np.empty_like(positions)
        rows = np.empty_like(positions)
        for epoch in np.unique(epochs).tolist():
            mask = epochs == epoch
            order = self._file_order(epoch)
            ends = np.cumsum(self.rows[order])
            k = np.searchsorted(ends, offsets[mask], side="right")
            files[mask] = order[k]
            rows[mask] = offsets[mask] - (ends[k] - self.rows[order][k])
            for file in np.unique(files[mask]).tolist():
                here = mask & (files == file)
                rows[here] = self._row_order(epoch, file)[rows[here]]
        return files, rows

    def batch(self, index: int) -> dict[str, np.ndarray]:
        """Batch number `index`: `batch_size` rows of every top, float32."""
        files, rows = self.locate(index)
        out = {t: np.empty(self.shapes[t], dtype=np.float32) for t in self.tops}
        for file in np.unique(files):
            mask = files == file
            arrays = self._load(int(file))
            for t in self.tops:
                out[t][mask] = arrays[t][rows[mask]]
        return out
