"""Patient-level survival metrics for validation reports (numpy; small cohorts, exact formulas).

What the CXR-risk papers report (Lu et al. 2019; Chen, Lu & Raghu, MIDL 2023): discrimination (Harrell's C,
Uno's C with bootstrap CIs, time-dependent AUC), overall accuracy (Brier and integrated Brier score),
calibration at the horizon (slope, intercept, reliability table), and risk stratification (Kaplan-Meier by
risk group, log-rank test, hazard ratio of each group against the lowest).

Conventions: ``risk`` is higher-is-worse; ``surv`` is S(t) per patient. Censoring weights use G, the
Kaplan-Meier estimate of the censoring survival P(C > t) (`censoring_kaplan_meier`). At a time shared by
deaths and censorings the deaths come first: they leave G's risk set before the censorings at that time are
counted, and a censoring at t means the patient was seen alive at t. So a patient's status is known from time
s on exactly when C >= s, and every IPCW weight is 1 / G(s-), the left limit: s = T_i for a death, s = t for
a patient alive at t (followed past t, or censored exactly at t). This is the weighting of Graf et al. (1999)
and Gerds & Schumacher (2006, Biom J 48:1029) as in R's pec/riskRegression. scikit-survival (0.28) uses the
same G but evaluates it at T_i, not T_i-, and counts as alive at t only T_i > t: on continuous times, and
on tied times where no death shares its time with a censoring and nobody is censored exactly at t, the two
agree to rounding (the tests check this, and the tied case against scikit-survival with death times moved
an instant earlier). Where a death ties with a censoring, G(T_i) would drop that censoring into the death's
own weight, and where everyone left at t is censored at t (administrative end of follow-up) G(t) = 0 and
scikit-survival's alive patients vanish; the left limit has neither defect. Tests check each function
against lifelines or scikit-survival where they have one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch

from .survival import CensoringKM, censoring_kaplan_meier, cox_ph_loss

__all__ = [
    "Calibration",
    "CensoringKM",
    "CoxFit",
    "KaplanMeier",
    "LogRank",
    "bootstrap_ci",
    "brier_score",
    "calibration_at_horizon",
    "censoring_kaplan_meier",
    "cox_hazard_ratios",
    "harrell_c",
    "integrated_brier_score",
    "kaplan_meier",
    "logrank_test",
    "time_dependent_auc",
    "uno_c",
]


def _arrays(time: np.ndarray, event: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event).astype(bool)
    rest = tuple(np.asarray(o, dtype=np.float64) for o in others)
    for name, a in zip(("event", *(f"arg{i}" for i in range(len(rest)))), (e, *rest)):
        if a.shape[0] != t.shape[0]:
            raise ValueError(f"metrics: {name} has {a.shape[0]} rows but time has {t.shape[0]}")
    if t.size == 0:
        raise ValueError("metrics: empty cohort")
    return (t, e, *rest)


def _pair_scores(ri: np.ndarray, rj: np.ndarray) -> np.ndarray:
    """1 if the first risk is higher, 0.5 if tied, 0 otherwise (pairwise, broadcast)."""
    return (ri > rj).astype(np.float64) + 0.5 * (ri == rj)


def harrell_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's concordance: among pairs where the shorter time is an event, the share ordered correctly.

    Pair (i, j) is comparable when d_i = 1 and T_i < T_j, or T_i = T_j with j censored (a censoring at the
    time of a death is taken to come after it); tied risks count one half. Equals
    ``lifelines.utils.concordance_index(time, -risk, event)``.
    """
    t, e, r = _arrays(time, event, risk)
    num = den = 0.0
    for i in np.nonzero(e)[0]:
        later = (t > t[i]) | ((t == t[i]) & ~e)
        den += later.sum()
        num += _pair_scores(r[i], r[later]).sum()
    return float(num / den) if den > 0 else float("nan")


# ------------------------------------------------------------------------------------ censoring weights
def _censoring(
    time: np.ndarray, event: np.ndarray, train_time: np.ndarray | None, train_event: np.ndarray | None
) -> CensoringKM:
    if (train_time is None) != (train_event is None):
        raise ValueError("metrics: give both train_time and train_event, or neither")
    if train_time is None:
        return censoring_kaplan_meier(time, event)
    return censoring_kaplan_meier(train_time, train_event)  # type: ignore[arg-type]


