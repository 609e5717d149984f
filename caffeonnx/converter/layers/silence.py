"""Silence: swallows blobs so they are not reported as net outputs."""
from __future__ import annotations

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@register_layer("Silence", bottoms=(1, None), tops=0)
def convert_silence(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Silence: consumes its bottoms and has no tops; the silenced blobs stop being graph outputs."""
    # Nothing to emit: the driver marks the bottoms as consumed, which is all Silence does.
