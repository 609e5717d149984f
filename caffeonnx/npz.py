"""User-supplied .npz files of arrays, read with one clear error for every way they can be damaged.

`verify` (inputs and reference blobs) and `train --data` read them; a truncated file, a bad
CRC, an array header that is not a Python literal, or arrays of complex, string, datetime or
object values each get one line naming the file (and the array), never a traceback.
"""
from __future__ import annotations

import math
import os
import tokenize
import zipfile
import zlib

import numpy as np

from caffeonnx.converter.caffe_io import check_input_file
from caffeonnx.errors import InputFileError
from caffeonnx.fileio import physical_memory


def _check_sizes(p: os.PathLike[str], what: str) -> None:
    """Refuse arrays whose headers ask for more than half this machine's memory, before any is allocated.

    A deflated .npz member can claim any shape in a few bytes (a zip bomb); numpy would allocate
    the whole array before finding the data short or reading gigabytes of zeros.
    """
    if not zipfile.is_zipfile(p):
        return
    budget = physical_memory() // 2
    total = 0
    with zipfile.ZipFile(p) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read(fh)
            total += math.prod(shape) * dtype.itemsize
            if total > budget:
                raise InputFileError(
                    f"{p}: array {info.filename[:-4]!r} of shape {list(shape)} brings the {what} to {total:,} bytes, "
                    f"more than half this machine's memory ({budget * 2:,} bytes); pass a smaller file"
                )


def load_npz(path: str | os.PathLike[str], what: str) -> dict[str, np.ndarray]:
    """Arrays of an .npz file of real numbers, with one clear error when it is missing, damaged or of another kind."""
    p = check_input_file(path, what)
    try:
        _check_sizes(p, what)
        with np.load(p, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise InputFileError(f"{p}: a single .npy array, not an .npz; save the {what} with numpy.savez")
            arrays = {k: data[k] for k in data.files}
    except InputFileError:
        raise
    except (ValueError, OSError, EOFError, KeyError, SyntaxError, tokenize.TokenError, zipfile.BadZipFile,
            zlib.error) as exc:  # numpy parses each array's header as a Python literal
        raise InputFileError(f"{p}: not a readable .npz file ({type(exc).__name__}: {exc}); re-save it with "
                             "numpy.savez") from None
    for name, arr in arrays.items():
        if arr.dtype.kind not in "biuf":
            raise InputFileError(f"{p}: array {name!r} holds {arr.dtype} values; {what} arrays must be real numbers "
                                 "(float32 as Caffe's blobs)")
    return arrays
