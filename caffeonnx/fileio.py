"""Atomic file output: a failed command never leaves a partial file behind.

Every file caffeonnx writes goes through `atomic_path` (directly, or via `atomic_write`):
a temporary file beside the target, given the permissions `open()` would give a new file
(0666 minus the umask, where mkstemp makes 0600), renamed over the target on success; a
device or FIFO target is written through instead.  Commands call `check_output` on their
targets before doing any work.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from caffeonnx.errors import CaffeOnnxError


def physical_memory() -> int:
    """Physical memory of this machine in bytes (a generous stand-in where sysconf cannot tell)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 64 * 2**30


def current_umask() -> int:
    """The process umask, read without setting it (os.umask(0) briefly exposes other threads' new files)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc (macOS): the only portable way to read it
    os.umask(mask)
    return mask


def _special(target: Path) -> bool:
    """Whether `target` exists and is a device or a FIFO: written through, never renamed over."""
    try:
        mode = target.stat().st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)


def check_output(path: str | os.PathLike[str], what: str = "-o", inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Check an output target before any work is done, with one clear error.

    Refused: an empty name, a directory, a socket, a parent that is a file or not writable, and a
    target that is one of the command's own inputs (it would be replaced by what is read from it).
    A device or FIFO (e.g. /dev/null) is accepted: the result is written through to it.
    """
    text = os.fspath(path)
    if not text:
        raise CaffeOnnxError(f"{what} is empty; give a file name to write")
    target = Path(text)
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        mode = None
    except NotADirectoryError:
        raise CaffeOnnxError(f"{what} {text!r}: a part of the path is a file, not a directory") from None
    except OSError as exc:
        raise CaffeOnnxError(f"{what} {text!r}: cannot be used ({exc.strerror})") from None
    for source in inputs:
        same = Path(source).resolve() == target.resolve()
        if not same and mode is not None:
            with contextlib.suppress(OSError):
                same = os.path.samefile(source, target)
        if same:
            raise CaffeOnnxError(f"{what} {text!r} is also {os.fspath(source)!r}, another file of this command; "
                                 "write to another file (an input would be replaced by what is read from it)")
    if mode is not None:
        if stat.S_ISDIR(mode):
            raise CaffeOnnxError(f"{what} {text!r} is a directory; give a file name inside it")
        if stat.S_ISSOCK(mode):
            raise CaffeOnnxError(f"{what} {text!r} is a socket; give a file name")
        if not stat.S_ISREG(mode):
            return target
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CaffeOnnxError(f"{what} {text!r}: {str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CaffeOnnxError(f"{what} {text!r}: the directory {str(parent)!r} is not writable; write elsewhere")
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file name beside `path`; it replaces `path` only if the block succeeds.

    For writers that need a name rather than a file object (numpy memmaps, file copies).
    A device or FIFO target is never renamed over (that would replace /dev/null with a
    regular file): the finished temporary file is copied into it, then removed.
    """
    target = Path(path)
    special = _special(target)
    where = Path(tempfile.gettempdir()) if special else target.parent
    where.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=where)
    tmp = Path(name)
    try:
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
        finally:
            os.close(fd)
        yield tmp
        if special:
            with open(tmp, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            tmp.unlink()
            return
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces `path` only if the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        yield fh


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_write(path) as fh:
        fh.write(data)
