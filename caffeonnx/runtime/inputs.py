"""Sample arrays for batch encoding, memory-mapped so inputs larger than RAM stream.

Formats are recognised by content, not extension:
- `.npy`: mapped with `np.load(mmap_mode="r")`;
- `.npz`: a member stored uncompressed (`np.savez`) is mapped in place inside the
  zip; a deflated one (`np.savez_compressed`) is first inflated, streaming, to a
  scratch `.npy` that is then mapped;
- IDX (the MNIST format: 2 zero bytes, a type code, the rank, big-endian uint32
  dims, then big-endian data): mapped after the header;
- gzip of any of these: inflated, streaming, to a scratch file that is then mapped.
Scratch files live in `scratch_dir` and are removed when the `open_samples` block ends.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import numpy as np

from caffeonnx.errors import InputFileError

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_GZIP_MAGIC = b"\x1f\x8b"
IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # the fixed 30 bytes before a member's name


def _head(path: Path, n: int = 8) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def _inflate(src: Path, opener: Callable[[Path], contextlib.AbstractContextManager[IO[bytes]]], scratch: Path, what: str) -> Path:
    """Stream-decompress `src` (opened with `opener`) into a scratch file; returns its path."""
    fd, tmp = tempfile.mkstemp(prefix=".caffeonnx-", suffix=".raw", dir=scratch)
    try:
        with os.fdopen(fd, "wb") as out, opener(src) as stream:
            shutil.copyfileobj(stream, out, 1 << 20)
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
        os.unlink(tmp)
        raise InputFileError(f"{what}: cannot decompress ({exc}); is the file truncated?") from None
    return Path(tmp)


def _map_npy(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise InputFileError(f"{what}: not a numeric .npy array ({exc})") from None


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
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size < need:
        raise InputFileError(f"{what}: IDX header says shape {list(shape)} ({need} bytes) but the file has {size} bytes")
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


def _map_npz(path: Path, key: str | None, scratch: Path, what: str) -> tuple[np.ndarray, Path | None]:
    """Map one array of an .npz (in place when stored, via a scratch .npy when deflated)."""
    try:
        info = _npz_member(path, key, what)
    except zipfile.BadZipFile as exc:
        raise InputFileError(f"{what}: not a readable .npz ({exc})") from None
    name = info.filename.removesuffix(".npy")
    header = _stored_npy_header(path, info) if info.compress_type == zipfile.ZIP_STORED else None
    if header is None:  # deflated, or a header version numpy has no public reader for
        tmp = _inflate(path, lambda p: _member_stream(p, info), scratch, f"{what}[{name!r}]")
        return _map_npy(tmp, f"{what}[{name!r}]"), tmp
    shape, fortran, dtype, offset = header
    if dtype.hasobject:
        raise InputFileError(f"{what}[{name!r}] holds Python objects, not numbers")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"), None


def _stored_npy_header(path: Path, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], bool, np.dtype, int] | None:
    """Shape, order, dtype and file offset of the data of an uncompressed .npy member."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        fields = _ZIP_LOCAL_HEADER.unpack(fh.read(_ZIP_LOCAL_HEADER.size))
        fh.seek(fields[-2] + fields[-1], os.SEEK_CUR)  # skip the name and the extra field
        if fh.read(6) != _NPY_MAGIC:
            return None
        fh.seek(-6, os.SEEK_CUR)
        reader = readers.get(np.lib.format.read_magic(fh))
        if reader is None:
            return None
        shape, fortran, dtype = reader(fh)
        return shape, fortran, dtype, fh.tell()


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
    temps: list[Path] = []
    try:
        head = _head(src)
        if head[:2] == _GZIP_MAGIC:
            src = _inflate(src, gzip.open, scratch, what)
            temps.append(src)
            head = _head(src)
        if head[:6] == _NPY_MAGIC:
            array = _map_npy(src, what)
        elif head[:4] == _ZIP_MAGIC:
            array, tmp = _map_npz(src, key, scratch, what)
            temps += [tmp] if tmp else []
        else:
            array = _map_idx(src, what)
        if key is not None and head[:4] != _ZIP_MAGIC:
            raise InputFileError(f"--key {key!r} applies to .npz inputs only; {what} holds one array")
        if array.ndim == 0 or array.shape[0] == 0:
            raise InputFileError(f"{what}: expected samples along the first axis, got shape {array.shape}")
        yield array
    finally:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
