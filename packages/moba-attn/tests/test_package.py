"""Packaging contract: a PEP 440 version, a typed package, and an import that needs no GPU."""

from __future__ import annotations

import importlib.resources
import re
import subprocess
import sys

import moba_attn


def test_version_is_pep440() -> None:
    assert re.fullmatch(
        r"\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?(\+[\w.]+)?", moba_attn.__version__
    ), moba_attn.__version__


def test_ships_py_typed() -> None:
    assert importlib.resources.files("moba_attn").joinpath("py.typed").is_file()


def test_import_needs_no_gpu_or_optional_extra() -> None:
    code = (
        "import sys, moba_attn; "
        "bad = [m for m in ('triton', 'flash_attn') if m in sys.modules]; "
        "import torch; assert not torch.cuda.is_initialized(), 'CUDA initialised at import'; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"optional modules imported eagerly: {out.stdout.strip()}"
