"""Registry of Caffe layer handlers: one function per Caffe layer type.

Contributor rules: a handler lives in `converter/layers/<family>.py`, is named
`convert_<layer_type>`, is registered with `@register_layer("Type")`, has a
one-line docstring saying what the layer computes in Caffe terms, and gets a
parity test.  Modules in `layers/` are discovered automatically, so adding a layer
touches its own file and its test only.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from caffeonnx.converter.context import LayerContext
    from caffeonnx.proto.caffe_pb2 import LayerParameter

Handler = Callable[["LayerParameter", "LayerContext"], None]


@dataclass(frozen=True)
class LayerHandler:
    """A registered converter for one Caffe layer type."""

    layer_type: str
    convert: Handler
    module: str

    @property
    def summary(self) -> str:
        """First docstring line of the handler: what the layer computes."""
        doc = (self.convert.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


_HANDLERS: dict[str, LayerHandler] = {}
_loaded = False


def register_layer(*layer_types: str) -> Callable[[Handler], Handler]:
    """Register `fn` as the converter of each Caffe `layer_type`; duplicates are refused."""

    def decorate(fn: Handler) -> Handler:
        for layer_type in layer_types:
            if layer_type in _HANDLERS:
                other = _HANDLERS[layer_type]
                raise RuntimeError(
                    f"Caffe layer type {layer_type!r} is already handled by "
                    f"{other.module}.{other.convert.__name__}"
                )
            _HANDLERS[layer_type] = LayerHandler(layer_type, fn, fn.__module__)
        return fn

    return decorate


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    from caffeonnx.converter import layers

    for info in pkgutil.iter_modules(layers.__path__):
        importlib.import_module(f"{layers.__name__}.{info.name}")
    _loaded = True


def get_handler(layer_type: str) -> LayerHandler | None:
    """The handler for `layer_type`, or None when it is not supported."""
    _load_all()
    return _HANDLERS.get(layer_type)


def supported_layers() -> list[LayerHandler]:
    """All registered handlers, sorted by Caffe layer type."""
    _load_all()
    return [_HANDLERS[t] for t in sorted(_HANDLERS)]
