"""Sample arrays for batch encoding, memory-mapped so inputs larger than RAM stream.

Formats are recognised by content, not extension:
- `.npy`: mapped with `np.load(mmap_mode="r")`;
- `.npz`: a member stored uncompressed (`np.savez`) is mapped in place inside the
  zip; a deflated one (`np.savez_compressed`) is first inflated, streaming, to a
  scratch `.npy` that is then mapped;
- IDX (the MNIST format: 2 zero bytes, a type code, the rank, big-endian uint32
  dims, then big-endian data): mapped after the header;
- gzip of any of these: inflated, streaming, to a scratch file that is then mapped.
Scratch files live in `scratch_dir` and are removed when the `open_samples` block ends;
while in use they hold an flock, so a later run can tell a killed run's leftovers
(`remove_stale`) from a live run's files.
Every array header is checked before anything is mapped (`check_layout`): dims
non-negative and at most MAX_DIMS, the data no larger than the file holds (in exact
integers, so lying headers cannot overflow), and real numbers only (`check_real_dtype`).

`open_inputs` also reads what Caffe's data layers read, lazily (rows are read per batch,
so these stream too), with the readers of `caffeonnx train` (caffeonnx/data):
- an LMDB of Datums (a directory holding data.mdb, or the data file itself) or a
  LevelDB (a directory holding CURRENT; needs plyvel), Caffe's Data layer, records in
  key order, encoded Datums decoded as Caffe does;
- an HDF5 file (HDF5Data): the dataset named by --key, else the one named like the
  model's input blob (HDF5Data reads the dataset named after each top), else the only one;
- a list file of HDF5 paths (HDF5Data's `source`), their datasets concatenated;
- a list file of `path label` lines (ImageData's `source`), each image decoded as
  Caffe's OpenCV does (BGR order for colour, one channel for grey, C×H×W uint8), resized
  to new_height×new_width when the model's ImageData layer asks.
"""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import math
import os
import re
import shutil
import struct
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

import numpy as np

from caffeonnx.errors import InputFileError
from caffeonnx.proto import caffe_pb2

if TYPE_CHECKING:
    import h5py

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_GZIP_MAGIC = b"\x1f\x8b"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_LMDB_MAGIC = b"\xde\xc0\xef\xbe"  # MDB_MAGIC, little-endian, in the first meta page
IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # the fixed 30 bytes before a member's name
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
MAX_DIMS = 32  # numpy 1.x's NPY_MAXDIMS; samples of any model have far fewer
SCRATCH_PATTERN = re.compile(r"\.caffeonnx-[a-z0-9_]{8}\.raw")  # _inflate's mkstemp names
_NOT_REAL = {"c": "complex numbers, whose imaginary part would be dropped", "M": "datetimes", "m": "time deltas",
             "U": "text", "S": "byte strings", "O": "Python objects", "V": "raw records"}


def check_real_dtype(dtype: np.dtype, what: str) -> None:
    """Samples must be real numbers (bool, integers, floats): what a model's float input can take as values."""
    if dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "biuf":
        desc = "structured records" if dtype.fields is not None else _NOT_REAL.get(dtype.kind, "not numbers")
        fix = "np.real(a) or np.abs(a)" if dtype.kind == "c" else "a.astype(np.float32)"
        raise InputFileError(f"{what}: holds {dtype} values, {desc}; samples must be real numbers (bool, integers or "
                             f"floats): convert them first, e.g. with {fix}")


def check_layout(shape: Sequence[int], dtype: np.dtype, available: int | None, what: str) -> None:
    """Refuse a header that lies before anything is mapped: dims, dtype, and a size the file cannot hold
    (`available` bytes of data after the header; None: the caller checks the size)."""
    if len(shape) > MAX_DIMS:
        raise InputFileError(f"{what}: the header declares {len(shape)} dimensions; at most {MAX_DIMS} are supported "
                             "(the file is damaged or not samples)")
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise InputFileError(f"{what}: the header declares shape {list(shape)}; dimensions must be >= 0 (the file is "
                             "damaged)")
    check_real_dtype(dtype, what)
    need = math.prod(shape) * dtype.itemsize  # Python ints: a lying header cannot overflow this
    if available is not None and need > available:
        raise InputFileError(f"{what}: the header declares shape {list(shape)} of {dtype} ({need} bytes) but the file "
                             f"holds {max(available, 0)} bytes of data; is it truncated?")


