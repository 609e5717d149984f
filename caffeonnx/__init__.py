"""caffeonnx: Caffe <-> ONNX conversion, Caffe-exact training in torch, ORT serving."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "convert", "train"]


def __getattr__(name: str):  # lazy: `import caffeonnx` stays cheap for the CLI (train loads torch)
    if name == "convert":
        from caffeonnx.converter.caffe_to_onnx import convert

        return convert
    if name == "train":
        from caffeonnx.trainer.api import train

        return train
    raise AttributeError(name)
