"""Registry of Caffe layer handlers: one function per Caffe layer type.

Contributor rules: a handler lives in `converter/layers/<family>.py`, is named
`convert_<layer_type>`, is registered with `@register_layer("Type")`, has a
one-line docstring saying what the layer computes in Caffe terms, and gets a
parity test.  Modules in `layers/` are discovered automatically, so adding a layer
touches its own file and its test only.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from caffeonnx.registry import Registry, summary

if TYPE_CHECKING:
    from caffeonnx.converter.context import LayerContext
    from caffeonnx.proto.caffe_pb2 import LayerParameter

Handler = Callable[["LayerParameter", "LayerContext"], None]

_HANDLERS: Registry[Handler] = Registry("Caffe layer type", "caffeonnx.converter.layers")
register_layer = _HANDLERS.register


@dataclass(frozen=True)
class LayerHandler:
    """A registered converter for one Caffe layer type."""

    layer_type: str
    convert: Handler

    @property
    def module(self) -> str:
        """The module that defines the handler."""
        return self.convert.__module__

    @property
    def summary(self) -> str:
        """First docstring line of the handler: what the layer computes."""
        return summary(self.convert)


def get_handler(layer_type: str) -> LayerHandler | None:
    """The handler for `layer_type`, or None when it is not supported."""
    fn = _HANDLERS.get(layer_type)
    return LayerHandler(layer_type, fn) if fn is not None else None


def supported_layers() -> list[LayerHandler]:
    """All registered handlers, sorted by Caffe layer type."""
    return [LayerHandler(t, fn) for t, fn in _HANDLERS.items()]
