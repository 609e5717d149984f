"""One exception hierarchy for everything a user can get wrong.

The CLI turns any `CaffeOnnxError` into a one-line message and exit code 2; any
other exception is a bug in caffeonnx and keeps its traceback.
"""
from __future__ import annotations


class CaffeOnnxError(Exception):
    """A problem with the user's input: files, options or model contents."""


class InputFileError(CaffeOnnxError):
    """A file is missing, unreadable, truncated or not what it claims to be."""


class PrototxtError(InputFileError):
    """A prototxt does not parse; the message carries file, line and column."""


class WeightsError(CaffeOnnxError):
    """A caffemodel does not fit the net (missing layer, wrong blob count/shape)."""


class SharedParamError(CaffeOnnxError):
    """Layers that share a param disagree in a way Caffe itself refuses."""


class UnsupportedError(CaffeOnnxError):
    """Layer types or ops caffeonnx cannot convert; lists every offender at once."""


class LayerError(CaffeOnnxError):
    """A layer's parameters are invalid for its inputs."""

    def __init__(self, layer: str, layer_type: str, message: str) -> None:
        super().__init__(f"layer {layer!r} ({layer_type}): {message}")
        self.layer = layer
        self.layer_type = layer_type


class TensorError(CaffeOnnxError):
    """An inference input has the wrong name, shape, dtype or size for the model."""


class SolverError(CaffeOnnxError):
    """A solver prototxt is invalid or asks for a combination Caffe refuses (e.g. momentum with AdaGrad)."""


class DataError(CaffeOnnxError):
    """Training data does not fit the net's input blobs (names, shapes, counts)."""


class TrainingDiverged(CaffeOnnxError):
    """The loss became NaN or infinite; training stopped and kept the last good snapshot."""
