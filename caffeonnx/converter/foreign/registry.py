"""Registry of foreign-ONNX emitters: one function per ONNX op family, writing Caffe layers.

Contributor rules: an emitter lives in `foreign/emitters/<family>.py`, is named
`emit_<op>`, is registered with `@register_op("OpType", ...)`, has a one-line
docstring saying which Caffe layers it writes, and gets a parity test in
tests/converter/foreign/.  Modules in `emitters/` are discovered automatically.
Only ops of the default ONNX domain are registered.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from caffeonnx.registry import Registry, summary

if TYPE_CHECKING:
    from caffeonnx.converter.foreign.context import NodeContext

Emitter = Callable[["NodeContext"], None]

_EMITTERS: Registry[Emitter] = Registry("ONNX op", "caffeonnx.converter.foreign.emitters")
register_op = _EMITTERS.register


@dataclass(frozen=True)
class OpEmitter:
    """A registered emitter for one ONNX op type."""

    op_type: str
    emit: Emitter

    @property
    def module(self) -> str:
        """The module that defines the emitter."""
        return self.emit.__module__

    @property
    def summary(self) -> str:
        """First docstring line of the emitter: the Caffe layers it writes."""
        return summary(self.emit)


def get_emitter(op_type: str, domain: str = "") -> OpEmitter | None:
    """The emitter for an ONNX op, or None when caffeonnx cannot write it as Caffe layers."""
    fn = _EMITTERS.get(op_type) if domain in ("", "ai.onnx") else None
    return OpEmitter(op_type, fn) if fn is not None else None


def supported_ops() -> list[OpEmitter]:
    """All registered emitters, sorted by ONNX op type."""
    return [OpEmitter(t, fn) for t, fn in _EMITTERS.items()]


def supported_ops_markdown() -> str:
    """Markdown table of every ONNX op foreign models may use and the Caffe layers it becomes."""
    rows = ["| ONNX op | Caffe layers | Emitter |", "|---|---|---|"]
    for e in supported_ops():
        rows.append(f"| `{e.op_type}` | {e.summary} | `{e.module.rsplit('.', 1)[-1]}.{e.emit.__name__}` |")
    return "\n".join(rows)
