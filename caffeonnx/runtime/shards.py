"""Codes as Parquet files and as directories of shards with a manifest.

`caffeonnx encode --engine ray` writes them (`CodeWriter`), and `open_inputs` reads them back as
samples for either engine (`ParquetRows`, `ShardRows`), so one encoder's codes can feed another.

A directory output (`-o codes/`) holds shards of `shard_rows` rows each, in input order, named
`codes-00000.npy`... (or `.parquet`), and `manifest.json`::

    {"format": "caffeonnx-codes", "version": 1, "rows": N, "dtype": "float32", "shape": [8],
     "shards": [{"file": "codes-00000.npy", "rows": R, "first_row": 0}, ...],
     "source": {"path": ..., "kind": ..., "key": ...}, "model": {"path": ..., "sha256": ...},
     "transform": "...", "scale": 0.0039}

A Parquet file holds an `id` column (the input row, int64) and a `code` column: a
fixed_size_list<dtype>[D] for a vector code, Arrow's canonical fixed_shape_tensor for a code of
several dims, a plain column for a scalar; the manifest's fields (without shards) are in its
schema metadata under b"caffeonnx".  A directory is replaced as a whole (`atomic_dir`): it is
filled under a temporary sibling name and renamed over the target only when complete.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from caffeonnx.errors import CaffeOnnxError, InputFileError
from caffeonnx.fileio import check_output, current_umask
from caffeonnx.runtime.inputs import Samples, _map_npy, check_real_dtype, lock_scratch, remove_stale

MANIFEST = "manifest.json"
FORMAT = "caffeonnx-codes"
FORMATS = ("npy", "parquet")
ROW_GROUP_ROWS = 1 << 16  # Parquet row groups: large enough to compress well, small enough to buffer
OPEN_SHARDS = 8  # shards a reader keeps mapped/open at once


def _parquet() -> Any:
    """pyarrow.parquet, or one clear error saying how to install it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CaffeOnnxError("Parquet needs pyarrow, which is not installed; pip install pyarrow "
                             "(it comes with caffeonnx[ray])") from None
    return pq


def _natural(name: str) -> list[Any]:
    """Sort key putting part-2 before part-10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------- reading


def _arrow_layout(field: Any, what: str) -> tuple[np.dtype, tuple[int, ...]]:
    """The numpy dtype and per-row shape of a Parquet column encode can read."""
    import pyarrow as pa

    t, shape = field.type, []
    if isinstance(t, pa.FixedShapeTensorType):
        if list(t.permutation or range(len(t.shape))) != list(range(len(t.shape))):
            raise InputFileError(f"{what}: column {field.name!r} is a tensor with permuted dims {t.permutation}; "
                                 "encode reads row-major tensors")
        shape, t = [int(d) for d in t.shape], t.value_type
    while pa.types.is_fixed_size_list(t):
        shape.append(int(t.list_size))
        t = t.value_type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        raise InputFileError(f"{what}: column {field.name!r} is {field.type}; encode reads numbers, fixed-size lists "
                             "of numbers or fixed-shape tensors (one sample per row)")
    dtype = np.dtype(t.to_pandas_dtype())
    check_real_dtype(dtype, f"{what}[{field.name!r}]")
    return dtype, tuple(shape)


def _arrow_numpy(array: Any, shape: tuple[int, ...], dtype: np.dtype, what: str) -> np.ndarray:
    """One chunk of a column as an (N, *shape) array (nulls refused: a sample has no missing values)."""
    import pyarrow as pa

    rows = len(array)
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    while True:
        if array.null_count:
            raise InputFileError(f"{what}: the column holds null values; every sample needs all its values")
        if not pa.types.is_fixed_size_list(array.type):
            break
        array = array.flatten()  # respects the chunk's offset
    return array.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape((rows, *shape))


class ParquetRows:
    """One column of a Parquet file as rows, read one row group at a time (the last one kept)."""

    def __init__(self, path: str | os.PathLike[str], key: str | None = None) -> None:
        import pyarrow as pa

        pq = _parquet()
        self.path, self.what = Path(path), str(path)
        try:
            self.file = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as exc:
            raise InputFileError(f"{self.what}: not a readable Parquet file ({exc})") from None
        schema = self.file.schema_arrow
        if key is not None:
            if key not in schema.names:
                raise InputFileError(f"{self.what} has no column {key!r}; it holds {schema.names}")
            name = key
        else:
            named = [n for n in schema.names if n != "id"]  # `id` is the row index encode writes beside the code
            if len(named) != 1:
                raise InputFileError(f"{self.what} holds columns {schema.names}; choose one with --key NAME")
            name = named[0]
        self.column = name
        self.dtype, sample = _arrow_layout(schema.field(name), self.what)
        meta = self.file.metadata
        self.offsets = np.cumsum([0, *(meta.row_group(i).num_rows for i in range(meta.num_row_groups))])
        self.shape = (int(meta.num_rows), *sample)
        self._group: tuple[int, np.ndarray] | None = None

    def _read_group(self, i: int) -> np.ndarray:
        import pyarrow as pa

        if self._group is None or self._group[0] != i:
            try:
                table = self.file.read_row_group(i, columns=[self.column])
            except (pa.ArrowException, OSError) as exc:
                raise InputFileError(f"{self.what}: row group {i} cannot be read ({exc}); is the file damaged?") \
                    from None
            chunks = [_arrow_numpy(c, self.shape[1:], self.dtype, f"{self.what}[{self.column!r}]")
                      for c in table.column(0).chunks]
            self._group = i, (np.concatenate(chunks) if chunks else np.empty((0, *self.shape[1:]), self.dtype))
        return self._group[1]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        parts = []
        for i in range(len(self.offsets) - 1):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            if start < hi and stop > lo:
                parts.append(self._read_group(i)[max(start, lo) - lo:min(stop, hi) - lo])
        return np.concatenate(parts) if parts else np.empty((0, *self.shape[1:]), self.dtype)


def is_shard_dir(path: Path) -> bool:
    """A directory with a manifest, or with .npy or .parquet files (shards in name order)."""
    if (path / MANIFEST).is_file():
        return True
    with os.scandir(path) as entries:
        return any(e.name.endswith((".npy", ".parquet")) and e.is_file() for e in entries)


def _open_shard(path: Path, key: str | None) -> Samples:
    """One shard's rows: a mapped .npy or a Parquet column."""
    if path.suffix == ".parquet":
        return ParquetRows(path, key)
    if key is not None:
        raise InputFileError(f"--key {key!r} applies to Parquet shards only; {path.parent} holds .npy shards")
    if not path.is_file():
        raise InputFileError(f"{path}: the shard is missing")
    array = _map_npy(path, str(path))
    if array.ndim == 0:
        raise InputFileError(f"{path}: a scalar, not rows of samples")
    return array


