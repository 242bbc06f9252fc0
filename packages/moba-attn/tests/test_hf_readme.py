"""The README's transformers quickstart runs as written (offline, tiny random Llama)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[1] / "README.md"


def test_hf_quickstart_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    section = README.read_text().split("## Hugging Face transformers", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "README has no transformers quickstart block"
    monkeypatch.chdir(tmp_path)  # it saves a checkpoint to ./moba-tiny
    exec(compile(code.group(1), str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "torch.Size([2, 80])" in out and "block_size" in out
    assert (tmp_path / "moba-tiny" / "config.json").is_file()
