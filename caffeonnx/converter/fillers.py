"""Caffe's weight fillers in numpy, for converting a prototxt without a caffemodel.

The values are seeded (not bit-identical to Caffe's RNG, which no user depends on)
but follow Caffe's definitions: fan-in is count/shape[0], fan-out count/shape[1].
"""
from __future__ import annotations

import math

import numpy as np

from caffeonnx.errors import CaffeOnnxError
from caffeonnx.proto import caffe_pb2

Filler = caffe_pb2.FillerParameter


def constant_filler(value: float) -> caffe_pb2.FillerParameter:
    """A FillerParameter of type constant: a layer's documented default initialisation."""
    return Filler(type="constant", value=value)


def _fans(shape: tuple[int, ...]) -> tuple[float, float]:
    count = math.prod(shape)
    fan_in = count / shape[0] if shape and shape[0] else count
    fan_out = count / shape[1] if len(shape) > 1 and shape[1] else count
    return fan_in, fan_out


def _variance_n(filler: caffe_pb2.FillerParameter, shape: tuple[int, ...]) -> float:
    fan_in, fan_out = _fans(shape)
    if filler.variance_norm == Filler.FAN_OUT:
        return fan_out
    if filler.variance_norm == Filler.AVERAGE:
        return (fan_in + fan_out) / 2
    return fan_in


def fill(filler: caffe_pb2.FillerParameter, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Values for a blob of `shape` drawn as Caffe's filler `filler.type` defines."""
    kind = filler.type
    if kind == "constant":
        out = np.full(shape, filler.value, dtype=np.float32)
    elif kind == "uniform":
        out = rng.uniform(filler.min, filler.max, size=shape)
    elif kind == "gaussian":
        out = rng.normal(filler.mean, filler.std, size=shape)
        if filler.sparse >= 0:
            # Caffe keeps each weight with probability sparse / num_outputs (shape[0]).
            keep = filler.sparse / shape[0] if shape and shape[0] else 1.0
            out *= rng.random(size=shape) < keep
    elif kind == "positive_unitball":
        out = rng.uniform(0, 1, size=shape)
        rows = out.reshape(shape[0], -1) if shape else out.reshape(1, -1)
        rows /= rows.sum(axis=1, keepdims=True)
    elif kind == "xavier":
        scale = math.sqrt(3.0 / _variance_n(filler, shape))
        out = rng.uniform(-scale, scale, size=shape)
    elif kind == "msra":
        out = rng.normal(0.0, math.sqrt(2.0 / _variance_n(filler, shape)), size=shape)
    elif kind == "bilinear":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise CaffeOnnxError(f"bilinear filler needs a square 4-D blob, got shape {shape}")
        k = shape[3]
        f = math.ceil(k / 2.0)
        c = (2 * f - 1 - f % 2) / (2.0 * f)
        ramp = 1 - np.abs(np.arange(k) / f - c)
        out = np.broadcast_to(np.outer(ramp, ramp), shape).copy()
    else:
        raise CaffeOnnxError(
            f"unknown filler type {kind!r}; use constant, uniform, gaussian, positive_unitball, xavier, msra or bilinear"
        )
    # reshape: ascontiguousarray turns a 0-axis blob (a shared PReLU slope, a scalar Scale) into [1].
    return np.ascontiguousarray(out, dtype=np.float32).reshape(shape)