def _inverse(g: np.ndarray) -> np.ndarray:
    """1/g, with nan where g = 0: the status was known where the censoring estimate says nobody is seen."""
    with np.errstate(divide="ignore"):
        return np.where(g > 0, 1.0 / np.where(g > 0, g, 1.0), np.nan)


def _status_weights(
    t: np.ndarray, e: np.ndarray, horizon: float, g: CensoringKM
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Who is dead by / alive at ``horizon`` and their IPCW weights (0 for those censored before it).

    Dead: death at T_i <= horizon, weight 1/G(T_i-). Alive: T_i > horizon or censored exactly at it (seen
    alive at the horizon), weight 1/G(horizon-). A weight is nan where G is 0 but the status is known.
    """
    dead = e & (t <= horizon)
    alive = (t > horizon) | (~e & (t == horizon))
    w = np.zeros(t.size)
    w[dead] = _inverse(np.atleast_1d(g.before(t[dead])))
    w[alive] = _inverse(np.atleast_1d(np.float64(g.before(horizon))))[0]
    return dead, alive, w


def uno_c(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    tau: float | None = None,
    train_time: np.ndarray | None = None,
    train_event: np.ndarray | None = None,
) -> float:
    """Uno's IPCW concordance truncated at ``tau`` (Uno et al. 2011, Stat Med 30:1105).

    Each comparable pair (d_i = 1, T_i < T_j or tied with j censored, T_i < tau) is weighted by
    G(T_i-)^-2, which removes the dependence of Harrell's C on the censoring distribution. G is estimated on
    ``train_*`` when given (the usual choice), else on the test cohort itself; nan if G(T_i-) = 0 for a
    death that counts.
    """
    t, e, r = _arrays(time, event, risk)
    g = _censoring(t, e, train_time, train_event)
    tau = float(np.max(t)) + 1.0 if tau is None else float(tau)
    idx = np.nonzero(e & (t < tau))[0]
    w = _inverse(np.atleast_1d(g.before(t[idx]))) ** 2
    if np.isnan(w).any():
        return float("nan")
    num = den = 0.0
    for i, wi in zip(idx, w):
        later = (t > t[i]) | ((t == t[i]) & ~e)
        den += wi * later.sum()
        num += wi * _pair_scores(r[i], r[later]).sum()
    return float(num / den) if den > 0 else float("nan")


def time_dependent_auc(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    t: float,
    train_time: np.ndarray | None = None,
    train_event: np.ndarray | None = None,
) -> float:
    """Cumulative/dynamic AUC at time ``t`` with IPCW (Uno et al. 2007; Hung & Chiang 2010).

    Cases: deaths at or before t, weighted 1/G(T_i-); controls: alive at t (followed past t or censored
    exactly at t), all with the same weight 1/G(t-), which cancels. The weighted probability that a case has
    the higher risk than a control (ties one half).
    """
    tt, e, r = _arrays(time, event, risk)
    dead, alive, w = _status_weights(tt, e, float(t), _censoring(tt, e, train_time, train_event))
    if not dead.any() or not alive.any():
        return float("nan")
    wc = w[dead]
    if np.isnan(wc).any():
        return float("nan")
    s = _pair_scores(r[dead][:, None], r[alive][None, :]).mean(1)
    return float((wc * s).sum() / wc.sum())


def brier_score(
    time: np.ndarray,
    event: np.ndarray,
    surv_at_t: np.ndarray,
    t: float,
    train_time: np.ndarray | None = None,
    train_event: np.ndarray | None = None,
) -> float:
    """IPCW Brier score at ``t`` (Graf et al. 1999, Stat Med 18:2529): squared error of S_i(t) vs the status.

    Dead by t: S_i(t)^2 / G(T_i-); alive at t (followed past t, or censored exactly at t, as at an
    administrative end of follow-up): (1 - S_i(t))^2 / G(t-); censored before t: 0; averaged over all N.
    Equals ``sksurv.metrics.brier_score`` wherever no death ties with a censoring and nobody is censored
    exactly at t (see the module docstring); nan if a needed G is 0.
    """
    tt, e, s = _arrays(time, event, surv_at_t)
    dead, alive, w = _status_weights(tt, e, float(t), _censoring(tt, e, train_time, train_event))
    sq = np.where(dead, s**2, 0.0) + np.where(alive, (1.0 - s) ** 2, 0.0)
    return float(np.sum(np.where(dead | alive, w * sq, 0.0)) / tt.size)


def integrated_brier_score(
    time: np.ndarray,
    event: np.ndarray,
    surv: np.ndarray,
    times: Sequence[float],
    train_time: np.ndarray | None = None,
    train_event: np.ndarray | None = None,
) -> float:
    """Brier score integrated over ``times`` by the trapezoid rule and divided by the time span.

    ``surv`` is [N, len(times)], S_i at each time.
    """
    ts = np.asarray(times, dtype=np.float64)
    s = np.asarray(surv, dtype=np.float64)
    if s.shape != (len(np.asarray(time)), ts.size):
        raise ValueError(f"integrated_brier_score: surv must be [N, {ts.size}]; got {s.shape}")
    if ts.size < 2 or np.any(np.diff(ts) <= 0):
        raise ValueError("integrated_brier_score: times must be >= 2 strictly increasing values")
    bs = np.array([brier_score(time, event, s[:, k], ts[k], train_time, train_event) for k in range(ts.size)])
    return float(np.trapezoid(bs, ts) / (ts[-1] - ts[0]))


# ----------------------------------------------------------------------------------------- calibration
@dataclass
class Calibration:
    """Logistic recalibration of P(death by horizon), IPCW-weighted for censoring before the horizon.

    ``slope``: coefficient of logit(p) (1 = ideal, < 1 = predictions too extreme); ``intercept``:
    calibration-in-the-large, the intercept with logit(p) as an offset (0 = ideal, < 0 = risks too high).
    ``n_used``: patients with nonzero weight (status at the horizon observed: dead by it or alive at it).
    ``bins``: reliability table rows (mean predicted, observed = 1 - Kaplan-Meier at the horizon within the
    bin, n in the bin including those censored before the horizon).
    """

    slope: float
    intercept: float
    n_used: int
    bins: list[tuple[float, float, int]]


def _logistic_fit(
    x: np.ndarray, y: np.ndarray, offset: np.ndarray, weight: np.ndarray, n_iter: int = 50
) -> np.ndarray:
    """Weighted Newton-Raphson logistic regression (maximises sum w_i log-lik_i); x has the intercept column."""
    beta = np.zeros(x.shape[1])
    for _ in range(n_iter):
        eta = x @ beta + offset
        p = 1.0 / (1.0 + np.exp(-eta))
        grad = x.T @ (weight * (y - p))
        hess = (x * (weight * p * (1 - p))[:, None]).T @ x + 1e-9 * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        beta = beta + step
        if np.max(np.abs(step)) < 1e-10:
            break
    return beta


def calibration_at_horizon(
    time: np.ndarray, event: np.ndarray, prob: np.ndarray, horizon: float, n_bins: int = 10
) -> Calibration:
    """Calibration slope and intercept at ``horizon`` plus a reliability table (quantile bins of prob).

    Slope and intercept are fitted by IPCW-weighted logistic regression of y_i = 1{death by the horizon} on
    logit(p_i) (Gerds & Schumacher 2006, Biom J 48:1029; the IPCW calibration model of Austin, Harrell & van
    Klaveren 2020, Stat Med 39:2714, sec. 2). Weights: 1/G(T_i-) for deaths by the horizon, 1/G(horizon-)
    for patients alive at it (followed past it, or censored exactly at it), 0 for those censored before it;
    G is the censoring Kaplan-Meier of the cohort (`censoring_kaplan_meier`). Under independent censoring
    the weighted score equations have the same expectation as with complete follow-up, so a perfectly
    calibrated p gives slope 1 and intercept 0; the complete-case fit (dropping censored-before-horizon
    patients) does not, because those who stay in are enriched for early deaths.
    """
    t, e, p = _arrays(time, event, prob)
    horizon = float(horizon)
    dead, alive, w = _status_weights(t, e, horizon, censoring_kaplan_meier(t, e))
    used = (dead | alive) & (w > 0)
    y = dead[used].astype(np.float64)
    wk = w[used]
    pk = np.clip(p[used], 1e-6, 1 - 1e-6)
    lp = np.log(pk / (1 - pk))
    if y.size < 3 or y.min() == y.max() or not np.isfinite(wk).all():
        slope = intercept = float("nan")
    else:
        wk = wk / wk.mean()  # scale-free; keeps the Newton ridge relative to n
        slope = float(_logistic_fit(np.stack([np.ones_like(lp), lp], 1), y, np.zeros_like(lp), wk)[1])
        intercept = float(_logistic_fit(np.ones((lp.size, 1)), y, lp, wk)[0])
    edges = np.unique(np.quantile(p, np.linspace(0, 1, n_bins + 1)))
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, max(edges.size - 2, 0))
    bins: list[tuple[float, float, int]] = []
    for b in range(max(edges.size - 1, 1)):
        m = idx == b
        if not m.any():
            continue
        km = kaplan_meier(t[m], e[m])
        bins.append((float(p[m].mean()), float(1.0 - km.at(horizon)), int(m.sum())))
    return Calibration(slope, intercept, int(used.sum()), bins)


# --------------------------------------------------------------------------- Kaplan-Meier and log-rank
@dataclass
class KaplanMeier:
    """Product-limit estimate: S just after each distinct time; ``at(t)`` evaluates the step function.

    ``at_risk``: patients with T >= each time; ``events``: deaths at each time.
    """

    times: np.ndarray
    survival: np.ndarray
    at_risk: np.ndarray
    events: np.ndarray

    def at(self, t: float | np.ndarray) -> np.ndarray | float:
        idx = np.searchsorted(self.times, np.asarray(t, dtype=np.float64), side="right")
        out = np.concatenate([[1.0], self.survival])[idx]
        return float(out) if np.ndim(out) == 0 else out

    def confidence_band(self, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise ``1 - alpha`` band (lower, upper) at ``times``: Greenwood variance, log(-log) scale.

        Var[log S(t)] ~ sum_{t_j <= t} d_j / (n_j (n_j - d_j)) (Greenwood 1926); on the log(-log S) scale,
        whose variance is that sum over (log S)^2 (Kalbfleisch & Prentice 2002, sec. 1.4), the band
        S^exp(+-z sqrt(v) / log S) stays inside [0, 1]. Where S = 1 the band is [1, 1], where S = 0 it is
        [0, 0]; a step with n_j = d_j adds nothing to the sum. Equals lifelines'
        ``KaplanMeierFitter.confidence_interval_`` (its "exponential Greenwood" bounds).
        """
        if not 0 < alpha < 1:
            raise ValueError(f"confidence_band: alpha={alpha} must be in (0, 1)")
        z = NormalDist().inv_cdf(1 - alpha / 2)
        n, d = self.at_risk, self.events
        with np.errstate(divide="ignore", invalid="ignore"):
            var = np.cumsum(np.where(n > d, d / (n * (n - d)), 0.0))
            log_s = np.log(self.survival)
            log_neg = np.log(-log_s)
            half = z * np.sqrt(var) / log_s  # negative: log S < 0
            lower = np.exp(-np.exp(log_neg - half))
            upper = np.exp(-np.exp(log_neg + half))
        one = self.survival >= 1.0
        zero = self.survival <= 0.0
        lower = np.where(one, 1.0, np.where(zero, 0.0, lower))
        upper = np.where(one, 1.0, np.where(zero, 0.0, upper))
        return lower, upper

    def n_at_risk(self, t: float | np.ndarray) -> np.ndarray:
        """Patients still under observation at each ``t`` (T >= t), as printed under a Kaplan-Meier plot."""
        idx = np.searchsorted(self.times, np.atleast_1d(np.asarray(t, dtype=np.float64)), side="left")
        return np.concatenate([self.at_risk, [0.0]])[idx].astype(np.int64)


def kaplan_meier(time: np.ndarray, event: np.ndarray) -> KaplanMeier:
    """Kaplan-Meier survival estimate (Kaplan & Meier 1958)."""
    t, e = _arrays(time, event)
    uniq = np.unique(t)
    at_risk = np.array([(t >= u).sum() for u in uniq], dtype=np.float64)
    d = np.array([((t == u) & e).sum() for u in uniq], dtype=np.float64)
    return KaplanMeier(uniq, np.cumprod(1.0 - d / at_risk), at_risk, d)


def _chi2_sf(x: float, df: int) -> float:
    """Upper tail of the chi-square distribution, via the regularised upper incomplete gamma function."""
    if df <= 0 or not math.isfinite(x):
        return float("nan")
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), torch.tensor(x / 2.0)))


