"""Registry of foreign-ONNX emitters: one function per ONNX op family, writing Caffe layers.

Contributor rules: an emitter lives in `foreign/emitters/<family>.py`, is named
`emit_<op>`, is registered with `@register_op("OpType", ...)`, has a one-line
docstring saying which Caffe layers it writes, and gets a parity test in
tests/converter/foreign/.  Modules in `emitters/` are discovered automatically.
Only ops of the default ONNX domain are registered.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from caffeonnx.converter.foreign.context import NodeContext

Emitter = Callable[["NodeContext"], None]


@dataclass(frozen=True)
class OpEmitter:
    """A registered emitter for one ONNX op type."""

    op_type: str
    emit: Emitter
    module: str

    @property
    def summary(self) -> str:
        """First docstring line of the emitter: the Caffe layers it writes."""
        doc = (self.emit.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


_EMITTERS: dict[str, OpEmitter] = {}
_loaded = False


def register_op(*op_types: str) -> Callable[[Emitter], Emitter]:
    """Register `fn` as the emitter of each ONNX `op_type`; duplicates are refused."""

    def decorate(fn: Emitter) -> Emitter:
        for op_type in op_types:
            if op_type in _EMITTERS:
                other = _EMITTERS[op_type]
                raise RuntimeError(f"ONNX op {op_type!r} is already emitted by {other.module}.{other.emit.__name__}")
            _EMITTERS[op_type] = OpEmitter(op_type, fn, fn.__module__)
        return fn

    return decorate


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    from caffeonnx.converter.foreign import emitters

    for info in pkgutil.iter_modules(emitters.__path__):
        importlib.import_module(f"{emitters.__name__}.{info.name}")
    _loaded = True


def get_emitter(op_type: str, domain: str = "") -> OpEmitter | None:
    """The emitter for an ONNX op, or None when caffeonnx cannot write it as Caffe layers."""
    _load_all()
    return _EMITTERS.get(op_type) if domain in ("", "ai.onnx") else None


def supported_ops() -> list[OpEmitter]:
    """All registered emitters, sorted by ONNX op type."""
    _load_all()
    return [_EMITTERS[t] for t in sorted(_EMITTERS)]


def supported_ops_markdown() -> str:
    """Markdown table of every ONNX op foreign models may use and the Caffe layers it becomes."""
    rows = ["| ONNX op | Caffe layers | Emitter |", "|---|---|---|"]
    for e in supported_ops():
        rows.append(f"| `{e.op_type}` | {e.summary} | `{e.module.rsplit('.', 1)[-1]}.{e.emit.__name__}` |")
    return "\n".join(rows)
