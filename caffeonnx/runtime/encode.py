"""Batch encoding of a file of samples into a .npy of codes, streaming both ways.

The input is read lazily (see inputs.py: arrays and IDX are memory-mapped, LMDB,
HDF5 and image lists are read per batch); the output is a `.npy` created with
`np.lib.format.open_memmap` beside the target under a temporary name, filled batch
by batch and renamed over the target only when every batch succeeded, so memory
stays bounded (the kernel pages both files) and no partial output is ever left.

Samples are transformed as the net was trained on them: a caffeonnx model stores the
whole Caffe net (`caffe.net`), and the data layer that produced the encoder's input
blob records Caffe's DataTransformer settings (`transform_param`).  They are applied
as Caffe's TEST phase does: subtract the mean (mean_file pixel or mean_value channel),
take the centre crop_size window, multiply by scale.  Caffe's MNIST nets train at
scale 0.00390625 (1/256) or 0.0039215684 (1/255): codes match the training inputs only
at the recorded one.  A Data layer without transform_param feeds raw values (scale 1).
An Input layer's transform_param is honoured too, since `caffeonnx train` applies it.
HDF5Data applies no transform in Caffe, so none is applied.  With nothing on record
(an Input layer without transform_param, foreign ONNX) uint8 pixels are scaled by
1/255 and other samples used as they are.  `--scale` replaces the scale only.

SIGTERM while encoding raises SystemExit(143) as Ctrl-C raises KeyboardInterrupt, so the
temporary output and scratch files are removed on the way out.  What a SIGKILL leaves
(the output's `.NAME.XXXXXXXX.tmp`, scratch `.caffeonnx-XXXXXXXX.raw`) is removed by the
next encode into the same directory: only names of those patterns, older than that
process and not locked by a live one (both are flocked while in use).
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import numpy as np
import onnx
from onnx import ModelProto

from caffeonnx.converter import metadata
from caffeonnx.data.transform import DataTransformer
from caffeonnx.errors import CaffeOnnxError, TensorError
from caffeonnx.fileio import atomic_path
from caffeonnx.proto import caffe_pb2
from caffeonnx.runtime.inputs import (
    SCRATCH_PATTERN,
    ImageOptions,
    lock_scratch,
    open_inputs,
    process_start_time,
    remove_stale,
)
from caffeonnx.runtime.session import EncoderSession, TensorSpec

# Data layers that run Caffe's DataTransformer: without transform_param they feed raw values.
_TRANSFORMING = {"Data", "ImageData", "WindowData", "MemoryData"}
_DATA_TYPES = _TRANSFORMING | {"HDF5Data", "Input", "DummyData"}


@dataclass(frozen=True)
class InputTransform:
    """A data layer's transform_param as encode applies it, and where it came from (for the printed line)."""

    param: caffe_pb2.TransformationParameter
    origin: str
    scale: float  # param.scale as given (the proto holds it as float32, which Caffe and the transformer use)

    def describe(self) -> str:
        """One line saying what is applied and why."""
        t = self.param
        parts = [f"scale {self.scale:.8g}"]
        if t.mean_value:
            parts.append(f"mean_value {[float(m) for m in t.mean_value]}")
        if t.HasField("mean_file"):
            parts.append(f"mean_file {t.mean_file!r}")
        if t.crop_size:
            parts.append(f"centre crop {t.crop_size}")
        return f"{', '.join(parts)} ({self.origin})"

    def with_scale(self, scale: float) -> InputTransform:
        """The same transform at another scale (--scale)."""
        param = caffe_pb2.TransformationParameter()
        param.CopyFrom(self.param)
        param.scale = scale
        return InputTransform(param, f"--scale; {self.origin}", scale)

    def transformer(self) -> DataTransformer:
        """Caffe's DataTransformer in the TEST phase (centre crop), never mirroring: one code per sample."""
        param = caffe_pb2.TransformationParameter()
        param.CopyFrom(self.param)
        param.mirror = False
        return DataTransformer(param, train=False, where=f"encode ({self.origin})")


@dataclass(frozen=True)
class EncodeResult:
    """What an encode run produced."""

    samples: int
    code_shape: tuple[int, ...]
    scale: float
    output: Path
    transform: str = ""  # InputTransform.describe() of what was applied
    kind: str = "array file"  # what the input was read as (array file, LMDB, HDF5, image list...)
    stale_removed: tuple[Path, ...] = ()  # temporaries a killed encode had left in the output's directory


