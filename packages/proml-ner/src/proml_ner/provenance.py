"""What result files record about their data: the config's ``data.version`` and the path and SHA-256 of
every data file read, so two results can be told apart even when the version string was forgotten."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .experiment import RunConfig

__all__ = ["data_fingerprint", "sha256_file"]


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (data files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(cfg: RunConfig, splits: tuple[str, ...] = ("train", "dev", "test")) -> dict:
    """What the result files record about the data: version, paths and SHA-256 of each file read."""
    files: dict[str, Any] = {}
    names = [s for s in splits if getattr(cfg.data, s)]
    if "test" in splits:
        names += cfg.data.support_files
    for name in names:
        path = cfg.data.path(name)
        if path.startswith("synthetic"):
            files[name] = {"path": path, "generator": "proml_ner.synthetic"}
            continue
        files[name] = {"path": path, "sha256": sha256_file(path)}
    return {"format": cfg.data.format, "version": cfg.data.version, "files": files}
