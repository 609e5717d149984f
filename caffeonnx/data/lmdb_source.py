"""Caffe's Data layer (src/caffe/layers/data_layer.cpp): `Datum` records from an LMDB or a LevelDB.

Records are taken in key order (Caffe's cursor order), `batch_size` per batch, wrapping
around at the end mid-batch.  A Datum holds raw bytes (`data`, uint8, C×H×W), `float_data`,
or, with `encoded: true`, a JPEG/PNG file, decoded as Caffe's DecodeDatumToCVMat does
(BGR channel order; colour or gray by transform_param force_color / force_gray, else as
stored).  A batch of raw Datums is joined into one array with a single numpy call.

LevelDB databases are read through `plyvel` (`pip install caffeonnx[leveldb]`).
"""
from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from caffeonnx.data.image_source import decode_image
from caffeonnx.data.transform import DataTransformer
from caffeonnx.errors import DataError, InputFileError
from caffeonnx.proto import caffe_pb2

DB = caffe_pb2.DataParameter
_OPEN: dict[tuple[Path, int], Any] = {}  # LMDB and LevelDB allow one open handle per database and process


def _open_lmdb(path: Path) -> lmdb.Environment:
    if not path.exists():
        raise InputFileError(f"LMDB {str(path)!r} does not exist; check the Data layer's source (Caffe reads it "
                             "relative to the current directory)")
    try:
        return lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=path.is_dir())
    except lmdb.Error as exc:
        raise InputFileError(f"{path}: not a readable LMDB ({exc})") from None


def _open_leveldb(path: Path) -> Any:
    try:
        import plyvel  # optional: LevelDB is Caffe's older backend
    except ImportError:
        raise DataError(f"the Data layer's source {str(path)!r} is a LEVELDB database, which needs the plyvel "
                        "package: pip install caffeonnx[leveldb]") from None
    if not path.is_dir():
        raise InputFileError(f"LevelDB {str(path)!r} does not exist; check the Data layer's source (Caffe reads it "
                             "relative to the current directory)")
    try:
        return plyvel.DB(str(path), create_if_missing=False)
    except plyvel.Error as exc:
        raise InputFileError(f"Failed to open leveldb {str(path)!r} ({exc})") from None


def _close_leveldbs() -> None:
    """Close and drop LevelDB handles at exit: plyvel cannot free them once module teardown has begun."""
    for key in [k for k in _OPEN if k[1] == DB.LEVELDB]:
        _OPEN.pop(key).close()


def _open(path: Path, backend: int) -> Any:
    key = (path.resolve(), backend)
    if key not in _OPEN:
        if backend == DB.LEVELDB and not any(b == DB.LEVELDB for _, b in _OPEN):
            atexit.register(_close_leveldbs)
        _OPEN[key] = _open_leveldb(path) if backend == DB.LEVELDB else _open_lmdb(path)
    return _OPEN[key]


def _datum_array(datum: caffe_pb2.Datum, color: bool | None, where: str) -> np.ndarray:
    """One Datum's pixels as (C, H, W): uint8 bytes, float32 float_data, or a decoded image."""
    if datum.encoded:
        try:
            return decode_image(datum.data, color, where)
        except DataError as exc:
            raise DataError(f"{exc}: the Datum is JPEG/PNG-encoded but its bytes do not decode") from None
    shape = (datum.channels, datum.height, datum.width)
    arr = np.frombuffer(datum.data, dtype=np.uint8) if datum.data else np.asarray(datum.float_data, np.float32)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"{where}: the Datum says {list(shape)} but holds {arr.size} values")
    return arr.reshape(shape)


