"""Kaplan-Meier confidence band (Greenwood, log-log) against lifelines, and the numbers at risk."""

from __future__ import annotations

import numpy as np
import pytest
from lifelines import KaplanMeierFitter

from cxr_risk.metrics import kaplan_meier


def assert_close(ours: np.ndarray, ref: np.ndarray, atol: float, what: str) -> None:
    err = np.abs(ours - ref)
    rel = err / np.maximum(np.abs(ref), 1e-300)
    assert err.max() <= atol, f"{what}: max abs error {err.max():.3g}, max rel error {rel.max():.3g}"


def cohort(n: int, ties: bool, seed: int, all_die_last: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    time = rng.exponential(6.0, n)
    if ties:
        time = np.round(time)  # many deaths and censorings share a time (whole years)
    event = rng.random(n) < 0.65
    if all_die_last:  # S reaches 0: the last patient dies at the largest time
        time[0], event[0] = time.max() + 1.0, True
    return time, event


@pytest.mark.parametrize("alpha", [0.05, 0.1])
@pytest.mark.parametrize(
    "n,ties,all_die_last", [(37, False, False), (200, True, False), (61, True, True), (500, False, True)]
)
def test_band_matches_lifelines(n, ties, all_die_last, alpha):
    time, event = cohort(n, ties, seed=n, all_die_last=all_die_last)
    km = kaplan_meier(time, event)
    lower, upper = km.confidence_band(alpha)
    ref = KaplanMeierFitter(alpha=alpha).fit(time, event).confidence_interval_.loc[km.times].to_numpy()
    assert_close(lower, ref[:, 0], 1e-6, "lower band")
    assert_close(upper, ref[:, 1], 1e-6, "upper band")
    assert np.all(lower <= km.survival + 1e-12) and np.all(km.survival <= upper + 1e-12)
    # a real band: wider than zero wherever 0 < S < 1
    inside = (km.survival > 0) & (km.survival < 1)
    assert np.all(upper[inside] - lower[inside] > 0)


def test_band_narrows_with_level():
    time, event = cohort(120, False, seed=3, all_die_last=False)
    km = kaplan_meier(time, event)
    lo95, hi95 = km.confidence_band(0.05)
    lo80, hi80 = km.confidence_band(0.2)
    inside = (km.survival > 0) & (km.survival < 1)
    assert np.all((hi80 - lo80)[inside] < (hi95 - lo95)[inside])
    with pytest.raises(ValueError, match="alpha"):
        km.confidence_band(1.0)


def test_numbers_at_risk_count_patients_still_observed():
    time, event = cohort(80, True, seed=5, all_die_last=False)
    km = kaplan_meier(time, event)
    ticks = np.array([0.0, 0.5, 1.0, 2.0, 3.0, 7.5, time.max(), time.max() + 1.0])
    expected = np.array([(time >= x).sum() for x in ticks])
    assert np.array_equal(km.n_at_risk(ticks), expected)
