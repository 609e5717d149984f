"""User-supplied .npz files of arrays, read with one clear error for every way they can be damaged.

`verify` (inputs and reference blobs) and `train --data` read them; a truncated file, a bad
CRC, an array header that is not a Python literal, or arrays of complex, string, datetime or
object values each get one line naming the file (and the array), never a traceback.
"""
from __future__ import annotations

import os
import tokenize
import zipfile
import zlib

import numpy as np

from caffeonnx.converter.caffe_io import check_input_file
from caffeonnx.errors import InputFileError


def load_npz(path: str | os.PathLike[str], what: str) -> dict[str, np.ndarray]:
    """Arrays of an .npz file of real numbers, with one clear error when it is missing, damaged or of another kind."""
    p = check_input_file(path, what)
    try:
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
