"""Patient-level survival metrics for validation reports (numpy; small cohorts, exact formulas).

What the CXR-risk papers report (Lu et al. 2019; Chen, Lu & Raghu, MIDL 2023): discrimination (Harrell's C,
Uno's C with bootstrap CIs, time-dependent AUC), overall accuracy (Brier and integrated Brier score),
calibration at the horizon (slope, intercept, reliability table), and risk stratification (Kaplan-Meier by
risk group, log-rank test, hazard ratio of each group against the lowest).

Conventions: ``risk`` is higher-is-worse; ``surv`` is S(t) per patient; censoring weights use the
Kaplan-Meier estimate G of the censoring distribution, evaluated just before the time (events are taken to
precede censorings at tied times). Tests check each function against lifelines where it has one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .survival import censoring_km, cox_ph_loss

__all__ = [
    "Calibration",
    "CoxFit",
    "KaplanMeier",
    "LogRank",
    "bootstrap_ci",
    "brier_score",
    "calibration_at_horizon",
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


def uno_c(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    tau: float | None = None,
    train_time: np.ndarray | None = None,
    train_event: np.ndarray | None = None,
) -> float:
    """Uno's IPCW concordance truncated at ``tau`` (Uno et al. 2011, Stat Med 30:1105).

    Each comparable pair (d_i = 1, T_i < T_j or tied with j censored, T_i < tau) is weighted by G(T_i-)^-2, which removes the
    dependence of Harrell's C on the censoring distribution. G is estimated on ``train_*`` when given (the
    usual choice), else on the test cohort itself.
    """
    t, e, r = _arrays(time, event, risk)
    g = censoring_km(
        t if train_time is None else np.asarray(train_time, np.float64),
        e if train_event is None else np.asarray(train_event, bool),
    )
    tau = float(np.max(t)) + 1.0 if tau is None else float(tau)
    num = den = 0.0
    idx = np.nonzero(e & (t < tau))[0]
    for i, gi in zip(idx, g(t[idx], left=True)):
        if gi <= 0:
            continue
        w = 1.0 / gi**2
        later = (t > t[i]) | ((t == t[i]) & ~e)
        den += w * later.sum()
        num += w * _pair_scores(r[i], r[later]).sum()
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

    Cases: events at or before t, weighted 1/G(T_i-); controls: still event-free after t. The probability that
    a case has the higher risk than a control (ties one half).
    """
    tt, e, r = _arrays(time, event, risk)
    g = censoring_km(
        tt if train_time is None else np.asarray(train_time, np.float64),
        e if train_event is None else np.asarray(train_event, bool),
    )
    cases = np.nonzero(e & (tt <= t))[0]
    controls = tt > t
    if cases.size == 0 or not controls.any():
        return float("nan")
    w = 1.0 / np.clip(g(tt[cases], left=True), 1e-12, None)
    s = _pair_scores(r[cases][:, None], r[controls][None, :]).mean(1)
    return float((w * s).sum() / w.sum())


def brier_score(
    time: np.ndarray,
    event: np.ndarray,
    surv_at_t: np.ndarray,
    t: float,
    train_time: np.ndarray | None = None,
    train_event: np.ndarray | None = None,
) -> float:
    """IPCW Brier score at ``t`` (Graf et al. 1999): squared error of S_i(t) against the observed status.

    Dead by t: (0 - S_i(t))^2 / G(T_i-); alive after t: (1 - S_i(t))^2 / G(t); censored before t: 0.
    """
    tt, e, s = _arrays(time, event, surv_at_t)
    g = censoring_km(
        tt if train_time is None else np.asarray(train_time, np.float64),
        e if train_event is None else np.asarray(train_event, bool),
    )
    dead = e & (tt <= t)
    alive = tt > t
    g_dead = np.clip(g(tt, left=True), 1e-12, None)
    g_t = max(float(g(t)), 1e-12)
    contrib = np.where(dead, s**2 / g_dead, 0.0) + np.where(alive, (1.0 - s) ** 2 / g_t, 0.0)
    return float(contrib.mean())


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
    """Logistic recalibration of P(death by horizon) among patients whose status at the horizon is known.

    ``slope``: coefficient of logit(p) (1 = ideal, < 1 = predictions too extreme); ``intercept``:
    calibration-in-the-large, the intercept with logit(p) as an offset (0 = ideal). ``bins``: reliability
    table rows (mean predicted, observed = 1 - Kaplan-Meier at the horizon within the bin, n).
    """

    slope: float
    intercept: float
    n_used: int
    bins: list[tuple[float, float, int]]


def _logistic_fit(x: np.ndarray, y: np.ndarray, offset: np.ndarray, n_iter: int = 50) -> np.ndarray:
    """Newton-Raphson logistic regression; x includes the intercept column."""
    beta = np.zeros(x.shape[1])
    for _ in range(n_iter):
        eta = x @ beta + offset
        p = 1.0 / (1.0 + np.exp(-eta))
        grad = x.T @ (y - p)
        hess = (x * (p * (1 - p))[:, None]).T @ x + 1e-9 * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        beta = beta + step
        if np.max(np.abs(step)) < 1e-10:
            break
    return beta


def calibration_at_horizon(
    time: np.ndarray, event: np.ndarray, prob: np.ndarray, horizon: float, n_bins: int = 10
) -> Calibration:
    """Calibration slope and intercept at ``horizon`` plus a reliability table (quantile bins of prob)."""
    t, e, p = _arrays(time, event, prob)
    # alive at the horizon: followed beyond it, or censored exactly at it (administrative censoring)
    known = (t >= horizon) | e
    y = (e & (t <= horizon))[known].astype(np.float64)
    pk = np.clip(p[known], 1e-6, 1 - 1e-6)
    lp = np.log(pk / (1 - pk))
    if y.size < 3 or y.min() == y.max():
        slope = intercept = float("nan")
    else:
        slope = float(_logistic_fit(np.stack([np.ones_like(lp), lp], 1), y, np.zeros_like(lp))[1])
        intercept = float(_logistic_fit(np.ones((lp.size, 1)), y, lp)[0])
    edges = np.unique(np.quantile(p, np.linspace(0, 1, n_bins + 1)))
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, max(edges.size - 2, 0))
    bins: list[tuple[float, float, int]] = []
    for b in range(max(edges.size - 1, 1)):
        m = idx == b
        if not m.any():
            continue
        km = kaplan_meier(t[m], e[m])
        bins.append((float(p[m].mean()), float(1.0 - km.at(horizon)), int(m.sum())))
    return Calibration(slope, intercept, int(known.sum()), bins)


# --------------------------------------------------------------------------- Kaplan-Meier and log-rank
@dataclass
class KaplanMeier:
    """Product-limit estimate: S just after each distinct time; ``at(t)`` evaluates the step function."""

    times: np.ndarray
    survival: np.ndarray
    at_risk: np.ndarray
    events: np.ndarray

    def at(self, t: float | np.ndarray) -> np.ndarray | float:
        idx = np.searchsorted(self.times, np.asarray(t, dtype=np.float64), side="right")
        out = np.concatenate([[1.0], self.survival])[idx]
        return float(out) if np.ndim(out) == 0 else out


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
