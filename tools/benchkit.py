"""Shared benchmark plumbing: provenance, interleaved timing, and the result file format.

Every ``packages/<dist>/benchmarks/run.py`` imports this module (``nox -s bench`` puts ``tools/`` on
``PYTHONPATH``); it is tooling, not part of any released package. A result file is JSON::

    {"package", "device", "profile", "environment": {...}, "duration_s",
     "sections": [{"title", "description", "columns", "rows", "plots": [png names], "notes": [...]}]}

``tools/report.py`` renders every result file into ``bench-results/REPORT.md``.

Time budgets: each package's ``benchmarks/budget.json`` gives, per profile, the seconds each section
may take on a quiet 2-core CPU (``{"default": {"sections": {"kernel speed": 150, ...}}, ...}``). A
:class:`Runner` prints the plan at the start, one progress line per step with the elapsed and the
estimated remaining time, and records each section's budget and actual time in the result
(``"timing"``); sections poll :meth:`SectionClock.over` and stop cleanly with what they have. A result's
``"headline"`` (``[{"figure", "value", "target"}]``) is what ``report.py`` prints at the end of a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
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


def summarise(xs: list[float]) -> Timing:
    """Median and quartiles of repeated runs (the extremes below 4 runs)."""
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
    return {name: summarise(xs) for name, xs in runs.items()}


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
    # [{"section", "budget_s", "actual_s", "status"}]: filled by Runner.section
    timing: list[dict[str, Any]] = field(default_factory=list)
    # [{"figure", "value", "target"}]: the figures a reader looks for first, printed by report.py
    headline: list[dict[str, Any]] = field(default_factory=list)

    def add_headline(self, figure: str, value: str, target: str = "") -> None:
        self.headline.append({"figure": figure, "value": value, "target": target})

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


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def load_budgets(bench_dir: Path, profile: str) -> dict[str, float]:
    """Section name -> seconds for ``profile`` from ``bench_dir/budget.json`` (insertion order kept)."""
    path = Path(bench_dir) / "budget.json"
    data = json.loads(path.read_text())
    if profile not in data:
        raise SystemExit(f"{path}: no budget for profile {profile!r} (has {sorted(data)})")
    return {name: float(sec) for name, sec in data[profile]["sections"].items()}


class SectionClock:
    """The running section's time: ``over()`` says when to stop, ``progress()`` prints a line."""

    def __init__(self, runner: Runner, name: str, budget: float) -> None:
        self.runner, self.name, self.budget = runner, name, budget
        self.start = time.perf_counter()
        self.stopped_early = ""

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.budget - self.elapsed()

    def over(self, next_cost: float = 0.0) -> bool:
        """Whether running something that takes ``next_cost`` seconds would pass the budget."""
        return self.elapsed() + next_cost > self.budget

    def stop(self, why: str) -> None:
        """Record that the section stopped early (kept in the result and the report)."""
        self.stopped_early = why
        self.progress(f"stopping early: {why}")

    def progress(self, msg: str) -> None:
        self.runner.progress(msg, self)


class Runner:
    """Sections with budgets: the plan up front, progress with elapsed/remaining time, a timing table."""

    def __init__(self, result: Result, budgets: dict[str, float]) -> None:
        self.result, self.budgets = result, budgets
        self.start = time.perf_counter()
        self.done: dict[str, float] = {}
        self.skipped: set[str] = set()
        self.tty = sys.stdout.isatty()

    def plan(self, skipped: Iterable[str] = ()) -> None:
        skipped = set(skipped)
        self.skipped = skipped
        total = sum(b for n, b in self.budgets.items() if n not in skipped)
        r = self.result
        print(
            f"[bench] {r.package} ({r.device}, profile {r.profile}): {len(self.budgets) - len(skipped)} sections, "
            f"budget {_clock(total)} on a quiet 2-core CPU",
            flush=True,
        )
        for i, (name, budget) in enumerate(self.budgets.items(), 1):
            state = "skipped (--skip)" if name in skipped else f"{_clock(budget)}"
            print(f"[bench]   {i}. {name:<40} {state}", flush=True)

    def remaining(self, current: SectionClock | None = None) -> float:
        left = sum(
            b
            for n, b in self.budgets.items()
            if n not in self.done and n not in self.skipped and (current is None or n != current.name)
        )
        if current is not None:
            left += max(0.0, current.remaining())
        return left

    def progress(self, msg: str, current: SectionClock | None = None) -> None:
        elapsed = time.perf_counter() - self.start
        where = ""
        if current is not None:
            idx = list(self.budgets).index(current.name) + 1 if current.name in self.budgets else 0
            where = f"[{idx}/{len(self.budgets)}] {current.name} {_clock(current.elapsed())}/{_clock(current.budget)} | "
        bar = ""
        if self.tty:
            total = elapsed + self.remaining(current)
            frac = min(1.0, elapsed / total) if total > 0 else 1.0
            bar = "[" + "#" * int(20 * frac) + "." * (20 - int(20 * frac)) + "] "
        print(
            f"[bench {time.strftime('%H:%M:%S')}] {self.result.package} {bar}{where}"
            f"{_clock(elapsed)} elapsed, ~{_clock(self.remaining(current))} left | {msg}",
            flush=True,
        )

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[SectionClock]:
        if name not in self.budgets:
            raise KeyError(f"section {name!r} has no budget in budget.json (has {list(self.budgets)})")
        clock = SectionClock(self, name, self.budgets[name])
        clock.progress("start")
        status = "ok"
        try:
            yield clock
        except BaseException:
            status = "failed"
            raise
        finally:
            actual = clock.elapsed()
            self.done[name] = actual
            if status == "ok" and clock.stopped_early:
                status = f"stopped at budget: {clock.stopped_early}"
            elif status == "ok" and actual > clock.budget * 1.1:
                status = f"over budget by {_clock(actual - clock.budget)}"
            self.result.timing.append(
                {"section": name, "budget_s": clock.budget, "actual_s": actual, "status": status}
            )
            self.result.duration_s = time.perf_counter() - self.start
            clock.progress(f"done in {_clock(actual)} (budget {_clock(clock.budget)}): {status}")