def _manifest_shards(directory: Path) -> tuple[list[tuple[str, int]], np.dtype, tuple[int, ...]]:
    """Shard names and rows, dtype and per-row shape from `manifest.json`, checked."""
    what = str(directory / MANIFEST)
    try:
        doc = json.loads((directory / MANIFEST).read_text())
        dtype = np.dtype(doc["dtype"])
        shape = tuple(int(d) for d in doc["shape"])
        shards = [(str(s["file"]), int(s["rows"])) for s in doc["shards"]]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InputFileError(f"{what}: not a shard manifest ({type(exc).__name__}: {exc}); it needs dtype, shape "
                             "and shards [{file, rows}]") from None
    check_real_dtype(dtype, what)
    for name, rows in shards:
        if Path(name).name != name or name in ("", ".", "..") or not name.endswith((".npy", ".parquet")) or rows < 0:
            raise InputFileError(f"{what}: shard {name!r} with {rows} rows is not a .npy or .parquet file of this "
                                 "directory with a row count")
    if not shards or any(d < 0 for d in shape):
        raise InputFileError(f"{what}: lists no shards, or a negative shape {list(shape)}")
    return shards, dtype, shape


class ShardRows:
    """A directory of .npy or Parquet shards as one array of rows, each shard opened when first read.

    With a manifest the shards are opened (and checked against it) only when read, so whoever reads
    a range opens just the shards it needs; without one every shard's header is read here.
    """

    def __init__(self, directory: str | os.PathLike[str], key: str | None = None) -> None:
        self.directory, self.key = Path(directory), key
        self._open: OrderedDict[int, Samples] = OrderedDict()
        if (self.directory / MANIFEST).is_file():
            shards, self.dtype, sample = _manifest_shards(self.directory)
            self.checked: set[int] = set()
        else:
            shards, self.dtype, sample = self._scan()
            self.checked = set(range(len(shards)))
        self.files = [name for name, _ in shards]
        self.offsets = np.cumsum([0, *(rows for _, rows in shards)])
        self.shape = (int(self.offsets[-1]), *sample)
        kinds = sorted({Path(f).suffix[1:] for f in self.files})
        self.kind = f"directory of {len(self.files)} {'/'.join(kinds)} shard(s)"

    def _scan(self) -> tuple[list[tuple[str, int]], np.dtype, tuple[int, ...]]:
        names = sorted((p.name for p in self.directory.iterdir() if p.is_file() and p.suffix in (".npy", ".parquet")),
                       key=_natural)
        if len({Path(n).suffix for n in names}) > 1:
            raise InputFileError(f"{self.directory}: holds both .npy and .parquet files; shards are of one format "
                                 f"(write a {MANIFEST} listing them, or keep one kind)")
        shards, layouts = [], set()
        for name in names:
            rows = _open_shard(self.directory / name, self.key)
            shards.append((name, int(rows.shape[0])))
            layouts.add((tuple(rows.shape[1:]), np.dtype(rows.dtype)))
        if len(layouts) > 1:
            raise InputFileError(f"{self.directory}: the shards hold samples of different shapes or types "
                                 f"{sorted((list(s), str(d)) for s, d in layouts)}; they must be one array split by rows")
        sample, dtype = layouts.pop()
        return shards, dtype, sample

    def _shard(self, k: int) -> Samples:
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        path = self.directory / self.files[k]
        rows = _open_shard(path, self.key)
        want = (int(self.offsets[k + 1] - self.offsets[k]), *self.shape[1:])
        if k not in self.checked and (tuple(rows.shape) != want or np.dtype(rows.dtype) != self.dtype):
            raise InputFileError(f"{path}: holds {list(rows.shape)} {rows.dtype} but {MANIFEST} says {list(want)} "
                                 f"{self.dtype}; was the shard changed after the manifest was written?")
        self.checked.add(k)
        self._open[k] = rows
        while len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)
        return rows

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        first = max(0, int(np.searchsorted(self.offsets, start, side="right")) - 1)
        parts = []
        for k in range(first, len(self.files)):
            lo, hi = int(self.offsets[k]), int(self.offsets[k + 1])
            if lo >= stop:
                break
            if hi > start:
                parts.append(np.asarray(self._shard(k)[max(start, lo) - lo:min(stop, hi) - lo]))
        return np.concatenate(parts) if parts else np.empty((0, *self.shape[1:]), self.dtype)


