"""Every ```python block of README.md and docs/*.md runs, in order, one namespace per file."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_code_blocks_run(path, capsys):
    namespace: dict = {"__name__": "__docs__"}
    for i, code in enumerate(BLOCK.findall(path.read_text())):
        try:
            exec(compile(code, f"{path.name}[block {i + 1}]", "exec"), namespace)
        except Exception as exc:  # name the block in the failure
            raise AssertionError(f"{path.name}, python block {i + 1} failed: {exc!r}\n{code}") from exc
