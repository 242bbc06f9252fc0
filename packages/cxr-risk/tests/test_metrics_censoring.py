"""Censoring conventions of the IPCW metrics: calibration under censoring, ties, administrative censoring.

References: scikit-survival (Brier, integrated Brier, Uno's C, cumulative/dynamic AUC, censoring
Kaplan-Meier) and lifelines (Kaplan-Meier). scikit-survival weights a death by G(T_i), we by the left limit
G(T_i-) (see the cxr_risk.metrics docstring); the two agree wherever no death shares its time with a
censoring, and on fully tied data scikit-survival agrees with us once each death is moved ``NUDGE`` earlier,
which turns its G(T_i) into G(T_i-) and changes nothing else (all evaluation times are off the grid).
"""

from __future__ import annotations

import numpy as np
import pytest

from cxr_risk.metrics import (
    brier_score,
    calibration_at_horizon,
    censoring_kaplan_meier,
    integrated_brier_score,
    time_dependent_auc,
    uno_c,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

NUDGE = 1e-9  # far below the unit time grid, far above float64 spacing at times <= 20
HORIZON = 12.0


def assert_close(ours, ref, atol: float, what: str) -> None:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    err = np.abs(ours - ref)
    rel = err / np.maximum(np.abs(ref), 1e-300)
    assert err.max() <= atol, (
        f"{what}: max abs err {err.max():.3e}, rel {rel.max():.3e}\nours={ours}\nref={ref}"
    )


def tied_cohort(n: int, seed: int, cens_grid: float = 0.0):
    """Integer times (many deaths and censorings share a time); censorings shifted by ``cens_grid``."""
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    t_event = np.ceil(rng.exponential(8 * np.exp(-0.8 * risk)))
    t_cens = np.ceil(rng.uniform(0, 14, n)) + cens_grid
    time = np.minimum(t_event, t_cens)
    event = t_event <= t_cens
    return time, event.astype(int), risk


def surv_matrix(risk: np.ndarray, times: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.exp(-np.exp(risk)[:, None] * times[None, :] / 8) * rng.uniform(0.9, 1.0, (len(risk), 1))


def _surv(event: np.ndarray, time: np.ndarray):
    util = pytest.importorskip("sksurv.util", reason="scikit-survival is a test-only dependency")
    return util.Surv.from_arrays(event.astype(bool), time)


# ------------------------------------------------------------------------------ censoring Kaplan-Meier
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_censoring_km_matches_sksurv_and_lifelines_on_tied_data(seed):
    nonparametric = pytest.importorskip("sksurv.nonparametric")
    lifelines = pytest.importorskip("lifelines")
    time, event, _ = tied_cohort(300, seed)
    assert ((event == 1) & np.isin(time, time[event == 0])).sum() > 20  # deaths tied with censorings
    g = censoring_kaplan_meier(time, event)
    grid = np.concatenate([np.unique(time), np.unique(time) + 0.5])
    grid = grid[grid < time.max()]
    ref = nonparametric.CensoringDistributionEstimator().fit(_surv(event, time))
    assert_close(g.at(grid), ref.predict_proba(grid), 1e-12, "G(t) vs sksurv")
    # lifelines' Kaplan-Meier of the censorings counts a death at u in the risk set at u; moved an instant
    # earlier, the deaths leave it first, which is our (and sksurv's) convention
    km = lifelines.KaplanMeierFitter().fit(time - NUDGE * event, 1 - event)
    assert_close(g.at(grid), km.survival_function_at_times(grid).to_numpy(), 1e-12, "G(t) vs lifelines")
    assert_close(g.before(grid), km.survival_function_at_times(grid - 1e-6).to_numpy(), 1e-12, "G(t-)")


def test_censoring_km_by_hand_with_a_death_tied_to_a_censoring():
    # t=1: one death, one censoring; the death leaves first, so the censoring's risk set is {1c, 2, 3}
    g = censoring_kaplan_meier(np.array([1.0, 1.0, 2.0, 3.0]), np.array([1, 0, 1, 0]))
    assert g.before(1.0) == 1.0 and g.at(1.0) == pytest.approx(2 / 3, abs=1e-15)
    assert g.at(2.5) == pytest.approx(2 / 3, abs=1e-15) and g.at(3.0) == 0.0


# ------------------------------------------------------------------------- IPCW metrics vs sksurv
def _split(seed: int, own: bool):
    time, event, risk = tied_cohort(700, seed)
    if own:
        return time, event, risk, (time, event)
    train, test = np.arange(400), np.arange(400, 700)
    test = test[time[test] < time[train].max()]
    return time[test], event[test], risk[test], (time[train], event[train])


@pytest.mark.parametrize("own", [True, False], ids=["G-own-cohort", "G-train"])
@pytest.mark.parametrize("seed", [0, 1])
def test_ipcw_metrics_match_sksurv_on_tied_data(seed, own):
    from sksurv.metrics import brier_score as sk_brier
    from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc
    from sksurv.metrics import integrated_brier_score as sk_ibs

    time, event, risk, (tr_t, tr_e) = _split(seed, own)
    assert ((time < HORIZON) & (event == 0)).mean() > 0.25  # much censoring before the horizon
    y_train = _surv(tr_e, tr_t)
    y_nudged = _surv(event, time - NUDGE * event)
    times = np.arange(1.5, 11.0, 1.0)  # off the integer grid: nobody is censored exactly at t
    surv = surv_matrix(risk, times, seed)
    kw = {"train_time": tr_t, "train_event": tr_e}

    _, ref = sk_brier(y_train, y_nudged, surv, times)
    ours = [brier_score(time, event, surv[:, k], t, **kw) for k, t in enumerate(times)]
    assert_close(ours, ref, 1e-7, "brier_score")
    ibs = integrated_brier_score(time, event, surv, times, **kw)
    assert_close(ibs, sk_ibs(y_train, y_nudged, surv, times), 1e-7, "integrated_brier_score")

    tau = 10.5
    assert_close(
        uno_c(time, event, risk, tau=tau, **kw),
        concordance_index_ipcw(y_train, y_nudged, risk, tau)[0],
        1e-7,
        "uno_c",
    )
    ref_auc, _ = cumulative_dynamic_auc(y_train, y_nudged, risk, times)
    assert_close([time_dependent_auc(time, event, risk, t, **kw) for t in times], ref_auc, 1e-7, "AUC")


@pytest.mark.parametrize("seed", [0, 1])
def test_ipcw_metrics_match_raw_sksurv_when_deaths_do_not_tie_with_censorings(seed):
    from sksurv.metrics import brier_score as sk_brier
    from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc

    # deaths tie with deaths and censorings with censorings, never with each other: no nudge needed
    time, event, risk = tied_cohort(500, seed, cens_grid=0.5)
    y = _surv(event, time)
    times = np.arange(1.25, 11.0, 1.0)
    surv = surv_matrix(risk, times, seed)
    _, ref = sk_brier(y, y, surv, times)
    assert_close([brier_score(time, event, surv[:, k], t) for k, t in enumerate(times)], ref, 1e-9, "brier")
    assert_close(
        uno_c(time, event, risk, tau=10.75), concordance_index_ipcw(y, y, risk, 10.75)[0], 1e-9, "uno"
    )
    ref_auc, _ = cumulative_dynamic_auc(y, y, risk, times)
    assert_close([time_dependent_auc(time, event, risk, t) for t in times], ref_auc, 1e-9, "AUC")


def test_brier_weights_a_death_tied_with_a_censoring_by_the_left_limit():
    time = np.array([1.0, 1.0, 2.0, 3.0, 4.0])
    event = np.array([1, 0, 1, 0, 1])
    s = np.array([0.2, 0.5, 0.4, 0.7, 0.6])
    # G: censoring at 1 among {1c, 2, 3, 4} -> 3/4; at 3 among {3c, 4} -> 3/8.
    # At t=2.5: deaths 1 (G(1-)=1) and 2 (G(2-)=3/4); alive 3, 4 (G(2.5-)=3/4); censored-at-1 weight 0.
    expected = (0.2**2 / 1 + 0.4**2 / 0.75 + (1 - 0.7) ** 2 / 0.75 + (1 - 0.6) ** 2 / 0.75) / 5
    assert brier_score(time, event, s, 2.5) == pytest.approx(expected, abs=1e-15)


# ------------------------------------------------------------------ administrative censoring at t
def admin_cohort(n: int, seed: int, early_censoring: bool):
    rng = np.random.default_rng(seed)
    lam = 0.05 * np.exp(rng.normal(0, 1, n))
    t_event = rng.exponential(1 / lam)
    t_cens = np.minimum(rng.uniform(0, 30, n), HORIZON) if early_censoring else np.full(n, HORIZON)
    time = np.minimum(t_event, t_cens)
    return time, (t_event <= t_cens).astype(int), np.exp(-lam * HORIZON)


def test_brier_at_administrative_censoring_counts_those_censored_at_t_as_alive():
    time, event, s = admin_cohort(2000, 0, early_censoring=False)
    assert (time == HORIZON).mean() > 0.4 and not (event[time == HORIZON]).any()
    # nobody is lost before 12 y, so the status at 12 y is known for all and the Brier score is a plain MSE
    plain = np.mean(((time >= HORIZON) - s) ** 2)
    assert brier_score(time, event, s, HORIZON) == pytest.approx(plain, abs=1e-12)
    assert abs(brier_score(time, event, s, HORIZON) - brier_score(time, event, s, HORIZON - 0.01)) < 0.01
    aucs = [time_dependent_auc(time, event, -s, t) for t in (HORIZON, HORIZON - 1e-6)]
    assert np.isfinite(aucs[0]) and aucs[0] == pytest.approx(aucs[1], abs=1e-12)


def test_brier_at_administrative_censoring_with_earlier_censoring_matches_sksurv_just_before():
    from sksurv.metrics import brier_score as sk_brier

    time, event, s = admin_cohort(2000, 1, early_censoring=True)
    assert (time == HORIZON).mean() > 0.3 and ((time < HORIZON) & (event == 0)).mean() > 0.2
    # scikit-survival refuses t = max(time); just before it, those censored at 12 y are its controls,
    # weighted by G(12-) as ours are at 12 y (no death falls in the gap)
    _, ref = sk_brier(_surv(event, time), _surv(event, time), s, HORIZON - NUDGE)
    assert_close(brier_score(time, event, s, HORIZON), ref, 1e-9, "brier at 12 y vs sksurv at 12 y - 1e-9")


# ------------------------------------------------------------------------------ calibration under IPCW
def calibrated_cohort(n: int, seed: int, cens_rate: float):
    """Exponential event times, prob = the true P(T <= 12 y); exponential censoring, end of study 15 y."""
    rng = np.random.default_rng(seed)
    lam = 0.05 * np.exp(rng.normal(0, 1, n))
    t_event = rng.exponential(1 / lam)
    t_cens = np.minimum(rng.exponential(1 / cens_rate, n), 15.0)
    time = np.minimum(t_event, t_cens)
    event = t_event <= t_cens
    return time, event.astype(int), 1 - np.exp(-lam * HORIZON)


# censoring hazards that lose ~30 % and ~60 % of the cohort before the horizon
CENSORING = pytest.mark.parametrize("rate,lost", [(0.042, 0.29), (0.125, 0.59)], ids=["30pc", "60pc"])


@CENSORING
def test_calibration_of_calibrated_predictions_under_censoring(rate, lost):
    # n = 1e5: the intercept's sampling sd is ~0.008 at 60 % censoring, so 0.05 is > 5 sd
    time, event, p = calibrated_cohort(100_000, 0, rate)
    assert abs(((time < HORIZON) & (event == 0)).mean() - lost) < 0.02
    cal = calibration_at_horizon(time, event, p, HORIZON)
    assert abs(cal.intercept) < 0.05, cal.intercept
    assert abs(cal.slope - 1.0) < 0.1, cal.slope
    assert cal.n_used == int(((time >= HORIZON) | (event == 1)).sum())
    for pred, obs, m in cal.bins:
        assert abs(pred - obs) < 0.02, (pred, obs, m)


@CENSORING
def test_calibration_detects_overestimated_risk_under_censoring(rate, lost):
    time, event, p = calibrated_cohort(100_000, 1, rate)
    # doubling the odds adds log 2 to every logit: the intercept must come out -log 2
    cal = calibration_at_horizon(time, event, 2 * p / (1 + p), HORIZON)
    assert abs(cal.intercept + np.log(2)) < 0.05 and abs(cal.slope - 1.0) < 0.1, (cal.intercept, cal.slope)
    doubled = calibration_at_horizon(time, event, np.minimum(2 * p, 0.99), HORIZON)
    assert doubled.intercept < -1.0, doubled.intercept
