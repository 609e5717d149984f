"""Rewrite the README's supported-layer table from the registry."""
from __future__ import annotations

from pathlib import Path

from caffeonnx.converter.docs import BEGIN, END, supported_layers_markdown

README = Path(__file__).resolve().parent.parent / "README.md"

if __name__ == "__main__":
    text = README.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    README.write_text(text[:start] + supported_layers_markdown() + text[end:])
