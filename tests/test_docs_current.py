"""The README's support tables are the ones generated from the registries."""
from __future__ import annotations

from pathlib import Path

from caffeonnx.converter.docs import SECTIONS, markers, render

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_has_every_generated_section() -> None:
    text = README.read_text()
    for name in SECTIONS:
        begin, end = markers(name)
        assert begin in text and end in text, f"README lacks the {name} section markers"


def test_readme_tables_are_current() -> None:
    text = README.read_text()
    assert render(text) == text, "run: python scripts/update_docs.py"