class DatumDB:
    """Random access to the Datums of one LMDB or LevelDB, in Caffe's cursor (key) order."""

    def __init__(self, source: str | os.PathLike[str], backend: int = DB.LMDB) -> None:
        self.path = Path(source)
        self.backend = backend
        self.db = _open(self.path, backend)
        if backend == DB.LEVELDB:
            self.keys = list(self.db.iterator(include_value=False))
        else:
            with self.db.begin() as txn:
                self.keys = list(txn.cursor().iternext(keys=True, values=False))
        if not self.keys:
            raise DataError(f"{'LevelDB' if backend == DB.LEVELDB else 'LMDB'} {str(self.path)!r} holds no records")

    def __len__(self) -> int:
        return len(self.keys)

    def raw(self, indices: list[int] | np.ndarray) -> list[bytes]:
        """The serialized Datums at `indices` (wrapping around)."""
        keys = [self.keys[i] for i in (np.asarray(indices, dtype=np.int64) % len(self.keys)).tolist()]
        if self.backend == DB.LEVELDB:
            return [self.db.get(k) for k in keys]
        with self.db.begin(buffers=False) as txn:
            return [txn.get(k) for k in keys]

    def datums(self, indices: list[int] | np.ndarray) -> list[caffe_pb2.Datum]:
        """The parsed Datums at `indices` (wrapping around)."""
        try:
            return [caffe_pb2.Datum.FromString(r) for r in self.raw(indices)]
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError: a record that is no Datum
            raise DataError(f"{self.path}: a record is not a Caffe Datum ({exc}); is this the database the "
                            "Data layer was built for?") from None

    def read(self, indices: list[int] | np.ndarray, color: bool | None = None
             ) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
        """The Datums at `indices` as (N, C, H, W) data (a list of (C, H, W) if sizes differ) and (N,) labels."""
        datums = self.datums(indices)
        n = len(datums)
        labels = np.fromiter((d.label for d in datums), dtype=np.float32, count=n)
        first = datums[0]
        shape = (first.channels, first.height, first.width, False)
        if all((d.channels, d.height, d.width, d.encoded) == shape for d in datums):
            joined = b"".join([d.data for d in datums])  # raw bytes: the whole batch in one array
            if len(joined) == n * first.channels * first.height * first.width:
                return np.frombuffer(joined, dtype=np.uint8).reshape(n, *shape[:3]), labels
        arrays = [_datum_array(d, color, f"{self.path} record {self.keys[i % len(self.keys)]!r}")
                  for d, i in zip(datums, indices)]
        # records of different sizes: Caffe's transformer accepts them only with crop_size, and says so
        return (np.stack(arrays) if len({a.shape for a in arrays}) == 1 else arrays), labels


def first_datum_shape(source: str | os.PathLike[str], backend: int = DB.LMDB,
                      color: bool | None = None) -> tuple[int, int, int]:
    """(channels, height, width) of the first record, as the Data layer shapes its top (decoded if encoded)."""
    data, _ = DatumDB(source, backend).read([0], color)
    c, h, w = data[0].shape
    return int(c), int(h), int(w)


class DataLayerSource:
    """A Data layer: Datums in key order through the layer's DataTransformer, labels as float.

    `rand_skip` starts at a random record in [0, rand_skip) (seeded with (seed, layer)), as
    Caffe's Data layer did before 1.0 (1.0's rewritten Data layer no longer reads the field).
    """

    def __init__(self, layer: caffe_pb2.LayerParameter, train: bool, seed: int, salt: int) -> None:
        p = layer.data_param
        self.where = f"layer {layer.name!r} (Data)"
        if p.batch_size <= 0:
            raise DataError(f"{self.where}: data_param.batch_size must be positive, got {p.batch_size}")
        self.tops = list(layer.top)
        self.batch_size = int(p.batch_size)
        self.seed, self.salt = seed, salt
        self.transformer = DataTransformer(layer.transform_param, train, self.where)
        with self._named():
            self.db = DatumDB(p.source, p.backend)
            self.color = self.transformer.decode_color() if self.db.datums([0])[0].encoded else None
            first, _ = self.db.read([0], self.color)
        self.skip = int(np.random.default_rng((seed, salt, 1)).integers(p.rand_skip)) if p.rand_skip else 0
        sample = first[0].shape
        self.shapes = {self.tops[0]: (self.batch_size, *self.transformer.output_shape(sample))}
        if len(self.tops) > 1:
            self.shapes[self.tops[1]] = (self.batch_size,)

    @contextmanager
    def _named(self) -> Iterator[None]:
        """Errors of the database, prefixed with this layer's name (unless they name it already)."""
        try:
            yield
        except (InputFileError, DataError) as exc:
            if str(exc).startswith(self.where):
                raise
            raise type(exc)(f"{self.where}: {exc}") from None

    @property
    def samples(self) -> dict[str, int]:
        """How many records the database holds (for each top)."""
        return {t: len(self.db) for t in self.tops}

    def indices(self, index: int) -> np.ndarray:
        """The records (0-based, key order) batch `index` reads."""
        return (self.skip + index * self.batch_size + np.arange(self.batch_size)) % len(self.db)

    def batch(self, index: int) -> dict[str, np.ndarray]:
        """Batch number `index`: the data top transformed, the label top as float (Caffe's blobs are float)."""
        with self._named():
            data, labels = self.db.read(self.indices(index), self.color)
        out = {self.tops[0]: self.transformer(data, np.random.default_rng((self.seed, self.salt, 0, index)))}
        if len(self.tops) > 1:
            out[self.tops[1]] = labels
        return out
