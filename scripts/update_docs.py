"""Rewrite the generated tables in the README (layers, ONNX ops) and the guide (forks)."""
from __future__ import annotations

from pathlib import Path

from caffeonnx.converter.docs import render

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "guide.md")

if __name__ == "__main__":
    for doc in DOCUMENTS:
        doc.write_text(render(doc.read_text()))
