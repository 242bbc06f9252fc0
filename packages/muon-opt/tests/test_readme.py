"""The README's quickstart runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs(capsys: pytest.CaptureFixture[str]) -> None:
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert code is not None, "README has no quickstart block"
    assert len(code.group(1).strip().splitlines()) <= 10
    exec(compile(code.group(1), str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "output head" in out and re.search(r"loss \d+\.\d+", out)