def lock_scratch(fd: int) -> None:
    """Mark a scratch/temporary file as in use (an flock held until the fd is closed): `remove_stale` skips it."""
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def remove_stale(folder: Path, pattern: re.Pattern[str], before: float, directories: bool = False) -> list[Path]:
    """Remove files (or `directories`) of `folder` whose whole name matches `pattern`, older than `before`
    (a time) and not in use.

    In use means another process holds an flock on it (`lock_scratch`); symlinks and other kinds are left alone.
    """
    removed = []
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            kind_ok = entry.is_dir(follow_symlinks=False) if directories else entry.is_file(follow_symlinks=False)
            if not pattern.fullmatch(entry.name) or not kind_ok:
                continue
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime >= before:
                    continue
                fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | (os.O_DIRECTORY if directories else 0))
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a live run holds it
                    if directories:
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
                    removed.append(Path(entry.path))
                finally:
                    os.close(fd)
    return removed


def process_start_time() -> float:
    """When this process started (wall clock): /proc's start tick and boot time, else now."""
    with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK") - 1.0  # start ticks and btime are rounded
    return time.time()


def _head(path: Path, n: int = 8) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def _inflate(src: Path, opener: Callable[[Path], contextlib.AbstractContextManager[IO[bytes]]], scratch: Path,
             what: str, made: list[tuple[Path, int]]) -> Path:
    """Stream-decompress `src` (opened with `opener`) into a scratch file; returns its path.

    The file and its fd, locked while it is used, are appended to `made` at once: the caller removes and closes
    them whatever happens next.
    """
    fd, tmp = tempfile.mkstemp(prefix=".caffeonnx-", suffix=".raw", dir=scratch)
    made.append((Path(tmp), fd))
    lock_scratch(fd)
    try:
        with open(fd, "wb", closefd=False) as out, opener(src) as stream:
            shutil.copyfileobj(stream, out, 1 << 20)
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
        raise InputFileError(f"{what}: cannot decompress ({exc}); is the file truncated?") from None
    return Path(tmp)