@dataclass
class LogRank:
    statistic: float
    df: int
    p_value: float


def logrank_test(time: np.ndarray, event: np.ndarray, group: np.ndarray) -> LogRank:
    """K-group log-rank test (Mantel 1966): O - E per group with the hypergeometric covariance."""
    t, e = _arrays(time, event)
    g = np.asarray(group)
    labels = np.unique(g)
    k = labels.size
    if k < 2:
        return LogRank(float("nan"), 0, float("nan"))
    o_minus_e = np.zeros(k)
    cov = np.zeros((k, k))
    for u in np.unique(t[e]):
        at = t >= u
        n = at.sum()
        d = (e & (t == u)).sum()
        n_g = np.array([(at & (g == lab)).sum() for lab in labels], dtype=np.float64)
        d_g = np.array([(e & (t == u) & (g == lab)).sum() for lab in labels], dtype=np.float64)
        o_minus_e += d_g - d * n_g / n
        if n > 1:
            f = d * (n - d) / (n * n * (n - 1))
            cov += f * (np.diag(n_g * n) - np.outer(n_g, n_g))
    v = o_minus_e[:-1]
    c = cov[:-1, :-1]
    stat = float(v @ np.linalg.pinv(c) @ v)
    return LogRank(stat, k - 1, _chi2_sf(stat, k - 1))


