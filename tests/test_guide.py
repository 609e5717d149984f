"""Every example in docs/guide.md runs as written: bash blocks in order, python blocks as doctests."""
from __future__ import annotations

import doctest
import re
import subprocess
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guide.md"
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)


def blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced bash/python block, in order."""
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(GUIDE.read_text())]


def test_guide_has_runnable_examples() -> None:
    kinds = [k for k, _ in blocks()]
    assert kinds.count("bash") >= 6 and kinds.count("python") >= 1


def test_guide_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    outputs = []
    for i, (kind, code) in enumerate(blocks()):
        if kind == "bash":
            res = subprocess.run(["bash", "-euo", "pipefail", "-c", code], capture_output=True, text=True, timeout=300)
            assert res.returncode == 0, f"guide block {i} failed ({res.returncode}):\n{code}\n--- stderr:\n{res.stderr[-3000:]}"
            outputs.append(res.stdout)
        else:
            test = doctest.DocTestParser().get_doctest(code, {}, f"guide block {i}", str(GUIDE), 0)
            runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
            runner.run(test)
            assert runner.summarize(verbose=False).failed == 0, f"guide block {i} (doctest) failed"
    text = "\n".join(outputs)
    assert "2\n1\n" in text, "to-caffe must write the shared param name twice and transpose once"
    assert '"iter": 0' in text or '"iter":0' in text
    assert "(500, 64)" in text, "500 test images encode to 64-wide codes"
    assert "encode1neuron [1, 64]" in text, "the server answers with the sigmoid codes"
    assert "onnxruntime_onnx" in text
