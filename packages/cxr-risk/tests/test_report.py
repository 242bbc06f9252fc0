"""Validation report from patient-level predictions: numbers agree with the metric functions; files written."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cxr_risk.metrics import harrell_c, logrank_test
from cxr_risk.report import validation_report, write_report
from cxr_risk.survival import risk_groups


@pytest.fixture
def patients() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 300
    lp = rng.normal(-1.5, 1.0, n)
    t_ev = rng.exponential(12 / np.exp(lp + 1.5))
    time = np.minimum(t_ev, 12.0)
    event = (t_ev <= 12.0).astype(int)
    prob = 1 / (1 + np.exp(-lp))
    return pd.DataFrame({"time": time, "event": event, "risk": lp, "prob": prob})


def make_patients(n: int, seed: int = 0, shift: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    lp = rng.normal(-1.5 + shift, 1.0, n)
    t_ev = rng.exponential(12 / np.exp(lp + 1.5))
    time = np.minimum(t_ev, 12.0)
    event = (t_ev <= 12.0).astype(int)
    prob = 1 / (1 + np.exp(-lp))
    return pd.DataFrame({"time": time, "event": event, "risk": lp, "prob": prob})


def headline(rep: dict) -> dict[str, dict]:
    out = {"harrell_c": rep["harrell_c"], "uno_c": rep["uno_c"], "brier": rep["brier_at_horizon"]}
    out.update({f"auc@{k}": v for k, v in rep["time_dependent_auc"].items()})
    out.update(slope=rep["calibration"]["slope"], intercept=rep["calibration"]["intercept"])
    if "integrated_brier" in rep:
        out["ibs"] = rep["integrated_brier"]
    return out


def test_report_numbers_match_metrics(patients, tmp_path):
    rep = validation_report(patients, horizon=8.0, n_boot=30, time_unit="years")
    t, e, r = (patients[c].to_numpy() for c in ("time", "event", "risk"))
    assert rep["harrell_c"]["estimate"] == pytest.approx(harrell_c(t, e, r))
    lo, hi = rep["harrell_c"]["ci95"]
    assert lo < rep["harrell_c"]["estimate"] < hi
    g = risk_groups(patients["prob"].to_numpy())
    assert rep["logrank"]["statistic"] == pytest.approx(logrank_test(t, e, g).statistic)
    assert sum(row["n"] for row in rep["risk_groups"]) == len(patients)
    ref = [row for row in rep["risk_groups"] if row.get("reference")]
    assert len(ref) == 1 and ref[0]["group"] == int(g.min())
    assert rep["cutpoints"] == [0.064, 0.096, 0.158, 0.348]
    md = write_report(rep, patients, tmp_path)
    text = md.read_text()
    assert "Harrell's C" in text and "horizon 8 years" in text
    assert json.loads((tmp_path / "report.json").read_text())["n_patients"] == 300
    for png in ("km.png", "calibration.png", "auc.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_report_quantile_groups_and_missing_columns(patients):
    rep = validation_report(patients, horizon=8.0, n_boot=5, cutpoints="quantiles")
    assert [row["n"] for row in rep["risk_groups"]] == [60] * 5
    with pytest.raises(ValueError, match="follow-up"):
        validation_report(patients.drop(columns=["time"]), horizon=8.0)


def test_every_headline_figure_has_a_ci_around_it_that_narrows_with_n():
    small, large = make_patients(150, seed=1), make_patients(1200, seed=1)
    surv_times = [1.0, 2.0, 4.0, 6.0, 8.0]

    def surv(p: pd.DataFrame) -> np.ndarray:  # the true model's S(t): hazard exp(lp + 1.5) / 12
        return np.exp(-np.outer(np.exp(p["risk"].to_numpy() + 1.5) / 12, surv_times))

    reps = [
        validation_report(p, horizon=8.0, n_boot=60, seed=3, surv=surv(p), surv_times=surv_times)
        for p in (small, large)
    ]
    for rep in reps:
        assert rep["bootstrap"] == {
            "n": 60,
            "seed": 3,
            "unit": "patient",
            "method": "percentile",
            "level": 0.95,
        }
        for name, m in headline(rep).items():
            lo, hi = m["ci95"]
            assert lo <= m["estimate"] <= hi, (name, m)
            assert hi > lo, (name, m)
    assert len(headline(reps[0])) == 10  # 2 C-indices, 4 AUC(t), Brier, IBS, slope, intercept
    for name in headline(reps[0]):
        w_small = np.diff(headline(reps[0])[name]["ci95"])[0]
        w_large = np.diff(headline(reps[1])[name]["ci95"])[0]
        # 8x the patients: about sqrt(8) = 2.8x narrower; 0.7 leaves room for resampling noise
        assert w_large < 0.7 * w_small, (name, w_small, w_large)


def test_bootstrap_is_seeded(patients):
    a = validation_report(patients, horizon=8.0, n_boot=20, seed=5)
    b = validation_report(patients, horizon=8.0, n_boot=20, seed=5)
    c = validation_report(patients, horizon=8.0, n_boot=20, seed=6)
    assert a["uno_c"]["ci95"] == b["uno_c"]["ci95"] and a["uno_c"]["ci95"] != c["uno_c"]["ci95"]


def test_collapsed_groups_warn_and_balanced_ones_do_not(patients, tmp_path):
    balanced = validation_report(patients, horizon=8.0, n_boot=5, cutpoints="quantiles", time_unit="years")
    assert balanced["warnings"] == []
    assert [s["name"] for s in balanced["stratifications"]] == [
        "validated-cohort quintiles",
        "CXR-risk",
        "development quantiles",
    ]
    # every predicted risk above the top CXR-risk cut-point: one group, as with an uncalibrated model
    high = patients.assign(prob=0.5 + 0.4 * patients["prob"])
    rep = validation_report(high, horizon=8.0, n_boot=5, time_unit="years")
    cxr = rep["stratifications"][0]
    assert cxr["name"] == "CXR-risk" and [g["n"] for g in cxr["groups"]] == [0, 0, 0, 0, 300]
    assert any("collapsed" in w and "'very high'" in w for w in rep["warnings"]), rep["warnings"]
    assert cxr["logrank"]["statistic"] is None and cxr["logrank"]["df"] == 0
    assert not any(g.get("reference") for g in cxr["groups"])
    md = write_report(rep, high, tmp_path).read_text()
    assert "collapsed" in md and "nan" not in md.lower()
    assert json.loads((tmp_path / "report.json").read_text())["logrank"]["p_value"] is None
    # a group with a handful of patients is flagged too
    few = patients.assign(prob=np.where(np.arange(300) < 4, 0.01, 0.5))
    warned = validation_report(few, horizon=8.0, n_boot=5)["warnings"]
    assert any("fewer than 10 patients: 'very low' (4)" in w for w in warned), warned


def test_development_cutpoints_give_a_second_stratification(patients, tmp_path):
    dev = make_patients(500, seed=7)
    from cxr_risk.survival import quantile_cutpoints

    record = {"source": "development quantiles", "quantiles": [0.2, 0.4, 0.6, 0.8], "n_patients": 500}
    record["cutpoints"] = list(quantile_cutpoints(dev["prob"].to_numpy()))
    rep = validation_report(patients, horizon=8.0, n_boot=5, development_cutpoints=record)
    fixed, devq = rep["stratifications"]
    assert fixed["name"] == "CXR-risk" and devq["name"] == "development quantiles" and devq["available"]
    assert devq["cutpoints"] == record["cutpoints"]
    assert [g["n"] for g in devq["groups"]] == list(
        np.bincount(risk_groups(patients["prob"].to_numpy(), record["cutpoints"]), minlength=5)
    )
    text = write_report(rep, patients, tmp_path).read_text()
    assert "## Risk groups: CXR-risk" in text and "## Risk groups: development quantiles" in text
    assert (tmp_path / "km.png").stat().st_size > 1000
    # without stored cut-points the report says so instead of inventing them
    rep = validation_report(patients, horizon=8.0, n_boot=5)
    assert (
        rep["stratifications"][1]
        == {
            **rep["stratifications"][1],
            "available": False,
        }
        and "unavailable" in rep["stratifications"][1]["note"]
    )
    assert "unit not recorded" in write_report(rep, patients, tmp_path).read_text()


def test_horizon_beyond_follow_up_is_an_error(patients):
    with pytest.raises(
        ValueError, match=r"horizon 20 years is beyond the longest follow-up in column 'time'"
    ):
        validation_report(patients, horizon=20.0, n_boot=5, time_unit="years")
    days = patients.assign(time=patients["time"] * 365.25)
    rep = validation_report(days, horizon=12.0, n_boot=5, time_unit="years")
    assert any("look like weeks or days, not years" in w for w in rep["warnings"]), rep["warnings"]
