"""Survival metrics against lifelines (where it has the metric) and against closed-form special cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import multivariate_logrank_test
from lifelines.utils import concordance_index

from cxr_risk.metrics import (
    bootstrap_ci,
    brier_score,
    calibration_at_horizon,
    cox_hazard_ratios,
    harrell_c,
    integrated_brier_score,
    kaplan_meier,
    logrank_test,
    time_dependent_auc,
    uno_c,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def cohort(n: int, seed: int, ties: bool = False):
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    t_event = rng.exponential(10 * np.exp(-0.8 * risk))
    t_cens = rng.uniform(0, 20, n)
    time = np.minimum(t_event, t_cens)
    if ties:
        time = np.ceil(time)
        risk = np.round(risk, 1)
    event = (t_event <= t_cens).astype(int)
    return time, event, risk


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "tied"])
@pytest.mark.parametrize("n", [5, 57, 300])
def test_harrell_c_matches_lifelines(n, ties):
    time, event, risk = cohort(n, seed=n, ties=ties)
    event[0] = 1
    assert abs(harrell_c(time, event, risk) - concordance_index(time, -risk, event)) < 1e-12


def test_uno_c_reduces_to_harrell_without_censoring_and_is_better_than_chance():
    time, event, risk = cohort(200, seed=1)
    ones = np.ones_like(event)
    assert abs(uno_c(time, ones, risk) - harrell_c(time, ones, risk)) < 1e-12
    # truncation at tau only drops pairs whose earlier time is >= tau
    tau = float(np.median(time))
    keep_pairs = uno_c(time, ones, risk, tau=tau)
    assert 0.5 < keep_pairs < 1.0
    assert 0.6 < uno_c(time, event, risk) < 0.9


def test_uno_c_weights_by_hand():
    # censoring at t=2 gives G(t-)=1 for t<=2 and 2/3 after (3 at risk, 1 censored)
    time = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.array([1, 0, 1, 0])
    risk = np.array([4.0, 1.0, 0.0, 2.0])
    # comparable: (0,1),(0,2),(0,3) weight 1 each, all concordant; (2,3) weight (3/2)^2, discordant
    expected = 3.0 / (3.0 + 2.25)
    assert abs(uno_c(time, event, risk) - expected) < 1e-12


def test_time_dependent_auc_without_censoring_is_plain_auc():
    rng = np.random.default_rng(0)
    time = rng.exponential(5, 300)
    risk = -time + rng.normal(0, 3, 300)
    event = np.ones(300, int)
    t = 4.0
    cases, controls = risk[time <= t], risk[time > t]
    plain = (cases[:, None] > controls[None, :]).mean()
    assert abs(time_dependent_auc(time, event, risk, t) - plain) < 1e-12


def test_brier_without_censoring_is_mse_and_ibs_integrates():
    rng = np.random.default_rng(0)
    time = rng.exponential(5, 100)
    event = np.ones(100, int)
    s = rng.random(100)
    t = 5.0
    assert abs(brier_score(time, event, s, t) - np.mean(((time > t) - s) ** 2)) < 1e-12
    times = np.array([1.0, 3.0, 5.0])
    surv = rng.random((100, 3))
    bs = [brier_score(time, event, surv[:, k], times[k]) for k in range(3)]
    expected = ((bs[0] + bs[1]) + (bs[1] + bs[2])) / 2 * 2 / 4
    assert abs(integrated_brier_score(time, event, surv, times) - expected) < 1e-12


def test_kaplan_meier_matches_lifelines():
    time, event, _ = cohort(120, seed=4, ties=True)
    km = kaplan_meier(time, event)
    ref = KaplanMeierFitter().fit(time, event)
    grid = np.linspace(0, time.max(), 37)
    assert np.allclose(km.at(grid), ref.survival_function_at_times(grid).to_numpy(), atol=1e-12)


@pytest.mark.parametrize("k", [2, 5])
def test_logrank_matches_lifelines(k):
    time, event, risk = cohort(250, seed=k, ties=True)
    group = np.digitize(risk, np.quantile(risk, np.linspace(0, 1, k + 1)[1:-1]))
    ours = logrank_test(time, event, group)
    ref = multivariate_logrank_test(time, group, event)
    assert abs(ours.statistic - ref.test_statistic) < 1e-8 * max(1, ref.test_statistic)
    assert abs(ours.p_value - ref.p_value) < 1e-8
    assert ours.df == k - 1


def test_cox_hazard_ratios_match_lifelines():
    time, event, risk = cohort(300, seed=2, ties=True)
    group = np.digitize(risk, [-0.8, 0.0, 0.8])
    fit = cox_hazard_ratios(time, event, group)
    df = pd.DataFrame({f"g{j}": (group == j).astype(float) for j in (1, 2, 3)})
    df["t"], df["e"] = time, event
    cph = CoxPHFitter().fit(df, "t", "e")
    assert fit.reference == 0 and fit.groups == [1, 2, 3]
    assert np.allclose(fit.hazard_ratio, np.exp(cph.params_.to_numpy()), rtol=1e-6)
    ci = np.exp(cph.confidence_intervals_.to_numpy())
    assert np.allclose(fit.ci_low, ci[:, 0], rtol=1e-4) and np.allclose(fit.ci_high, ci[:, 1], rtol=1e-4)
    assert np.allclose(fit.p_value, cph.summary["p"].to_numpy(), rtol=1e-4, atol=1e-12)
    assert fit.hazard_ratio[0] < fit.hazard_ratio[1] < fit.hazard_ratio[2]


@pytest.mark.parametrize("true_slope", [1.0, 2.0])
def test_calibration_slope_recovers_truth(true_slope):
    rng = np.random.default_rng(0)
    n = 20000
    lp = rng.normal(-1, 1, n)
    p = 1 / (1 + np.exp(-lp))
    y = rng.random(n) < 1 / (1 + np.exp(-true_slope * lp))
    time = np.where(y, 1.0, 20.0)  # no censoring: everyone's status at horizon 12 is known
    cal = calibration_at_horizon(time, y.astype(int), p, horizon=12.0)
    assert abs(cal.slope - true_slope) < 0.08
    if true_slope == 1.0:
        assert abs(cal.intercept) < 0.05
        for pred, obs, m in cal.bins:
            assert abs(pred - obs) < 4 * np.sqrt(pred * (1 - pred) / m) + 0.01
    assert cal.n_used == n and sum(b[2] for b in cal.bins) == n


def test_calibration_gives_zero_weight_to_censored_before_horizon():
    time = np.array([1.0, 2.0, 13.0, 14.0, 3.0, 15.0])
    event = np.array([1, 0, 0, 1, 1, 0])
    cal = calibration_at_horizon(time, event, np.full(6, 0.4), horizon=12.0, n_bins=2)
    assert cal.n_used == 5


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    time, event, risk = cohort(150, seed=9)
    a = bootstrap_ci(harrell_c, time, event, risk, n_boot=50, seed=1)
    b = bootstrap_ci(harrell_c, time, event, risk, n_boot=50, seed=1)
    assert a == b and a[1] < a[0] < a[2]
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci(harrell_c, time, event, risk, n_boot=0)


# ------------------------------------------------------------------------- scikit-survival cross-checks
# lifelines has no Uno's C, cumulative/dynamic AUC or IPCW Brier score; scikit-survival does. Times are
# continuous (no ties), where the conventions G(T-) vs G(T) and tie rules of the two libraries coincide;
# tied times, administrative censoring and calibration under censoring are in test_metrics_censoring.py.
def _sksurv_cohorts(seed: int):
    sksurv_util = pytest.importorskip("sksurv.util", reason="scikit-survival is a test-only dependency")
    rng = np.random.default_rng(seed)
    n_train, n_test = 400, 150
    time, event, risk = cohort(n_train + n_test, seed=seed)
    # test times inside the training range: scikit-survival's censoring estimate must cover them
    inside = np.nonzero(time[n_train:] < time[:n_train].max())[0] + n_train
    test = inside[: min(len(inside), n_test)]
    train = np.arange(n_train)
    y_train = sksurv_util.Surv.from_arrays(event[train].astype(bool), time[train])
    y_test = sksurv_util.Surv.from_arrays(event[test].astype(bool), time[test])
    return rng, (time, event, risk), train, test, y_train, y_test


@pytest.mark.parametrize("seed", [0, 1])
def test_harrell_and_uno_c_match_scikit_survival(seed):
    from sksurv.metrics import concordance_index_censored, concordance_index_ipcw

    _, (time, event, risk), train, test, y_train, y_test = _sksurv_cohorts(seed)
    ref_h = concordance_index_censored(event[test].astype(bool), time[test], risk[test])[0]
    assert abs(harrell_c(time[test], event[test], risk[test]) - ref_h) < 1e-12
    tau = float(np.quantile(time[test], 0.8))
    ref_u = concordance_index_ipcw(y_train, y_test, risk[test], tau=tau)[0]
    ours = uno_c(
        time[test], event[test], risk[test], tau=tau, train_time=time[train], train_event=event[train]
    )
    assert abs(ours - ref_u) < 1e-9, (ours, ref_u)


@pytest.mark.parametrize("seed", [0, 1])
def test_time_dependent_auc_matches_scikit_survival(seed):
    from sksurv.metrics import cumulative_dynamic_auc

    _, (time, event, risk), train, test, y_train, y_test = _sksurv_cohorts(seed)
    times = np.quantile(time[test][event[test] == 1], [0.25, 0.5, 0.75])
    ref, _ = cumulative_dynamic_auc(y_train, y_test, risk[test], times)
    ours = [
        time_dependent_auc(time[test], event[test], risk[test], t, time[train], event[train]) for t in times
    ]
    assert np.allclose(ours, ref, atol=1e-9, rtol=0), (ours, ref)


@pytest.mark.parametrize("seed", [0, 1])
def test_brier_and_integrated_brier_match_scikit_survival(seed):
    from sksurv.metrics import brier_score as sk_brier
    from sksurv.metrics import integrated_brier_score as sk_ibs

    rng, (time, event, risk), train, test, y_train, y_test = _sksurv_cohorts(seed)
    times = np.linspace(np.quantile(time[test], 0.1), np.quantile(time[test], 0.7), 9)
    # S_i(t) of a proportional-hazards model with noise: any values in [0, 1] are a valid test
    surv = np.exp(-np.exp(risk[test])[:, None] * times[None, :] / 10) * rng.uniform(0.9, 1.0, (len(test), 1))
    _, ref = sk_brier(y_train, y_test, surv, times)
    ours = [
        brier_score(time[test], event[test], surv[:, k], t, time[train], event[train])
        for k, t in enumerate(times)
    ]
    assert np.allclose(ours, ref, atol=1e-9, rtol=0), (ours, ref)
    ref_ibs = sk_ibs(y_train, y_test, surv, times)
    ours_ibs = integrated_brier_score(time[test], event[test], surv, times, time[train], event[train])
    assert abs(ours_ibs - ref_ibs) < 1e-9, (ours_ibs, ref_ibs)
