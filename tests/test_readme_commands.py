"""The README starts with the two commands, and CI runs exactly the second one."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command() -> None:
    blocks = re.findall(r"^```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S | re.M)
    demo, tests = blocks[0].strip(), blocks[1].strip()
    assert demo.endswith("caffeonnx demo") and "\n" not in demo
    assert tests.endswith("pytest -q") and "\n" not in tests
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [tests]
