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


def test_report_numbers_match_metrics(patients, tmp_path):
    rep = validation_report(patients, horizon=8.0, n_boot=30)
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
    assert (
        "Harrell's C" in md.read_text()
        and json.loads((tmp_path / "report.json").read_text())["n_patients"] == 300
    )
    for png in ("km.png", "calibration.png", "auc.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_report_quantile_groups_and_missing_columns(patients):
    rep = validation_report(patients, horizon=8.0, n_boot=5, cutpoints="quantiles")
    assert [row["n"] for row in rep["risk_groups"]] == [60] * 5
    with pytest.raises(ValueError, match="follow-up"):
        validation_report(patients.drop(columns=["time"]), horizon=8.0)
