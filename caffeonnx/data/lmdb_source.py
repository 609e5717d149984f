"""Caffe LMDB databases of `Datum` records, as Caffe's Data layer reads them.

Records are taken in key order (Caffe's cursor order).  A Datum holds either raw bytes
(`data`, uint8, C×H×W) or `float_data`; JPEG/PNG-encoded Datums (`encoded: true`) are
refused with a message, since decoding them needs an image library.
"""
from __future__ import annotations

import os
from pathlib import Path

import lmdb
import numpy as np

from caffeonnx.errors import DataError, InputFileError
from caffeonnx.proto import caffe_pb2

_ENVS: dict[Path, lmdb.Environment] = {}  # LMDB allows one open environment per file and process


def _open_env(path: Path) -> lmdb.Environment:
    key = path.resolve()
    if key in _ENVS:
        return _ENVS[key]
    if not path.exists():
        raise InputFileError(f"LMDB {str(path)!r} does not exist; check the Data layer's source (Caffe reads it "
                             "relative to the current directory)")
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=path.is_dir())
    except lmdb.Error as exc:
        raise InputFileError(f"{path}: not a readable LMDB ({exc})") from None
    _ENVS[key] = env
    return env


def _decode(raw: bytes, where: str) -> tuple[np.ndarray, int]:
    """One Datum as a (C, H, W) array (uint8 or float32) and its label."""
    datum = caffe_pb2.Datum.FromString(raw)
    if datum.encoded:
        raise DataError(f"{where}: the Datum is JPEG/PNG-encoded; re-create the LMDB without --encoded "
                        "(convert_imageset) or feed the images with --data")
    shape = (datum.channels, datum.height, datum.width)
    if datum.data:
        arr = np.frombuffer(datum.data, dtype=np.uint8)
    else:
        arr = np.asarray(datum.float_data, dtype=np.float32)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"{where}: the Datum says {list(shape)} but holds {arr.size} values")
    return arr.reshape(shape), int(datum.label)


class DatumDB:
    """Random access to the Datums of one LMDB, in Caffe's cursor order."""

    def __init__(self, source: str | os.PathLike[str]) -> None:
        self.path = Path(source)
        self.env = _open_env(self.path)
        with self.env.begin() as txn:
            self.keys = [key for key, _ in txn.cursor()]
        if not self.keys:
            raise DataError(f"LMDB {str(self.path)!r} holds no records")

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The Datums at `indices` (wrapping around) as (N, C, H, W) data and (N,) labels."""
        data, labels = [], []
        with self.env.begin() as txn:
            for i in indices:
                key = self.keys[i % len(self.keys)]
                arr, label = _decode(txn.get(key), f"{self.path} record {key!r}")
                data.append(arr)
                labels.append(label)
        shapes = {a.shape for a in data}
        if len(shapes) > 1:
            raise DataError(f"{self.path}: records have different shapes {sorted(shapes)}; Caffe's Data layer needs one")
        return np.stack(data), np.asarray(labels, dtype=np.float32)


def first_datum_shape(source: str | os.PathLike[str]) -> tuple[int, int, int]:
    """(channels, height, width) of the first record, as the Data layer shapes its top."""
    db = DatumDB(source)
    arr, _ = db.read([0])
    c, h, w = arr.shape[1:]
    return int(c), int(h), int(w)