# ------------------------------------------------------------------------------------- hazard ratios
@dataclass
class CoxFit:
    """Hazard ratio of each risk group against the reference (lowest non-empty) group, with Wald 95% CIs."""

    groups: list[int]
    reference: int
    hazard_ratio: list[float]
    ci_low: list[float]
    ci_high: list[float]
    p_value: list[float]


def cox_hazard_ratios(time: np.ndarray, event: np.ndarray, group: np.ndarray, ties: str = "efron") -> CoxFit:
    """Cox model with one indicator per non-reference group, fitted by Newton-Raphson (float64, autograd)."""
    t, e = _arrays(time, event)
    g = np.asarray(group).astype(np.int64)
    labels = [int(x) for x in np.unique(g)]
    ref, others = labels[0], labels[1:]
    if not others:
        return CoxFit([], ref, [], [], [], [])
    x = torch.tensor(np.stack([(g == lab).astype(np.float64) for lab in others], 1))
    tt, ee = torch.tensor(t), torch.tensor(e.astype(np.float64))
    n_ev = float(e.sum())

    def negll(beta: torch.Tensor) -> torch.Tensor:
        return cox_ph_loss(x @ beta, tt, ee, ties=ties) * n_ev  # type: ignore[arg-type]

    beta = torch.zeros(len(others), dtype=torch.float64)
    for _ in range(100):
        b = beta.clone().requires_grad_(True)
        grad = torch.autograd.grad(negll(b), b)[0]
        hess = torch.autograd.functional.hessian(negll, beta)
        # groups without events have an infinite MLE; a tiny ridge keeps Newton finite there
        step = torch.linalg.solve(hess + 1e-8 * torch.eye(len(others), dtype=torch.float64), grad)
        step = step.clamp(-5, 5)
        beta = beta - step
        if float(step.abs().max()) < 1e-10:
            break
    hess = torch.autograd.functional.hessian(negll, beta)
    se = torch.sqrt(torch.diag(torch.linalg.pinv(hess))).numpy()
    bn = beta.numpy()
    z = bn / se
    with np.errstate(over="ignore"):  # a group without events has an unbounded hazard ratio
        hr, lo, hi = np.exp(bn), np.exp(bn - 1.959964 * se), np.exp(bn + 1.959964 * se)
    p = [float(math.erfc(abs(zz) / math.sqrt(2))) for zz in z]
    return CoxFit(others, ref, hr.tolist(), lo.tolist(), hi.tolist(), p)


# ------------------------------------------------------------------------------------------ bootstrap
def bootstrap_ci(
    statistic: Callable[..., float],
    *arrays: np.ndarray,
    n_boot: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Point estimate and percentile bootstrap CI, resampling rows (patients) with replacement."""
    if n_boot < 1:
        raise ValueError(f"bootstrap_ci: n_boot={n_boot} must be >= 1")
    arrs = [np.asarray(a) for a in arrays]
    n = arrs[0].shape[0]
    est = float(statistic(*arrs))
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        v = statistic(*(a[idx] for a in arrs))
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return est, float("nan"), float("nan")
    lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
    return est, float(lo), float(hi)
