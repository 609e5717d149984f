"""Rewrite the README's generated tables (supported Caffe layers and ONNX ops)."""
from __future__ import annotations

from pathlib import Path

from caffeonnx.converter.docs import render

README = Path(__file__).resolve().parent.parent / "README.md"

if __name__ == "__main__":
    README.write_text(render(README.read_text()))