# ---------------------------------------------------------------- writing


def shard_name(k: int, count: int, fmt: str) -> str:
    """codes-00000.npy...: zero-padded so that name order is row order."""
    return f"codes-{k:0{max(5, len(str(count - 1)))}d}.{fmt}"


def _code_type(dtype: np.dtype, shape: tuple[int, ...]) -> Any:
    """The Arrow type of the code column: plain for a scalar, fixed_size_list for a vector, else a tensor."""
    import pyarrow as pa

    value = pa.from_numpy_dtype(dtype)
    if not shape:
        return value
    return pa.list_(value, shape[0]) if len(shape) == 1 else pa.fixed_shape_tensor(value, list(shape))


def _code_column(codes: np.ndarray) -> Any:
    """The codes of a batch as an Arrow array: plain, fixed_size_list, or fixed_shape_tensor."""
    import pyarrow as pa

    if codes.ndim == 1:
        return pa.array(codes)
    if codes.ndim == 2:
        return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(codes).reshape(-1)), codes.shape[1])
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(codes))


def _dtype_name(dtype: np.dtype) -> str:
    """float32, uint8...: numpy's name in native byte order, else its exact code (>f4)."""
    return dtype.name if dtype.isnative else dtype.str


class _NpyShard:
    def __init__(self, path: Path, rows: int, dtype: np.dtype, shape: tuple[int, ...], info: dict) -> None:
        self.out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows, *shape))
        self.done = 0

    def write(self, ids: np.ndarray, codes: np.ndarray) -> None:
        self.out[self.done:self.done + len(codes)] = codes
        self.done += len(codes)

    def close(self) -> None:
        self.out.flush()
        del self.out


class _ParquetShard:
    def __init__(self, path: Path, rows: int, dtype: np.dtype, shape: tuple[int, ...], info: dict) -> None:
        import pyarrow as pa

        pq = _parquet()
        self.schema = pa.schema([("id", pa.int64()), ("code", _code_type(dtype, shape))],
                                metadata={b"caffeonnx": json.dumps(info).encode()})
        # no dictionary encoding: ids are unique and codes are floats that rarely repeat (it costs 3x the time)
        self.writer = pq.ParquetWriter(path, self.schema, use_dictionary=False)
        self.pending: list[Any] = []
        self.buffered = 0

    def write(self, ids: np.ndarray, codes: np.ndarray) -> None:
        import pyarrow as pa

        self.pending.append(pa.record_batch([pa.array(ids, pa.int64()), _code_column(codes)], schema=self.schema))
        self.buffered += len(codes)
        if self.buffered >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.pending:
            self.writer.write_table(pa.Table.from_batches(self.pending, self.schema), row_group_size=ROW_GROUP_ROWS)
        self.pending, self.buffered = [], 0

    def close(self) -> None:
        self._flush()
        self.writer.close()


