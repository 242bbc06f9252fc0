"""The benchmark report renders every result file's sections, tables and plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import benchkit  # noqa: E402
import report  # noqa: E402


def test_result_round_trip_and_report(tmp_path: Path) -> None:
    section = benchkit.Section(
        title="Forward at 32K",
        description="median of 5 interleaved runs",
        columns=["backend", "seconds", "ratio"],
        rows=[["moba|torch", 0.5, 3.25], ["sdpa", 1.625, float("nan")]],
        plots=["x-speed.png"],
        notes=["measured on a shared CPU"],
    )
    result = benchkit.Result(
        "moba-attn", "cpu", "default", {"git_sha": "abc", "torch": "2.x"}, [section], 12.0
    )
    result.write(tmp_path / "moba-attn-cpu.json")
    (tmp_path / "broken.json").write_text("{")
    assert report.main(["report", str(tmp_path)]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    assert "## moba-attn (cpu, profile default)" in text
    assert "| moba\\|torch | 0.5 | 3.25 |" in text
    assert "| sdpa | 1.625 | n/a |" in text
    assert "![Forward at 32K](x-speed.png)" in text
    assert "- measured on a shared CPU" in text
    assert (
        json.loads((tmp_path / "moba-attn-cpu.json").read_text())["sections"][0]["rows"][0][0] == "moba|torch"
    )


def test_time_interleaved_orders_and_counts() -> None:
    calls: list[str] = []
    timings = benchkit.time_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1
    )
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert set(timings) == {"a", "b"} and len(timings["a"].runs) == 3
    assert timings["a"].q25 <= timings["a"].median <= timings["a"].q75


def test_runner_plans_times_sections_and_flags_overruns(tmp_path: Path, capsys) -> None:
    (tmp_path / "budget.json").write_text(
        json.dumps({"quick": {"sections": {"fast": 5, "slow": 0.01}}, "default": {"sections": {"x": 1}}})
    )
    budgets = benchkit.load_budgets(tmp_path, "quick")
    assert budgets == {"fast": 5.0, "slow": 0.01}
    result = benchkit.Result("pkg", "cpu", "quick", {})
    runner = benchkit.Runner(result, budgets)
    runner.plan()
    with runner.section("fast") as clock:
        assert not clock.over() and clock.over(next_cost=10)
        clock.progress("step 1")
    with runner.section("slow") as clock:
        import time

        time.sleep(0.05)
        assert clock.over()
        clock.stop("no time for seed 2")
    out = capsys.readouterr().out
    assert "2 sections, budget 0:05" in out and "1. fast" in out and "step 1" in out
    assert [t["status"] for t in result.timing] == ["ok", "stopped at budget: no time for seed 2"]
    result.add_headline("speed-up", "3.1x", "at least 2x")
    result.write(tmp_path / "pkg-cpu.json")
    assert report.main(["report", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    assert "speed-up: 3.1x   [target: at least 2x]" in shown and "1 section(s) not ok" in shown
    text = (tmp_path / "REPORT.md").read_text()
    assert "| speed-up | 3.1x | at least 2x |" in text and "| slow | 0 s |" in text
    try:
        benchkit.load_budgets(tmp_path, "full")
    except SystemExit as exc:
        assert "no budget for profile 'full'" in str(exc)
    else:
        raise AssertionError("a missing profile must be named")
