"""The benchmark's time budgets cover every section it runs, and its zero-shot loop stops on the budget."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from conftest import tiny_bert

from proml_ner.model import ProML, ProMLConfig
from proml_ner.synthetic import synthetic_episodes

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_every_profile_budgets_the_sections_run_py_enters_in_run_order():
    budgets = json.loads((BENCH / "budget.json").read_text())
    entered = re.findall(r'runner\.section\("([^"]+)"\)', (BENCH / "run.py").read_text())
    assert sorted(budgets) == ["default", "full", "quick"]  # the noxfile's PROFILES
    assert entered, "run.py enters no runner.section"
    for profile, spec in budgets.items():
        assert list(spec["sections"]) == entered, f"{profile}: {list(spec['sections'])} != {entered}"
        assert all(sec > 0 for sec in spec["sections"].values()), profile


@pytest.fixture(scope="module")
def fewshot_synthetic():
    sys.path.insert(0, str(BENCH))
    try:
        import fewshot_synthetic
    finally:
        sys.path.remove(str(BENCH))
    return fewshot_synthetic


@pytest.fixture(scope="module")
def tiny_proml(tokenizer):
    cfg = ProMLConfig(encoder="tiny", embedding_dim=16, hidden_layers=2, max_length=64)
    return ProML(cfg, tiny_bert(tokenizer, layers=2), tokenizer).eval()


def test_zero_shot_gap_stops_when_the_next_episode_would_pass_the_budget(fewshot_synthetic, tiny_proml):
    episodes = synthetic_episodes("test", 5, 5, 3, seed=100)
    asked: list[float] = []

    def over(next_cost: float) -> bool:
        asked.append(next_cost)
        return True  # the budget is spent after the first episode

    stopped = fewshot_synthetic.zero_shot_gap(tiny_proml, episodes, over=over)
    assert stopped["stopped_after"] == 1 and stopped["episodes"] <= 1
    assert len(asked) == 1 and asked[0] >= 0.0  # asked once, with the measured cost of an episode

    full = fewshot_synthetic.zero_shot_gap(tiny_proml, episodes)
    assert full["stopped_after"] is None and full["episodes"] >= stopped["episodes"]
