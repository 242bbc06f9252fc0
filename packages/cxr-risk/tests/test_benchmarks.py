"""The benchmark's wiring: budgets for every section and profile, run order of the sweep, partial results.

The benchmark itself runs in CI as ``nox -s bench -- --profile quick``; these checks need no training.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pandas as pd
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TOOLS = Path(__file__).resolve().parents[3] / "tools"


def _load(name: str):
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))  # benchkit, as nox puts it on PYTHONPATH
    spec = importlib.util.spec_from_file_location(f"cxr_risk_bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run():
    return _load("run")


def test_every_section_has_a_budget_in_every_profile(run):
    budgets = json.loads((BENCH / "budget.json").read_text())
    used = re.findall(r'runner\.section\("([^"]+)"\)', (BENCH / "run.py").read_text())
    assert used, "no runner.section(...) found in run.py"
    assert set(budgets) == set(run.PROFILES) == set(_load("cache_speed").PROFILES)
    for profile, data in budgets.items():
        assert list(data["sections"]) == used, (
            f"{profile}: sections {list(data['sections'])} != run order {used}"
        )
        assert all(seconds > 0 for seconds in data["sections"].values())


def test_cells_run_seed_by_seed_with_the_headline_fractions_first(run):
    config = run.SweepConfig(methods=("scratch", "ssae"), fractions=(0.05, 0.25, 1.0), seeds=(0, 1))
    cells = run._cells(config, config.methods)
    assert len(cells) == 12
    assert cells[:6] == [
        (0, 0.05, "scratch"),
        (0, 0.05, "ssae"),
        (0, 1.0, "scratch"),
        (0, 1.0, "ssae"),
        (0, 0.25, "scratch"),
        (0, 0.25, "ssae"),
    ]
    assert {seed for seed, _, _ in cells[6:]} == {1}


def _table(cells: list[tuple[str, float, int, float]]) -> pd.DataFrame:
    rows = []
    for method, frac, seed, c in cells:
        for cohort in ("internal", "external"):
            rows.append(
                dict(
                    method=method,
                    fraction=frac,
                    seed=seed,
                    test_cohort=cohort,
                    c_index=c + (0.01 if cohort == "internal" else 0.0),
                    ci_low=c - 0.05,
                    ci_high=c + 0.05,
                    n_train_patients=10,
                )
            )
    return pd.DataFrame(rows)


def test_headlines_say_which_cells_were_not_run(run):
    import benchkit

    table = _table([("scratch", 0.05, 0, 0.60), ("ssae", 0.05, 0, 0.66), ("scratch", 1.0, 0, 0.70)])
    result = benchkit.Result(package="cxr-risk", device="cpu", profile="quick", environment={})
    refs = {"external": {"true log-hazard (ceiling)": 0.755}}
    run._add_headlines(result, table, ("scratch", "ssae"), (0.05, 1.0), refs)
    by = {h["figure"]: h for h in result.headline}
    assert by["external C, scratch, 5% / 100% of labels"]["value"] == "0.600 / 0.700 (mean of 1 seed)"
    assert by["external C, ssae, 5% / 100% of labels"]["value"] == "0.660 / not run (mean of 1 seed)"
    assert "0.755" in by["external C, ssae, 5% / 100% of labels"]["target"]
    best = by["most label-efficient method: highest internal C at 5% labels"]
    assert best["value"] == "ssae (0.670; next scratch 0.610)" and "ssae" in best["target"]
    uneven = _table([("scratch", 0.05, 0, 0.60), ("scratch", 0.05, 1, 0.62), ("scratch", 1.0, 0, 0.70)])
    result.headline.clear()
    run._add_headlines(result, uneven, ("scratch",), (0.05, 1.0), refs)
    assert result.headline[0]["value"] == "0.610 (2 seeds) / 0.700 (1 seed)"
    rows = run._sweep_rows(table, ("scratch", "ssae"), (0.05, 1.0))
    assert [r[:2] for r in rows] == [["scratch", "0.05"], ["scratch", "1"], ["ssae", "0.05"]]
    assert run._missing_note([(0, 1.0, "ssae"), (1, 0.05, "scratch"), (1, 0.05, "ssae")]) == (
        "seed 0 at 1: ssae; seed 1 at 0.05: scratch, ssae"
    )
