"""The training benchmark's read-outs (steps-to-reach, steps ratio per Muon step) on hand-made curves."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
if not (ROOT / "tools" / "benchkit.py").exists():  # an sdist unpacked outside the monorepo
    pytest.skip("benchmarks need the monorepo's tools/benchkit.py", allow_module_level=True)
sys.path[:0] = [str(ROOT / "tools"), str(Path(__file__).resolve().parents[1] / "benchmarks")]
training = pytest.importorskip("training")


def test_steps_to_reach_interpolates_between_evaluations() -> None:
    curve = [(100, 4.0), (200, 3.0), (300, 2.5)]
    assert training.steps_to_reach(curve, 3.5) == pytest.approx(150.0)
    assert training.steps_to_reach(curve, 3.0) == pytest.approx(200.0)
    assert training.steps_to_reach(curve, 5.0) == pytest.approx(100.0)  # already there at the first eval
    assert training.steps_to_reach(curve, 2.0) is None


def test_ratio_by_muon_step_pairs_seeds_and_marks_unreached() -> None:
    muon = [[(50, 3.5), (100, 3.0)], [(50, 3.6), (100, 2.0)]]
    adamw = [[(100, 3.5), (200, 3.0)], [(100, 3.6), (200, 3.2)]]
    out = training.ratio_by_muon_step(muon, adamw)
    assert out[50] == [pytest.approx(2.0), pytest.approx(2.0)]
    assert out[100][0] == pytest.approx(2.0)
    assert out[100][1] is None  # seed 1's AdamW never reaches 2.0
