"""The support tables in the README and the guide are the ones generated from the registries."""
from __future__ import annotations

from pathlib import Path

import pytest

from caffeonnx.converter.docs import markers, render

ROOT = Path(__file__).resolve().parent.parent
# document -> the generated sections it must hold
DOCUMENTS = {
    ROOT / "README.md": ("supported-layers", "supported-onnx-ops"),
    ROOT / "docs" / "guide.md": ("fork-layers",),
}


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: p.name)
def test_document_has_its_generated_sections(doc: Path) -> None:
    text = doc.read_text()
    for name in DOCUMENTS[doc]:
        begin, end = markers(name)
        assert begin in text and end in text, f"{doc.name} lacks the {name} section markers"


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: p.name)
def test_document_tables_are_current(doc: Path) -> None:
    text = doc.read_text()
    assert render(text) == text, "run: python scripts/update_docs.py"