class CodeWriter:
    """Codes arriving in row order, written as one .npy / .parquet file or as shards plus a manifest.

    `where` is the temporary file (a file output) or the temporary directory (a directory output); `info` the
    provenance recorded in the manifest / Parquet metadata (source, model hash, transform).
    """

    def __init__(self, where: Path, fmt: str, directory: bool, rows: int, shard_rows: int, info: dict) -> None:
        if fmt not in FORMATS:
            raise CaffeOnnxError(f"--format must be npy or parquet, got {fmt!r}")
        self.where, self.fmt, self.directory, self.rows, self.info = where, fmt, directory, rows, info
        self.shard_rows = shard_rows if directory else max(rows, 1)
        self.count = max(1, math.ceil(rows / self.shard_rows))
        self.done = 0
        self.shards: list[dict[str, Any]] = []
        self.layout: tuple[np.dtype, tuple[int, ...]] | None = None
        self.current: _NpyShard | _ParquetShard | None = None

    def _meta(self) -> dict[str, Any]:
        assert self.layout is not None
        return {"format": FORMAT, "version": 1, "rows": self.rows, "dtype": _dtype_name(self.layout[0]),
                "shape": list(self.layout[1]), **self.info}

    def add(self, ids: np.ndarray, codes: np.ndarray) -> None:
        """The next rows' codes; `ids` (their input rows) must continue where the last batch stopped."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) != len(codes) or not np.array_equal(ids, np.arange(self.done, self.done + len(ids))):
            raise RuntimeError(f"codes arrived out of input order: rows {ids[:3].tolist()}... where row {self.done} "
                               "was next")
        if self.done + len(codes) > self.rows:
            raise CaffeOnnxError(f"the encoder returned more than the {self.rows} codes asked for")
        if self.layout is None:
            self.layout = np.dtype(codes.dtype), tuple(int(d) for d in codes.shape[1:])
        while len(codes):
            if self.current is None:
                self._open_shard()
            assert self.current is not None
            room = self.shards[-1]["rows"] - self.current_rows
            take = min(room, len(codes))
            self.current.write(ids[:take], codes[:take])
            self.current_rows += take
            self.done += take
            ids, codes = ids[take:], codes[take:]
            if self.current_rows == self.shards[-1]["rows"]:
                self.current.close()
                self.current = None

    def _open_shard(self) -> None:
        k = len(self.shards)
        rows = min(self.shard_rows, self.rows - k * self.shard_rows)
        name = shard_name(k, self.count, self.fmt)
        path = self.where / name if self.directory else self.where
        maker = _NpyShard if self.fmt == "npy" else _ParquetShard
        assert self.layout is not None
        self.current = maker(path, rows, self.layout[0], self.layout[1], self._meta())
        self.current_rows = 0
        self.shards.append({"file": name, "rows": rows, "first_row": k * self.shard_rows})

    def finish(self) -> tuple[int, ...]:
        """Close the last shard and write the manifest; the per-row code shape."""
        if self.layout is None or self.done != self.rows:
            raise CaffeOnnxError(f"the encoder returned {self.done} codes for {self.rows} samples")
        if self.current is not None:
            self.current.close()
            self.current = None
        if self.directory:
            doc = {**self._meta(), "shards": self.shards}
            (self.where / MANIFEST).write_text(json.dumps(doc, indent=1) + "\n")
        return self.layout[1]


# ---------------------------------------------------------------- directory outputs


def check_output_dir(path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """A directory target checked before any work: new, empty, or an earlier codes directory (it is replaced)."""
    target = Path(path)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise CaffeOnnxError(f"-o {os.fspath(path)!r} exists and is not a directory; a trailing '/' asks for a "
                             "directory of shards: remove it or give another name")
    check_output(target / MANIFEST, f"-o {os.fspath(path)!r}", inputs)  # parent writable, not an input
    for source in inputs:
        with contextlib.suppress(OSError):
            if target.resolve() in Path(source).resolve().parents or target.resolve() == Path(source).resolve():
                raise CaffeOnnxError(f"-o {os.fspath(path)!r} holds {os.fspath(source)!r}, an input of this command; "
                                     "write to another directory")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise CaffeOnnxError(f"-o {os.fspath(path)!r} is a directory without {MANIFEST} (not an earlier encode "
                             "output); it would be replaced: remove it or give another name")
    return target


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; it replaces `target` (an earlier output) only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        lock_scratch(fd)  # in use: another encode's cleanup of killed runs leaves it alone
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
        if target.is_dir() and any(target.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
            os.replace(target, old)  # an empty directory is replaced by a rename; a full one is moved aside
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def remove_stale_dirs(target: Path, before: float) -> list[Path]:
    """Remove temporary directories that killed encodes into `target` left (older than `before`, not locked)."""
    own = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.tmp")
    return remove_stale(target.parent, own, before, directories=True)

