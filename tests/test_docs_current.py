"""The README's supported-layer table is the one generated from the registry."""
from __future__ import annotations

from pathlib import Path

from caffeonnx.converter.docs import BEGIN, END, supported_layers_markdown

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_layer_table_is_current() -> None:
    text = README.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    assert text[start:end] == supported_layers_markdown(), "run: caffeonnx layers --markdown and paste it into README.md"
