"""The benchmark's read-outs and budget logic: steps-to-reach, steps ratio, lr sweep, seed rounds, repeats."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
if not (ROOT / "tools" / "benchkit.py").exists():  # an sdist unpacked outside the monorepo
    pytest.skip("benchmarks need the monorepo's tools/benchkit.py", allow_module_level=True)
sys.path[:0] = [str(ROOT / "tools"), str(BENCH)]
training = pytest.importorskip("training")
step_time = pytest.importorskip("step_time")


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


def test_ratio_by_muon_step_leaves_out_steps_a_seed_did_not_reach() -> None:
    muon = [[(50, 3.5), (100, 3.0)], [(50, 3.6)]]  # seed 1 stopped at the budget after step 50
    adamw = [[(100, 3.5), (200, 3.0)], [(100, 3.6)]]
    assert list(training.ratio_by_muon_step(muon, adamw)) == [50]


def test_ladder_and_best_lr() -> None:
    assert training.ladder_neighbour(1e-3, up=True) == 3e-3
    assert training.ladder_neighbour(1e-3, up=False) == 3e-4
    assert training.ladder_neighbour(training.LR_LADDER[-1], up=True) is None
    assert training.best_lr({1e-3: 3.0, 3e-3: math.nan, 1e-2: 3.5}) == 1e-3  # diverged counts as worst


def _tiny(**kw: object) -> training.TrainSettings:
    return training.TrainSettings(layers=1, d_model=16, heads=2, context=16, batch=2, eval_every=2,
                                  eval_batches=1, warmup=2, **kw)  # fmt: skip


def _corpus() -> training.Corpus:
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (4096,), generator=gen, dtype=torch.uint8)
    return training.Corpus(train=data, val=data[:1024].clone(), files=0)


@pytest.mark.parametrize("opt_name", ["muon", "adamw"])
def test_extending_a_run_is_the_run_a_fresh_start_gives(opt_name: str) -> None:
    # what lets seed 0 continue its sweep run instead of repeating it
    s, corpus, cpu = _tiny(), _corpus(), torch.device("cpu")
    resumed = training.Run(opt_name, 3e-3, 0, corpus, s, cpu)
    resumed.advance(4)
    resumed.advance(8)
    fresh = training.Run(opt_name, 3e-3, 0, corpus, s, cpu)
    fresh.advance(8)
    assert resumed.curve == fresh.curve
    for a, b in zip(resumed.model.parameters(), fresh.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _FakeRun:
    """A Run whose loss depends on lr (best at 1e-2) and falls with steps; 1 s per step on a fake clock."""

    def __init__(
        self, opt_name: str, lr: float, seed: int, corpus: object, s: object, device: object
    ) -> None:
        self.name, self.lr, self.seed, self.step, self.seconds = opt_name, lr, seed, 0, 0.0
        self.curve: list[tuple[int, float]] = []

    def advance(self, to_step: int) -> list[tuple[int, float]]:
        while self.step < to_step:
            self.step += 1
            self.seconds += 1.0
            if self.step % 2 == 0 or self.step == to_step:
                self.curve.append((self.step, (math.log10(self.lr) + 2) ** 2 + 10 / self.step))
        return self.curve


class _BudgetClock:
    """A section clock that counts the fake runs' seconds as time spent."""

    def __init__(self, budget: float, runs: list[_FakeRun]) -> None:
        self.budget, self.runs, self.stopped_early, self.lines = budget, runs, "", []

    def over(self, next_cost: float = 0.0) -> bool:
        return sum(r.seconds for r in self.runs) + next_cost > self.budget

    def stop(self, why: str) -> None:
        self.stopped_early = why

    def progress(self, msg: str) -> None:
        self.lines.append(msg)


def _patch_runs(monkeypatch: pytest.MonkeyPatch) -> list[_FakeRun]:
    made: list[_FakeRun] = []

    def make(*args: object) -> _FakeRun:
        made.append(_FakeRun(*args))
        return made[-1]

    monkeypatch.setattr(training, "Run", make)
    return made


