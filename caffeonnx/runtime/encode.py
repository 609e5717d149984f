"""Batch encoding of a file of samples into a .npy of codes, streaming both ways.

The input is memory-mapped (see inputs.py); the output is a `.npy` created with
`np.lib.format.open_memmap` beside the target under a temporary name, filled batch
by batch and renamed over the target only when every batch succeeded, so memory
stays bounded (the kernel pages both files) and no partial output is ever left.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from caffeonnx.errors import CaffeOnnxError, TensorError
from caffeonnx.runtime.inputs import open_samples
from caffeonnx.runtime.session import EncoderSession


@dataclass(frozen=True)
class EncodeResult:
    """What an encode run produced."""

    samples: int
    code_shape: tuple[int, ...]
    scale: float
    output: Path


def default_scale(dtype: np.dtype) -> float:
    """1/255 for 8-bit unsigned pixels (MNIST IDX, as the Caffe reference inputs), else 1."""
    return 1.0 / 255.0 if dtype == np.uint8 else 1.0


def encode_file(
    session: EncoderSession,
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    batch_size: int = 1024,
    key: str | None = None,
    scale: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EncodeResult:
    """Encode every sample of `input_path` into `output_path` (.npy); `progress(done, total)` after each batch."""
    if batch_size <= 0:
        raise CaffeOnnxError(f"--batch-size must be positive, got {batch_size}")
    spec = session.input
    if not spec.static:
        raise CaffeOnnxError(f"input {spec.name!r} has symbolic per-sample dims {spec.sample_shape}; cannot stream")
    if spec.batch is not None and batch_size != spec.batch:
        raise CaffeOnnxError(f"the model has a fixed batch of {spec.batch}; pass --batch-size {spec.batch}")
    target = Path(output_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open_samples(input_path, key, scratch_dir=target.parent) as samples:
        n = samples.shape[0]
        per_sample = math.prod(samples.shape[1:])
        if per_sample != spec.sample_size:
            raise TensorError(
                f"{input_path}: samples of shape {samples.shape[1:]} ({per_sample} values) do not fit input "
                f"{spec.name!r} of the model, which takes {list(spec.sample_shape)} ({spec.sample_size} values) per sample"
            )
        if spec.batch is not None and n % spec.batch:
            raise CaffeOnnxError(f"{input_path}: {n} samples are not a multiple of the model's fixed batch {spec.batch}")
        factor = default_scale(samples.dtype) if scale is None else float(scale)
        probe = session.run(_prepare(samples[: min(n, batch_size)], spec.sample_shape, factor, spec.dtype))
        code_shape = probe.shape[1:]
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp.npy", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=probe.dtype, shape=(n, *code_shape))
            out[: probe.shape[0]] = probe
            done = probe.shape[0]
            if progress:
                progress(done, n)
            while done < n:
                stop = min(n, done + batch_size)
                out[done:stop] = session.run(_prepare(samples[done:stop], spec.sample_shape, factor, spec.dtype))
                done = stop
                if progress:
                    progress(done, n)
            out.flush()
            del out
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
    return EncodeResult(n, tuple(code_shape), factor, target)


def _prepare(rows: np.ndarray, sample_shape: tuple[int, ...], scale: float, dtype: np.dtype) -> np.ndarray:
    """Rows of the mapped input as the model's dtype and per-sample shape, scaled (one copy per batch)."""
    batch = np.array(rows, dtype=dtype, order="C").reshape((rows.shape[0], *sample_shape))
    if scale != 1.0:
        batch *= dtype.type(scale)
    return batch