def _read_npy_header(fh: IO[bytes], what: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of the .npy header at the file's position (left just after it)."""
    try:
        version = np.lib.format.read_magic(fh)
        reader = _NPY_HEADER_READERS.get(version)
        if reader is None:
            raise InputFileError(f"{what}: .npy format version {version} (structured records with non-Latin-1 field "
                                 "names) does not hold plain samples")
        return reader(fh)
    except (ValueError, SyntaxError, MemoryError) as exc:
        raise InputFileError(f"{what}: not a readable .npy header ({str(exc)[:200]})") from None


def _map_npy(path: Path, what: str) -> np.ndarray:
    """Map a .npy file after checking its header against the file's size."""
    with open(path, "rb") as fh:
        shape, fortran, dtype = _read_npy_header(fh, what)
        offset = fh.tell()
    check_layout(shape, dtype, path.stat().st_size - offset, what)
    if math.prod(shape) == 0:
        return np.empty(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _map_idx(path: Path, what: str) -> np.ndarray:
    """Map an IDX file (MNIST images/labels) after its header."""
    head = _head(path, 4)
    if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in IDX_TYPES or head[3] == 0:
        raise InputFileError(f"{what}: not an .npy, .npz or IDX file (first bytes {head!r})")
    dtype, ndim = IDX_TYPES[head[2]], head[3]
    with open(path, "rb") as fh:
        fh.seek(4)
        raw = fh.read(4 * ndim)
    if len(raw) < 4 * ndim:
        raise InputFileError(f"{what}: IDX header declares {ndim} dims but the file ends inside the header")
    shape = struct.unpack(f">{ndim}I", raw)
    offset = 4 + 4 * ndim
    check_layout(shape, dtype, None, what)
    need = offset + math.prod(shape) * dtype.itemsize
    size = path.stat().st_size
    if size < need:
        raise InputFileError(f"{what}: IDX header says shape {list(shape)} ({need} bytes) but the file has {size} "
                             "bytes")
    if math.prod(shape) == 0:
        return np.empty(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _npz_member(path: Path, key: str | None, what: str) -> zipfile.ZipInfo:
    with zipfile.ZipFile(path) as zf:
        members = {info.filename.removesuffix(".npy"): info for info in zf.infolist()}
    if key is None:
        if len(members) != 1:
            raise InputFileError(f"{what} holds arrays {sorted(members)}; choose one with --key NAME")
        return next(iter(members.values()))
    if key not in members:
        raise InputFileError(f"{what} has no array {key!r}; it holds {sorted(members)}")
    return members[key]


def _map_npz(path: Path, key: str | None, scratch: Path, what: str, made: list[tuple[Path, int]]) -> np.ndarray:
    """Map one array of an .npz (in place when stored, via a scratch .npy when deflated)."""
    try:
        info = _npz_member(path, key, what)
    except zipfile.BadZipFile as exc:
        raise InputFileError(f"{what}: not a readable .npz ({exc})") from None
    name = f"{what}[{info.filename.removesuffix('.npy')!r}]"
    header = _stored_npy_header(path, info, name) if info.compress_type == zipfile.ZIP_STORED else None
    if header is None:  # deflated, or not an .npy member
        return _map_npy(_inflate(path, lambda p: _member_stream(p, info), scratch, name, made), name)
    shape, fortran, dtype, offset, available = header
    check_layout(shape, dtype, available, name)
    if math.prod(shape) == 0:
        return np.empty(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _stored_npy_header(path: Path, info: zipfile.ZipInfo,
                       what: str) -> tuple[tuple[int, ...], bool, np.dtype, int, int] | None:
    """Shape, order, dtype, file offset and stored size of the data of an uncompressed .npy member."""
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        fields = _ZIP_LOCAL_HEADER.unpack(fh.read(_ZIP_LOCAL_HEADER.size))
        fh.seek(fields[-2] + fields[-1], os.SEEK_CUR)  # skip the name and the extra field
        start = fh.tell()
        if fh.read(6) != _NPY_MAGIC:
            return None
        fh.seek(-6, os.SEEK_CUR)
        shape, fortran, dtype = _read_npy_header(fh, what)
        offset = fh.tell()
        return shape, fortran, dtype, offset, min(start + info.compress_size, path.stat().st_size) - offset


@contextlib.contextmanager
def _member_stream(path: Path, info: zipfile.ZipInfo) -> Iterator[IO[bytes]]:
    """A readable stream of one zip member."""
    with zipfile.ZipFile(path) as zf, zf.open(info) as stream:
        yield stream


@contextlib.contextmanager
def open_samples(path: str | os.PathLike[str], key: str | None = None,
                 scratch_dir: str | os.PathLike[str] | None = None) -> Iterator[np.ndarray]:
    """Yield the samples of an .npy/.npz/IDX file (gzip allowed) as a read-only memory-mapped array."""
    src = Path(path)
    what = str(src)
    if not src.is_file():
        raise InputFileError(f"input {what!r} does not exist; check the path")
    scratch = Path(scratch_dir) if scratch_dir is not None else src.parent
    made: list[tuple[Path, int]] = []  # scratch files and their locked fds
    try:
        head = _head(src)
        if head[:2] == _GZIP_MAGIC:
            src = _inflate(src, gzip.open, scratch, what, made)
            head = _head(src)
        if head[:6] == _NPY_MAGIC:
            array = _map_npy(src, what)
        elif head[:4] == _ZIP_MAGIC:
            array = _map_npz(src, key, scratch, what, made)
        else:
            array = _map_idx(src, what)
        if key is not None and head[:4] != _ZIP_MAGIC:
            raise InputFileError(f"--key {key!r} applies to .npz inputs only; {what} holds one array")
        if array.ndim == 0 or array.shape[0] == 0:
            raise InputFileError(f"{what}: expected samples along the first axis, got shape {array.shape}")
        yield array
    finally:
        for tmp, fd in made:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.close(fd)


class Samples(Protocol):
    """Rows read on demand: what encode needs of an input (an ndarray, an h5py Dataset, a database)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    def __getitem__(self, rows: slice) -> np.ndarray: ...


@dataclass(frozen=True)
class ImageOptions:
    """How images are decoded: ImageData's image_data_param fields, and transform_param's force_color/force_gray
    for encoded Datums (None: as stored)."""

    is_color: bool = True
    new_height: int = 0
    new_width: int = 0
    root_folder: str = ""
    datum_color: bool | None = None


@dataclass(frozen=True)
class Inputs:
    """An opened input: its rows and what kind of file they came from (for messages)."""

    samples: Samples
    kind: str


def _one_size(images: np.ndarray | list[np.ndarray], what: str) -> np.ndarray:
    """A batch of decoded Datums as one (N, C, H, W) array, or an error naming the sizes."""
    if isinstance(images, np.ndarray):
        return images
    raise InputFileError(f"{what}: encoded images of different sizes {sorted({i.shape for i in images})}; encode "
                         "needs one size (re-create the LMDB with convert_imageset --resize_height/--resize_width)")


class _DatumRows:
    """The Datums of an LMDB or LevelDB as rows (N, C, H, W), decoded per slice."""

    def __init__(self, path: Path, color: bool | None, backend: int) -> None:
        from caffeonnx.data.lmdb_source import DatumDB

        self.db, self.color = DatumDB(path, backend), color
        first = _one_size(self.db.read([0], color)[0], str(path))
        self.shape = (len(self.db), *first.shape[1:])
        self.dtype = first.dtype

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        return _one_size(self.db.read(list(range(start, stop)), self.color)[0], str(self.db.path))


class _ConcatRows:
    """Several row sources of one sample shape and dtype (HDF5Data's list of files) as one."""

    def __init__(self, parts: Sequence[Samples], what: str) -> None:
        shapes = {tuple(p.shape[1:]) for p in parts}
        dtypes = {np.dtype(p.dtype) for p in parts}
        if len(shapes) > 1 or len(dtypes) > 1:
            raise InputFileError(f"{what}: the files hold samples of different shapes or types "
                                 f"{sorted(map(list, shapes))} {sorted(map(str, dtypes))}; Caffe needs one")
        self.parts = list(parts)
        self.offsets = np.cumsum([0, *(p.shape[0] for p in parts)])
        self.shape = (int(self.offsets[-1]), *shapes.pop())
        self.dtype = dtypes.pop()

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        chunks = []
        for part, lo, hi in zip(self.parts, self.offsets[:-1], self.offsets[1:]):
            if start < hi and stop > lo:
                chunks.append(np.asarray(part[max(start, lo) - lo:min(stop, hi) - lo]))
        return np.concatenate(chunks) if chunks else np.empty((0, *self.shape[1:]), self.dtype)


class _ImageRows:
    """The images of an ImageData list as rows (N, C, H, W) uint8, decoded per slice as `caffeonnx train` does."""

    def __init__(self, source: Path, options: ImageOptions) -> None:
        from caffeonnx.data.image_source import read_image_list

        self.what, self.options = str(source), options
        self.entries = read_image_list(str(source), f"image list {self.what!r}")
        first = self._load(0)
        self.shape = (len(self.entries), *first.shape)
        self.dtype = np.dtype(np.uint8)

    def _load(self, k: int) -> np.ndarray:
        from caffeonnx.data.image_source import read_image

        e, opts = self.entries[k], self.options
        return read_image(opts.root_folder + e.path, opts.new_height, opts.new_width, opts.is_color,
                          f"{self.what} line {e.line}")

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        images = [self._load(k) for k in range(start, stop)]
        sizes = {i.shape for i in images} | {self.shape[1:]}
        if len(sizes) > 1:
            raise InputFileError(f"{self.what}: images of different sizes {sorted(sizes)}; encode needs one size "
                                 "(resize them, or give the model's ImageData new_height/new_width)")
        return np.stack(images) if images else np.empty((0, *self.shape[1:]), self.dtype)


def _h5_dataset(h5file: h5py.File, key: str | None, blob: str | None, what: str) -> Samples:
    """The dataset of an open h5py File to encode (see the module docstring)."""
    import h5py

    names: list[str] = []
    h5file.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    if key is not None:
        if key not in names:
            raise InputFileError(f"{what} has no dataset {key!r}; it holds {names}")
        name = key
    elif blob in names:
        name = blob
    elif len(names) == 1:
        name = names[0]
    else:
        raise InputFileError(f"{what} holds datasets {names} and none is named like the model's input {blob!r}; "
                             "choose one with --key NAME")
    dataset = h5file[name]
    check_real_dtype(np.dtype(dataset.dtype), f"{what}[{name!r}]")
    if not dataset.shape or dataset.shape[0] == 0:
        raise InputFileError(f"{what}[{name!r}]: expected samples along the first axis, got shape {dataset.shape}")
    return dataset


@contextlib.contextmanager
def open_inputs(path: str | os.PathLike[str], key: str | None = None,
                scratch_dir: str | os.PathLike[str] | None = None, *, blob: str | None = None,
                images: ImageOptions | None = None) -> Iterator[Inputs]:
    """Open any input `caffeonnx train` reads (arrays, IDX, LMDB, HDF5, HDF5 and image lists) as lazy rows.

    `blob` is the model's input blob (the HDF5 dataset looked for); `images` how to decode an image list.
    """
    src = Path(path)
    what = str(src)
    opts = images or ImageOptions()
    if src.is_dir():
        if (src / "data.mdb").is_file():
            yield Inputs(_DatumRows(src, opts.datum_color, caffe_pb2.DataParameter.LMDB), "LMDB")
        elif (src / "CURRENT").is_file():
            yield Inputs(_DatumRows(src, opts.datum_color, caffe_pb2.DataParameter.LEVELDB), "LevelDB")
        else:
            from caffeonnx.runtime.shards import ShardRows, is_shard_dir

            if not is_shard_dir(src):
                raise InputFileError(f"input {what!r} is a directory without data.mdb (LMDB) or CURRENT (LevelDB), "
                                     "nor manifest.json or .npy/.parquet shards; pass a database, shards or a file")
            shards = ShardRows(src, key)
            yield Inputs(shards, shards.kind)
        return
    if not src.is_file():
        raise InputFileError(f"input {what!r} does not exist; check the path")
    head = _head(src, 20)
    if head[:8] == _HDF5_MAGIC:
        with _h5py_file(src, what) as h5:
            yield Inputs(_h5_dataset(h5, key, blob, what), "HDF5")
        return
    if head[:4] == b"PAR1":  # Parquet (e.g. codes written by encode --format parquet)
        from caffeonnx.runtime.shards import ParquetRows

        yield Inputs(ParquetRows(src, key), "Parquet file")
        return
    if head[16:20] == _LMDB_MAGIC:
        yield Inputs(_DatumRows(src, opts.datum_color, caffe_pb2.DataParameter.LMDB), "LMDB")
        return
    if head[:2] in (_GZIP_MAGIC, b"\0\0") or head[:6] == _NPY_MAGIC or head[:4] == _ZIP_MAGIC:
        with open_samples(src, key, scratch_dir) as array:
            yield Inputs(array, "array file")
        return
    start = _head(src, 1 << 16)
    if b"\0" in start or start[:2] == b"\xff\xfe":  # list files are text: no NUL bytes, not UTF-16
        raise InputFileError(f"{what}: not an .npy, .npz, IDX, HDF5 or LMDB file, nor a text list of HDF5 files "
                             "or of 'image label' lines")
    first = start.decode("utf-8", errors="replace").split(maxsplit=1)[:1]
    if first and Path(first[0]).is_file() and _head(Path(first[0])) == _HDF5_MAGIC:
        from caffeonnx.data.hdf5_source import read_hdf5_list

        files = read_hdf5_list(what, f"HDF5 list {what!r}")
        with contextlib.ExitStack() as stack:
            parts = [_h5_dataset(stack.enter_context(_h5py_file(Path(f), f"{what}: {f}")), key, blob, f"{what}: {f}")
                     for f in files]
            yield Inputs(_ConcatRows(parts, what), f"HDF5 list of {len(parts)} file(s)")
        return
    yield Inputs(_ImageRows(src, opts), "image list")


@contextlib.contextmanager
def _h5py_file(path: Path, what: str) -> Iterator[h5py.File]:
    """An h5py File opened read-only, or an InputFileError saying why not."""
    import h5py

    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise InputFileError(f"{what}: not a readable HDF5 file ({exc})") from None
    with h5:
        yield h5