def default_scale(dtype: np.dtype) -> float:
    """1/255 for 8-bit unsigned pixels (MNIST IDX, as the Caffe reference inputs), else 1."""
    return 1.0 / 255.0 if dtype == np.uint8 else 1.0


def input_layer(model: ModelProto, blob: str) -> caffe_pb2.LayerParameter | None:
    """The converted data layer whose first top is the graph input `blob` (None for foreign ONNX)."""
    net = metadata.caffe_net_from(model)
    if net is None:
        return None
    for record in metadata.layer_records(model):
        if record.type in _DATA_TYPES and record.tops[:1] == [blob] and 0 <= record.index < len(net.layer):
            return net.layer[record.index]
    return None


def recorded_transform(layer: caffe_pb2.LayerParameter | None) -> InputTransform | None:
    """The transform the samples of `layer` were trained with, or None when nothing is on record."""
    if layer is None:
        return None
    what = f"{layer.type} layer {layer.name!r}"
    identity = caffe_pb2.TransformationParameter()
    if layer.type == "HDF5Data":
        return InputTransform(identity, f"{what}: Caffe's HDF5Data applies no transform", 1.0)
    if not layer.HasField("transform_param"):
        return InputTransform(identity, f"{what} has no transform_param", 1.0) if layer.type in _TRANSFORMING else None
    t = layer.transform_param
    return InputTransform(t, f"transform_param of {what}", float(np.float32(t.scale)))


def image_options(layer: caffe_pb2.LayerParameter | None, channels: int | None) -> ImageOptions:
    """How to decode images: the ImageData layer's own settings, else colour unless the model takes one channel."""
    color = None
    if layer is not None and layer.HasField("transform_param"):
        t = layer.transform_param
        color = True if t.force_color else False if t.force_gray else None
    if layer is not None and layer.type == "ImageData":
        p = layer.image_data_param
        return ImageOptions(bool(p.is_color), int(p.new_height), int(p.new_width), p.root_folder, color)
    return ImageOptions(is_color=channels != 1, datum_color=color)


def model_transform(model_path: str | os.PathLike[str], blob: str) -> tuple[InputTransform | None, ImageOptions]:
    """What `encode` applies to the samples of input `blob` of the model file (metadata only)."""
    model = onnx.load(str(model_path), load_external_data=False)
    layer = input_layer(model, blob)
    shapes = metadata.input_shapes(model).get(blob)
    return recorded_transform(layer), image_options(layer, shapes[1] if shapes and len(shapes) == 4 else None)


def streamed_sample_shape(spec: TensorSpec, batch_size: int) -> tuple[int, ...]:
    """The model's per-sample input shape, which streaming batches of `batch_size` needs fixed (and a fixed batch met)."""
    if not spec.static:
        raise CaffeOnnxError(f"input {spec.name!r} has symbolic per-sample dims {spec.sample_shape}; cannot stream")
    if spec.batch is not None and batch_size != spec.batch:
        raise CaffeOnnxError(f"the model has a fixed batch of {spec.batch}; pass --batch-size {spec.batch}")
    return tuple(int(d) for d in spec.sample_shape)


def fit_samples(samples: np.ndarray, spec: TensorSpec, model_shape: tuple[int, ...], transform: InputTransform | None,
                scale: float | None, source: str) -> tuple[InputTransform, tuple[int, int, int]]:
    """The transform to apply (the recorded one, else the dtype's default; `scale` replaces its scale) and each
    sample's (C, H, W), after checking the samples fit the model's input and its fixed batch."""
    n = samples.shape[0]
    if transform is None:
        guess = default_scale(np.dtype(samples.dtype))
        transform = InputTransform(caffe_pb2.TransformationParameter(scale=guess), "no transform_param on record "
                                   "(an Input layer, or foreign ONNX): 1/255 for uint8 pixels, else 1", guess)
    if scale is not None:
        transform = transform.with_scale(float(scale))
    sample = tuple(int(d) for d in samples.shape[1:])
    chw = sample_image_shape(sample, model_shape, int(transform.param.crop_size), source)
    per_sample = math.prod(sample)
    if per_sample != math.prod(chw):
        raise TensorError(
            f"{source}: samples of shape {sample} ({per_sample} values) do not fit input {spec.name!r} of the model, "
            f"which takes {list(spec.sample_shape)} ({spec.sample_size} values) per sample"
        )
    out_shape = transform.transformer().output_shape(chw)
    if math.prod(out_shape) != spec.sample_size:
        raise TensorError(f"{source}: samples of shape {sample} give {list(out_shape)} after the centre crop "
                          f"but input {spec.name!r} takes {list(spec.sample_shape)}")
    if spec.batch is not None and n % spec.batch:
        raise CaffeOnnxError(f"{source}: {n} samples are not a multiple of the model's fixed batch {spec.batch}")
    return transform, chw


