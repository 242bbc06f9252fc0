"""The benchmark's time budgets cover every section it runs, and its zero-shot loop stops on the budget."""

from __future__ import annotations

import importlib
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


def _bench_module(name: str):
    """Import a module of benchmarks/ (not a package) by putting the folder on sys.path for the import."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def fewshot_synthetic():
    return _bench_module("fewshot_synthetic")


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


@pytest.fixture(scope="module")
def wnut17():
    return _bench_module("wnut17")


def test_wnut_run_pools_a_seeds_splits_and_keeps_only_complete_seeds(wnut17, monkeypatch):
    started = []

    def fake_job(job):
        started.append((job.seed, job.split))
        t = wnut17.Tally()
        t.add([["O", "person"]], [["O", "person" if job.split != "B" else "O"]])
        return {
            "seed": job.seed,
            "split": job.split,
            "tallies": {("NNShot", 0): {job.seed: t}},
            "seconds": {"nnshot": 0.1},
            "wall": 1.0,
        }

    monkeypatch.setattr(wnut17, "run_job", fake_job)
    asked = []

    def over(cost):  # the budget is spent once four runs have started
        asked.append(cost)
        return len(started) >= 4

    res = wnut17.run("enc", 2, 2, 1, [0, 1], ["A", "B", "C"], methods=("nnshot",), over=over)
    assert started == [(0, "A"), (0, "B"), (0, "C"), (1, "A")]
    assert asked == [1.0] * 4  # asked before every run but the first, with the slowest run's time
    assert res["runs"] == [(0, "A"), (0, "B"), (0, "C")]
    assert "2 of 6" in res["stopped"] and "seeds [1]" in res["stopped"]
    row = wnut17.summarise(res["tallies"], res["runs"])[("NNShot", 0)]
    # seed 0 pools its three splits (2 of 3 entities found); seed 1's lone split is left out
    assert row["seeds"] == 1 and row["episodes"] == 3
    assert row["pooled"][0] == pytest.approx(0.8)  # P 2/2, R 2/3
