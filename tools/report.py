"""Render every ``bench-results/*.json`` (written by ``tools/benchkit.py``) into one REPORT.md.

    python tools/report.py bench-results

Standard library only, so it runs outside any package venv (``nox -s report``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ENV_KEYS = ("git_sha", "time_utc", "python", "torch", "torch_threads", "cpu_count", "processor", "gpu")


def _cell(x: Any) -> str:
    if isinstance(x, float):
        if x != x:  # NaN
            return "n/a"
        return f"{x:.4g}"
    return str(x).replace("|", "\\|")


def render(results: list[dict[str, Any]]) -> str:
    lines = ["# Benchmark report", ""]
    if not results:
        lines.append("No result files were found. Run `nox -s bench`.")
        return "\n".join(lines) + "\n"
    lines += ["| package | device | profile | duration | git sha |", "|---|---|---|---|---|"]
    for r in results:
        env = r.get("environment", {})
        lines.append(
            f"| {r['package']} | {r['device']} | {r['profile']} | {r.get('duration_s', 0):.0f} s | {env.get('git_sha', '?')} |"
        )
    for r in results:
        env = r.get("environment", {})
        lines += ["", f"## {r['package']} ({r['device']}, profile {r['profile']})", ""]
        lines.append(
            "Environment: " + ", ".join(f"{k}={env[k]}" for k in ENV_KEYS if env.get(k) is not None) + "."
        )
        if r.get("headline"):
            lines += ["", "Headline figures:", "", "| figure | value | target |", "|---|---|---|"]
            lines += [
                f"| {_cell(h['figure'])} | {_cell(h['value'])} | {_cell(h.get('target', ''))} |"
                for h in r["headline"]
            ]
        if r.get("timing"):
            lines += [
                "",
                "Time per section (budget on a quiet 2-core CPU):",
                "",
                "| section | budget | actual | status |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {t['section']} | {t['budget_s']:.0f} s | {t['actual_s']:.0f} s | {_cell(t['status'])} |"
                for t in r["timing"]
            ]
        for s in r.get("sections", []):
            lines += ["", f"### {s['title']}", ""]
            if s.get("description"):
                lines += [s["description"], ""]
            if s.get("columns"):
                lines.append("| " + " | ".join(s["columns"]) + " |")
                lines.append("|" + "---|" * len(s["columns"]))
                for row in s.get("rows", []):
                    lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
                lines.append("")
            for plot in s.get("plots", []):
                lines += [f"![{s['title']}]({plot})", ""]
            for note in s.get("notes", []):
                lines.append(f"- {note}")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    folder = Path(argv[1] if len(argv) > 1 else "bench-results")
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            print(f"report: skipping {path}: not valid JSON ({err})", file=sys.stderr)
            continue
        if {"package", "device", "profile"} <= data.keys():
            results.append(data)
    out = folder / "REPORT.md"
    out.write_text(render(results))
    print(summary(results))
    print(f"Benchmark report: {out.resolve()}")
    return 0


def summary(results: list[dict[str, Any]]) -> str:
    """One screen: each package's time against its budget and its headline figures with their targets."""
    lines = ["", "=" * 100, "Benchmark summary", "=" * 100]
    for r in results:
        budget = sum(t["budget_s"] for t in r.get("timing", []))
        over = [t for t in r.get("timing", []) if t["status"] != "ok"]
        lines.append(
            f"{r['package']} ({r['device']}, {r['profile']}): {r.get('duration_s', 0):.0f} s"
            + (f" of a {budget:.0f} s budget" if budget else "")
            + (
                f"; {len(over)} section(s) not ok: "
                + "; ".join(f"{t['section']}: {t['status']}" for t in over)
                if over
                else ""
            )
        )
        for h in r.get("headline", []):
            target = f"   [target: {h['target']}]" if h.get("target") else ""
            lines.append(f"  - {h['figure']}: {h['value']}{target}")
    lines.append("=" * 100)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
