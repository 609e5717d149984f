"""Registry of Caffe layer handlers: one function per Caffe layer type.

Contributor rules: a handler lives in `converter/layers/<family>.py`, is named
`convert_<layer_type>`, is registered with `@register_layer("Type", bottoms=..., tops=...)`
declaring the blob counts Caffe's layer declares (ExactNumBottomBlobs, MinTopBlobs, ...),
has a one-line docstring saying what the layer computes in Caffe terms, and gets a
parity test.  A layer type that BVLC Caffe lacks names its fork (`fork="ssd"`, a key of
`converter/forks.py`'s FORKS), which `caffeonnx layers`, `inspect` and `to-caffe --target` use.  Modules in `layers/` are discovered automatically, so adding a layer
touches its own file and its test only.

The blob counts are checked once, centrally, before a handler runs (`check_blob_counts`),
with Caffe's wording; handlers may index their bottoms and tops freely.
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
# Whether a layer has learnable blobs a caffemodel must hold: always, never, or decided by its params.
Learnable = bool | Callable[["LayerParameter"], bool]
Count = int | tuple[int, int | None]  # an exact count, or (minimum, maximum or None for no maximum)


@dataclass(frozen=True)
class BlobCounts:
    """How many bottoms and tops a Caffe layer type takes (its Layer::ExactNum/Min/MaxBottomBlobs and Top)."""

    bottoms: Count
    tops: Count
    equal: bool = False  # one top per bottom (Caffe's EqualNumBottomTopBlobs)
    auto_top: bool = False  # missing tops are made anonymously (Caffe's AutoTopBlobs: loss layers)

    def needed_tops(self) -> int:
        """The fewest tops the layer produces (what AutoTopBlobs fills up to)."""
        return self.tops if isinstance(self.tops, int) else self.tops[0]


_HANDLERS: Registry[Handler] = Registry("Caffe layer type", "caffeonnx.converter.layers")
_COUNTS: dict[str, BlobCounts] = {}
_FORK: dict[str, str] = {}
_LEARNABLE: dict[str, Learnable] = {}


def register_layer(layer_type: str, *, bottoms: Count, tops: Count, equal: bool = False,
                   auto_top: bool = False, fork: str = "bvlc", params: Learnable = False
                   ) -> Callable[[Handler], Handler]:
    """Decorator: register the handler of `layer_type` with the blob counts Caffe declares for it.

    `params` says whether the layer has learnable blobs (so a caffemodel must hold them).
    """
    from caffeonnx.converter.forks import FORKS

    if fork not in FORKS:
        raise RuntimeError(f"layer type {layer_type!r} names fork {fork!r}; known forks: {sorted(FORKS)}")
    register = _HANDLERS.register(layer_type)

    def decorate(fn: Handler) -> Handler:
        register(fn)  # refuses a second handler before its counts could replace the first's
        _COUNTS[layer_type] = BlobCounts(bottoms, tops, equal, auto_top)
        _FORK[layer_type] = fork
        _LEARNABLE[layer_type] = params
        return fn

    return decorate


def _count_error(layer_type: str, count: Count, have: int, side: str, verb: str) -> str | None:
    """Caffe's Layer::CheckBlobCounts message when `have` breaks `count`, else None."""
    low, high = (count, count) if isinstance(count, int) else count
    if low == high and have != low:
        return f"{layer_type} Layer {verb} {low} {side} blob(s)"
    if have < low:
        return f"{layer_type} Layer {verb} at least {low} {side} blob(s)"
    if high is not None and have > high:
        return f"{layer_type} Layer {verb} at most {high} {side} blob(s)"
    return None


def check_blob_counts(layer: LayerParameter, counts: BlobCounts) -> str | None:
    """What is wrong with the layer's bottom/top counts, in Caffe's words (None when they fit)."""
    tops = len(layer.top)
    if counts.auto_top:
        tops = max(tops, counts.needed_tops())
    problem = _count_error(layer.type, counts.bottoms, len(layer.bottom), "bottom", "takes")
    if problem is not None:
        return f"{problem} as input; it has {len(layer.bottom)}"
    problem = _count_error(layer.type, counts.tops, tops, "top", "produces")
    if problem is not None:
        return f"{problem} as output; it has {len(layer.top)}"
    if counts.equal and len(layer.bottom) != len(layer.top):
        return (f"{layer.type} Layer produces one top blob as output for each bottom blob input; it has "
                f"{len(layer.bottom)} bottom(s) and {len(layer.top)} top(s)")
    return None


@dataclass(frozen=True)
class LayerHandler:
    """A registered converter for one Caffe layer type, with the blob counts it requires."""

    layer_type: str
    convert: Handler
    counts: BlobCounts
    fork: str = "bvlc"  # the FORKS key of the Caffe that defines the layer type

    @property
    def module(self) -> str:
        """The module that defines the handler."""
        return self.convert.__module__

    @property
    def summary(self) -> str:
        """First docstring line of the handler: what the layer computes."""
        return summary(self.convert)


def has_params(layer: LayerParameter) -> bool:
    """Whether Caffe gives this layer learnable blobs, as its handler declares (False for unknown types)."""
    _HANDLERS.get(layer.type)  # loads the handler modules
    learnable = _LEARNABLE.get(layer.type, False)
    return learnable(layer) if callable(learnable) else learnable


def get_handler(layer_type: str) -> LayerHandler | None:
    """The handler for `layer_type`, or None when it is not supported."""
    fn = _HANDLERS.get(layer_type)
    return LayerHandler(layer_type, fn, _COUNTS[layer_type], _FORK[layer_type]) if fn is not None else None


def supported_layers() -> list[LayerHandler]:
    """All registered handlers, sorted by Caffe layer type."""
    return [LayerHandler(t, fn, _COUNTS[t], _FORK[t]) for t, fn in _HANDLERS.items()]
