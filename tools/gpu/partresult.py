"""The result file every scripted part of the GPU check writes, and the deadline it stops by.

A part script gets ``--out`` (its JSON) and ``--deadline`` (Unix time by which it must have finished: the
driver kills it then). The file is rewritten after every measurement, so a part killed at its deadline
still leaves what it measured; ``status`` says how it ended. Sections are :class:`benchkit.Section`, the
same tables the CPU benchmarks write. ``--check`` runs the script's tiny CPU smoke instead (the dry run):
every public name it calls is exercised, no number is measured.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import benchkit


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, help="result JSON (rewritten after every measurement)")
    p.add_argument("--deadline", type=float, default=0.0, help="Unix time by which to have finished")
    p.add_argument("--check", action="store_true", help="tiny CPU smoke of every call (the dry run)")
    p.add_argument("--device", default="cuda", help="device of the measured run (cuda; cuda:1, ...)")
    return p


def _plain(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


@dataclass
class PartResult:
    part: str
    out: Path | None
    deadline: float
    environment: dict[str, Any] = field(default_factory=dict)
    sections: list[benchkit.Section] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # "running" while it works; "ok", or "partial: <why>" when it stopped early to keep its budget
    status: str = "running"
    started: float = field(default_factory=time.time)

    def left(self) -> float:
        """Seconds until the deadline (infinite without one)."""
        return self.deadline - time.time() if self.deadline else float("inf")

    def section(self, title: str, description: str, columns: list[str]) -> benchkit.Section:
        s = benchkit.Section(title=title, description=description, columns=columns)
        self.sections.append(s)
        return s

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        benchkit.progress(f"{self.part}: {msg}")
        self.write()

    def stop_early(self, why: str) -> None:
        if not self.status.startswith("partial"):
            self.status = f"partial: {why}"
        self.note(f"stopped early: {why}")

    def finish(self) -> None:
        if self.status == "running":
            self.status = "ok"
        self.write()

    def write(self) -> None:
        if self.out is None:
            return
        data = asdict(self)
        data["out"] = str(self.out)
        data["duration_s"] = round(time.time() - self.started, 2)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=_plain) + "\n")
        tmp.replace(self.out)