def test_sweep_widens_a_grid_whose_best_is_at_an_edge(monkeypatch: pytest.MonkeyPatch) -> None:
    made = _patch_runs(monkeypatch)
    s = _tiny(lrs={"adamw": (1e-4, 3e-4), "muon": (3e-3, 1e-2, 3e-2)}, lr_extend=2, sweep_steps=4)
    clock = _BudgetClock(1e9, made)
    sweep = training.lr_sweep(s, None, None, clock)
    assert sweep.added == {"adamw": [1e-3, 3e-3], "muon": []}  # two half-decades, then lr_extend is spent
    assert sweep.best == {"adamw": 3e-3, "muon": 1e-2}
    assert not clock.stopped_early
    notes = training.sweep_section(s, _corpus(), sweep).notes
    assert any("still at an edge" in n for n in notes)  # adamw's best 3e-3 is still its grid's largest


def test_sweep_stops_before_a_run_that_would_pass_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    made = _patch_runs(monkeypatch)
    s = _tiny(lrs={"adamw": (1e-3, 3e-3, 1e-2), "muon": (1e-3, 3e-3, 1e-2)}, sweep_steps=4)
    clock = _BudgetClock(13, made)  # three 4-second runs fit, a fourth does not
    sweep = training.lr_sweep(s, None, None, clock)
    assert len(made) == 3 and "would pass the budget" in clock.stopped_early
    assert set(sweep.bpb["adamw"]) == {1e-3, 3e-3} and set(sweep.bpb["muon"]) == {1e-3}


def test_seed_rounds_stop_together_and_the_read_outs_use_what_every_seed_reached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    made = _patch_runs(monkeypatch)
    s = _tiny(lrs={"adamw": (1e-2,), "muon": (1e-2,)}, lr_extend=0, sweep_steps=4, muon_steps=8,
              adamw_steps=16, seeds=(0, 1))  # fmt: skip
    sweep = training.lr_sweep(s, None, None, _BudgetClock(1e9, made))
    assert len(made) == 2
    clock = _BudgetClock(8 + 20, made)  # the sweep's 8 s, then 20 s: not enough for seed 1's AdamW chunk 4-8
    runs = training.seed_runs(s, sweep, None, None, clock)
    assert runs["muon"][0] is sweep.runs[("muon", 1e-2)]  # seed 0 continues its sweep run
    assert "would pass the budget" in clock.stopped_early
    steps = {name: [r.step for r in rs] for name, rs in runs.items()}
    # round-robin from where each run stood (seed 0 at its sweep's step 4): both seeds moved each round
    assert steps == {"muon": [8, 4], "adamw": [12, 4]}
    section, summary = training.seeds_section(s, sweep, runs, tmp_path, "t", clock.stopped_early)
    assert summary["muon_steps_done"] == 4 and summary["adamw_steps_done"] == 4
    assert set(summary["steps_ratio_by_muon_step"]) == {"2", "4"}
    assert any("Stopped at the section's budget" in n for n in section.notes)
    json.dumps(summary)  # goes into the result file as it is


def test_time_within_cuts_repeats_to_the_seconds_given() -> None:
    calls = {"a": 0}

    def slow() -> None:
        calls["a"] += 1
        time.sleep(0.02)

    timings, n, round_s = step_time.time_within({"a": slow}, repeats=50, seconds=0.1)
    assert 1 <= n < 50 and calls["a"] == n + 1 and round_s >= 0.02
    assert len(timings["a"].runs) == n
    _, n, _ = step_time.time_within({"a": slow}, repeats=3, seconds=10.0)
    assert n == 3


def test_every_section_has_a_budget_in_every_profile() -> None:
    import run

    budgets = json.loads((BENCH / "budget.json").read_text())
    sections = list(dict.fromkeys(name for names in run.SKIPS.values() for name in names))
    for profile in ("quick", "default", "full"):
        assert list(budgets[profile]["sections"]) == sections, profile
