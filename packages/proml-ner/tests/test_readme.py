"""The README quickstart runs as written on CPU, and its save/load round trip gives identical spans."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _quickstart() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the README quickstart must be exactly one python block"
    return blocks[0]


@pytest.mark.slow
def test_readme_quickstart_runs_and_round_trips(minilm_path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the quickstart writes my-proml/ into the working directory
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(_quickstart(), str(README), "exec"), namespace)
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed, "the quickstart prints its predictions"
    spans = printed[-1]
    assert spans.startswith("[[") and "'label'" in spans and "'start'" in spans
    assert (tmp_path / "my-proml" / "config.json").is_file()
    assert (tmp_path / "my-proml" / "model.safetensors").is_file()
    # the reloaded model (`ner` after from_pretrained) gives the spans the trained one printed
    reloaded = namespace["ner"].predict(
        ["Richard Feynman gave a talk at Caltech."], support=namespace["index"]
    )
    assert str(reloaded) == spans
