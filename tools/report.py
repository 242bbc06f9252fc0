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
    print(f"Benchmark report: {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