def sample_image_shape(sample: tuple[int, ...], model_shape: tuple[int, ...], crop: int, what: str) -> tuple[int, int, int]:
    """The (C, H, W) the DataTransformer sees: the samples' own before a crop, else the model's (a flat blob's
    values as channels, as Caffe's mean_value indexes axis 1)."""
    if crop and math.prod(sample) != math.prod(model_shape):
        if len(sample) == 2:
            return 1, sample[0], sample[1]
        if len(sample) == 3:
            return sample[0], sample[1], sample[2]
        raise TensorError(f"{what}: samples of shape {sample} cannot be centre-cropped to {crop}x{crop} "
                          "(transform_param.crop_size); give (N, C, H, W) or (N, H, W) images")
    if len(model_shape) == 3:
        return model_shape[0], model_shape[1], model_shape[2]
    return (model_shape[0], math.prod(model_shape[1:]), 1) if model_shape else (1, 1, 1)


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """While the block runs (in the main thread), SIGTERM raises SystemExit(143): cleanup runs as for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def remove_stale_temps(target: Path) -> tuple[Path, ...]:
    """Remove what killed encodes into `target`'s directory left: its temporary output and scratch files."""
    started = process_start_time()
    own = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.tmp")
    return tuple(remove_stale(target.parent, own, started) + remove_stale(target.parent, SCRATCH_PATTERN, started))


def encode_file(
    session: EncoderSession,
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    batch_size: int = 1024,
    key: str | None = None,
    scale: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    transform: InputTransform | None = None,
    images: ImageOptions | None = None,
) -> EncodeResult:
    """Encode every sample of `input_path` into `output_path` (.npy); `progress(done, total)` after each batch.

    `transform` and `images` default to what the model file's data layer records (`model_transform`), so
    the API encodes as the CLI does; `scale` replaces the transform's scale.
    """
    if batch_size <= 0:
        raise CaffeOnnxError(f"--batch-size must be positive, got {batch_size}")
    spec = session.input
    model_shape = streamed_sample_shape(spec, batch_size)
    if transform is None and images is None and Path(session.source).is_file():
        transform, images = model_transform(session.source, spec.name)
    target = Path(output_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temps(target)
    with sigterm_exits(), open_inputs(input_path, key, scratch_dir=target.parent, blob=spec.name,
                                      images=images) as opened:
        samples = opened.samples
        n = samples.shape[0]
        transform, chw = fit_samples(samples, spec, model_shape, transform, scale, str(input_path))
        transformer = transform.transformer()
        no_draws = np.random.default_rng(0)  # TEST phase without mirror: the transformer draws nothing

        def prepare(rows: np.ndarray) -> np.ndarray:
            """Rows transformed as Caffe's TEST phase, as the model's dtype and per-sample shape."""
            x = transformer(np.asarray(rows).reshape((len(rows), *chw)), no_draws)
            return np.ascontiguousarray(x.reshape((len(rows), *model_shape)), dtype=spec.dtype)

        probe = session.run(prepare(samples[: min(n, batch_size)]))
        code_shape = probe.shape[1:]
        with atomic_path(target) as tmp, open(tmp, "rb") as held:  # renamed over the target only when complete
            lock_scratch(held.fileno())  # in use: another encode's cleanup leaves it alone
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=probe.dtype, shape=(n, *code_shape))
            out[: probe.shape[0]] = probe
            done = probe.shape[0]
            if progress:
                progress(done, n)
            while done < n:
                stop = min(n, done + batch_size)
                out[done:stop] = session.run(prepare(samples[done:stop]))
                done = stop
                if progress:
                    progress(done, n)
            out.flush()
            del out
    return EncodeResult(n, tuple(code_shape), transform.scale, target, transform.describe(), opened.kind, stale)
