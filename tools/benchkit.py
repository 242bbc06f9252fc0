"""Shared benchmark plumbing: provenance, interleaved timing, and the result file format.

Every ``packages/<dist>/benchmarks/run.py`` imports this module (``nox -s bench`` puts ``tools/`` on
``PYTHONPATH``); it is tooling, not part of any released package. A result file is JSON::

    {"package", "device", "profile", "environment": {...}, "duration_s",
     "sections": [{"title", "description", "columns", "rows", "plots": [png names], "notes": [...]}]}

``tools/report.py`` renders every result file into ``bench-results/REPORT.md``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(packages: Iterable[str] = ()) -> dict[str, Any]:
    """Machine, thread count, library versions and git sha: what a reader needs to trust a number."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or _cpu_model(),
        "cpu_count": os.cpu_count(),
        "git_sha": git_sha(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    for dist in ("numpy", "triton", "transformers", "timm", "flash-attn", *packages):
        v = _version(dist)
        if v is not None:
            env[dist] = v
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


@dataclass
class Timing:
    """Seconds per call over repeated, interleaved runs."""

    median: float
    q25: float
    q75: float
    runs: list[float] = field(default_factory=list)

    @property
    def spread(self) -> float:
        """Inter-quartile range relative to the median (0.05 = +-5%-ish)."""
        return (self.q75 - self.q25) / self.median if self.median > 0 else float("nan")


def _summarise(xs: list[float]) -> Timing:
    xs = sorted(xs)
    if len(xs) >= 4:
        q = statistics.quantiles(xs, n=4)
        q25, q75 = q[0], q[2]
    else:
        q25, q75 = xs[0], xs[-1]
    return Timing(median=statistics.median(xs), q25=q25, q75=q75, runs=xs)


def time_interleaved(
    contenders: dict[str, Callable[[], Any]],
    repeats: int = 5,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, Timing]:
    """Time each contender ``repeats`` times, round-robin, after ``warmup`` untimed calls each.

    Interleaving spreads slow phases of a shared machine over every contender instead of
    penalising whichever ran during them.
    """
    sync = sync or (lambda: None)
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
            sync()
    runs: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            runs[name].append(time.perf_counter() - t0)
    return {name: _summarise(xs) for name, xs in runs.items()}


@dataclass
class Section:
    title: str
    description: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Result:
    package: str
    device: str
    profile: str
    environment: dict[str, Any]
    sections: list[Section] = field(default_factory=list)
    duration_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2, default=_jsonable) + "\n")
        print(f"[bench] wrote {path}", flush=True)


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def progress(msg: str) -> None:
    """One timestamped line per step, so a 10-minute run shows where it is."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)
