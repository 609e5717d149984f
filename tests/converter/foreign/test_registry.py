"""The foreign-op registry: one documented emitter per op, duplicates refused, a generated table."""
from __future__ import annotations

import pytest

from caffeonnx.converter.foreign.registry import get_emitter, register_op, supported_ops, supported_ops_markdown


def test_every_emitter_is_named_and_documented() -> None:
    ops = supported_ops()
    assert len(ops) >= 50, [e.op_type for e in ops]
    for e in ops:
        assert e.emit.__name__.startswith("emit_"), e
        assert "->" in e.summary, f"{e.op_type}: the docstring's first line should say which Caffe layers it writes"
        assert e.op_type in e.summary or e.op_type.lower() in e.summary.lower(), e


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(RuntimeError, match=r"ONNX op 'Relu' is already registered to .*activation\.emit_simple"):
        register_op("Relu")(lambda ctx: None)


def test_other_domains_have_no_emitter() -> None:
    assert get_emitter("Relu") is not None and get_emitter("Relu", "com.microsoft") is None


def test_markdown_table_lists_every_op() -> None:
    table = supported_ops_markdown()
    assert all(f"| `{e.op_type}` |" in table for e in supported_ops())
