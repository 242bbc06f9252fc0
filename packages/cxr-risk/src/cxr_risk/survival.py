"""Survival heads and losses: Cox partial likelihood, discrete-time logistic hazard, binary-at-horizon.

Chen, Lu & Raghu (MIDL 2023) fine-tune every pretrained encoder for long-term mortality; CXR-risk (Lu et al.,
JAMA Netw Open 2019) reports the probability of death by 12 years and five risk groups. A head maps encoder
features to raw outputs; every head then answers the same four questions so that metrics and reports never
care which one was trained:

* ``risk_score(out)``: higher means worse (a Cox log-hazard, or a probability-of-event transform),
* ``survival(out, times)``: S(t) per patient on the given times,
* ``prob_event_by(out, horizon)``: 1 - S(horizon), the CXR-risk output,
* ``loss(out, time, event)``: what training minimises.

Times are in whatever unit the cohort uses (the synthetic cohort and CXR-risk use years); the head only needs
``horizon`` and ``t_max`` in that same unit.

``cox_ph_loss`` is vectorised; ``cox_ph_loss_reference`` is the readable per-event-time loop it is tested
against (Efron 1977, "The efficiency of Cox's likelihood function for censored data", JASA 72:557).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CXR_RISK_CUTPOINTS",
    "RISK_GROUP_NAMES",
    "BinaryHorizonHead",
    "CensoringKM",
    "CoxHead",
    "LogisticHazardHead",
    "SurvivalConfig",
    "SurvivalHead",
    "binary_horizon_loss",
    "binary_horizon_targets",
    "build_head",
    "censoring_kaplan_meier",
    "cox_ph_loss",
    "cox_ph_loss_reference",
    "logistic_hazard_loss",
    "quantile_cutpoints",
    "risk_groups",
]

#: Cut-points on the 12-year probability of death that define the five CXR-risk groups (Lu et al. 2019).
CXR_RISK_CUTPOINTS: tuple[float, float, float, float] = (0.064, 0.096, 0.158, 0.348)
RISK_GROUP_NAMES: tuple[str, ...] = ("very low", "low", "moderate", "high", "very high")

Ties = Literal["efron", "breslow"]


# ----------------------------------------------------------------------------------------------- losses
def _check_survival_inputs(name: str, risk: Tensor, time: Tensor, event: Tensor) -> None:
    if risk.ndim != 1:
        raise ValueError(
            f"{name}: risk must be 1-D [N]; got shape {tuple(risk.shape)} (squeeze the head output)"
        )
    if time.shape != risk.shape or event.shape != risk.shape:
        raise ValueError(
            f"{name}: risk, time and event must share shape [N]; got {tuple(risk.shape)}, "
            f"{tuple(time.shape)}, {tuple(event.shape)}"
        )


def cox_ph_loss(risk: Tensor, time: Tensor, event: Tensor, ties: Ties = "efron") -> Tensor:
    """Negative Cox partial log-likelihood per event (Cox 1972), Efron or Breslow handling of tied times.

    ``risk`` is the log-hazard ratio eta_i (any offset cancels). The loss is
    ``-1/E * sum_t [ sum_{i in D_t} eta_i - sum_{l<d_t} log( sum_{R_t} e^eta - l/d_t sum_{D_t} e^eta ) ]``
    with D_t the d_t deaths at time t and R_t everyone still at risk (time >= t). Breslow drops the
    ``l/d_t`` correction. A batch without events carries no information for the partial likelihood:
    the loss is then an exact zero that still depends on ``risk`` (so DDP and autograd see every
    parameter) instead of a NaN from 0/0.
    """
    _check_survival_inputs("cox_ph_loss", risk, time, event)
    if ties not in ("efron", "breslow"):
        raise ValueError(f"cox_ph_loss: ties={ties!r} must be 'efron' or 'breslow'")
    ev = event.to(torch.bool)
    n_events = int(ev.sum())
    if n_events == 0:
        return (risk * 0.0).sum()
    risk_f = risk.float() if risk.dtype in (torch.float16, torch.bfloat16) else risk
    shift = risk_f.detach().max()
    w = torch.exp(risk_f - shift)
    uniq, inv = torch.unique(time, return_inverse=True)  # ascending
    n_t = uniq.numel()
    all_sum = torch.zeros(n_t, dtype=w.dtype, device=w.device).index_add(0, inv, w)
    # risk set at time t = everyone with time >= t: reverse cumulative sum over the ascending unique times
    at_risk = torch.flip(torch.cumsum(torch.flip(all_sum, [0]), 0), [0])
    ev_w = torch.where(ev, w, torch.zeros_like(w))
    tie_sum = torch.zeros(n_t, dtype=w.dtype, device=w.device).index_add(0, inv, ev_w)
    d = torch.zeros(n_t, dtype=torch.long, device=w.device).index_add(0, inv, ev.long())
    ev_idx = torch.nonzero(ev, as_tuple=True)[0]
    g = inv[ev_idx]
    if ties == "efron":
        # rank of each death within its tie group: 0..d_t-1 (order inside the group is irrelevant)
        order = torch.argsort(g, stable=True)
        g_sorted = g[order]
        first = torch.searchsorted(g_sorted, g_sorted, right=False)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(g_sorted.numel(), device=g.device) - first
        frac = rank.to(w.dtype) / d[g].to(w.dtype)
        denom = at_risk[g] - frac * tie_sum[g]
    else:
        denom = at_risk[g]
    loglik = (risk_f[ev_idx] - shift).sum() - torch.log(denom).sum()
    return (-loglik / n_events).to(risk.dtype)


def cox_ph_loss_reference(risk: Tensor, time: Tensor, event: Tensor, ties: Ties = "efron") -> Tensor:
    """Readable loop over distinct event times; the specification ``cox_ph_loss`` is tested against."""
    _check_survival_inputs("cox_ph_loss_reference", risk, time, event)
    ev = event.to(torch.bool)
    if not bool(ev.any()):
        return (risk * 0.0).sum()
    loglik = risk.new_zeros(())
    for t in torch.unique(time[ev]).tolist():
        dead = ev & (time == t)
        at_risk = time >= t
        d = int(dead.sum())
        loglik = loglik + risk[dead].sum()
        r_sum = torch.exp(risk[at_risk]).sum()
        d_sum = torch.exp(risk[dead]).sum()
        for l in range(d):
            frac = l / d if ties == "efron" else 0.0
            loglik = loglik - torch.log(r_sum - frac * d_sum)
    return -loglik / int(ev.sum())


def _interval_index(time: Tensor, cuts: Tensor) -> Tensor:
    """Interval k with cuts[k] < t <= cuts[k+1]; K (one past the last) when t > cuts[-1]."""
    return torch.searchsorted(cuts[1:].contiguous(), time.contiguous(), right=False)


def logistic_hazard_loss(logits: Tensor, time: Tensor, event: Tensor, cuts: Tensor) -> Tensor:
    """Discrete-time survival loss: a logistic hazard per interval (Gensheimer & Narasimhan 2019).

    ``logits`` [N, K] are logit h_k, the conditional probability of death in interval k = (cuts[k],
    cuts[k+1]] given survival to its start. A patient whose time falls in interval k contributes
    "survived" targets for intervals 0..k-1 and, if the event happened, "died" for interval k. A patient
    censored inside interval k contributes nothing for k (we do not know whether they lived through it).
    Times beyond the last cut count as surviving every interval. Mean over patients.
    """
    if logits.ndim != 2 or logits.shape[1] != cuts.numel() - 1:
        raise ValueError(
            f"logistic_hazard_loss: logits must be [N, K={cuts.numel() - 1}] for {cuts.numel()} cuts; "
            f"got {tuple(logits.shape)}"
        )
    _check_survival_inputs("logistic_hazard_loss", logits[:, 0], time, event)
    k = _interval_index(time, cuts)
    cols = torch.arange(logits.shape[1], device=logits.device)
    ev = event.to(torch.bool)[:, None]
    before = cols[None, :] < k[:, None]
    died_here = (cols[None, :] == k[:, None]) & ev
    mask = (before | died_here).to(logits.dtype)
    target = died_here.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * mask).sum() / logits.shape[0]


def binary_horizon_targets(
    time: Tensor, event: Tensor, horizon: float, censored: Literal["exclude", "ipcw"] = "exclude"
) -> tuple[Tensor, Tensor]:
    """Labels and weights for "dead by ``horizon``", handling patients censored before the horizon.

    Target 1: event at or before the horizon; target 0: followed beyond the horizon or censored exactly at it
    (administrative end of follow-up). A patient censored before the horizon has an unknown label: ``"exclude"`` gives weight 0; ``"ipcw"`` also drops them but
    re-weights the rest by 1/G(min(T, horizon)), G the Kaplan-Meier survival of the censoring time estimated on
    these same patients, so that the known labels stand in for the censored ones (Uno et al. 2011).
    """
    if censored not in ("exclude", "ipcw"):
        raise ValueError(f"binary_horizon_targets: censored={censored!r} must be 'exclude' or 'ipcw'")
    ev = event.to(torch.bool)
    y = (ev & (time <= horizon)).to(torch.float32)
    known = (time >= horizon) | ev  # censored exactly at the horizon (administrative) is alive at it
    w = known.to(torch.float32)
    if censored == "ipcw":
        t_np, e_np = time.detach().cpu().double().numpy(), ev.cpu().numpy()
        g = censoring_kaplan_meier(t_np, e_np)
        at = np.minimum(t_np, horizon)
        # G evaluated just before the time (left limit), as for IPCW C-index and Brier scores
        gv = np.clip(g.before(at), 1e-3, None)
        w = w * torch.as_tensor(1.0 / gv, dtype=torch.float32, device=time.device)
    return y.to(time.device), w.to(time.device)


def binary_horizon_loss(
    logit: Tensor, time: Tensor, event: Tensor, horizon: float, weight: Tensor | None = None
) -> Tensor:
    """Weighted BCE on "dead by horizon"; patients censored before the horizon get weight 0 (see targets)."""
    _check_survival_inputs("binary_horizon_loss", logit, time, event)
    y, w = binary_horizon_targets(time, event, horizon)
    if weight is not None:
        w = w * weight
    if float(w.sum()) == 0.0:
        return (logit * 0.0).sum()
    bce = F.binary_cross_entropy_with_logits(logit, y.to(logit.dtype), reduction="none")
    return (bce * w).sum() / w.sum()


# ---------------------------------------------------------------------------------- censoring KM helper
@dataclass
class CensoringKM:
    """Kaplan-Meier estimate G of the censoring survival P(C > t), deaths leaving the risk set first.

    ``times``: distinct censoring times; ``survival``: G just after each. ``at(t)`` is G(t) (right-continuous,
    what scikit-survival's ``CensoringDistributionEstimator.predict_proba`` returns); ``before(t)`` is the
    left limit G(t-) = P(C >= t), the probability that a patient still under observation at t is seen at t.
    Both are flat beyond the last censoring time.
    """

    times: np.ndarray
    survival: np.ndarray

    def _step(self, t: float | np.ndarray, side: Literal["left", "right"]) -> np.ndarray | float:
        idx = np.searchsorted(self.times, np.asarray(t, dtype=np.float64), side=side)
        out = np.concatenate([[1.0], self.survival])[idx]
        return float(out) if np.ndim(out) == 0 else out

    def at(self, t: float | np.ndarray) -> np.ndarray | float:
        return self._step(t, "right")

    def before(self, t: float | np.ndarray) -> np.ndarray | float:
        return self._step(t, "left")


def censoring_kaplan_meier(time: np.ndarray, event: np.ndarray) -> CensoringKM:
    """Reverse Kaplan-Meier (censorings are the "events"), with deaths at a tied time removed first.

    At each censoring time u the risk set is everyone with T >= u except those who died at u, as in
    scikit-survival's ``kaplan_meier_estimator(..., reverse=True)`` and R's ``prodlim(reverse=TRUE)``;
    equivalently lifelines' Kaplan-Meier of the censorings after moving each death an instant earlier. The
    IPCW training weights (:func:`binary_horizon_targets`) and the metrics (:mod:`cxr_risk.metrics`) share it.
    """
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event).astype(bool)
    uniq, inv = np.unique(t, return_inverse=True)
    n_dead = np.bincount(inv, weights=e, minlength=uniq.size)
    n_cens = np.bincount(inv, weights=~e, minlength=uniq.size)
    at_risk = t.size - np.concatenate([[0.0], np.cumsum(n_dead + n_cens)[:-1]]) - n_dead
    c = n_cens > 0
    uniq, n_cens, at_risk = uniq[c], n_cens[c], at_risk[c]
    return CensoringKM(uniq, np.cumprod(1.0 - n_cens / at_risk))


# ------------------------------------------------------------------------------------------------ heads
@dataclass
class SurvivalConfig:
    """Which survival head and on what time axis.

    ``horizon``: time at which P(death) is reported (12 years in CXR-risk). ``t_max``: the end of the time
    grid (discrete-hazard cut-points, Cox baseline grid); defaults to ``1.25 * horizon``. ``n_intervals``:
    number of equal-width discrete-time intervals (or Cox baseline grid steps) over [0, t_max].
    """

    kind: Literal["cox", "logistic_hazard", "binary"] = "cox"
    horizon: float = 12.0
    t_max: float | None = None
    n_intervals: int = 24
    ties: Ties = "efron"
    censored: Literal["exclude", "ipcw"] = "exclude"

    def __post_init__(self) -> None:
        if self.kind not in ("cox", "logistic_hazard", "binary"):
            raise ValueError(
                f"SurvivalConfig: kind={self.kind!r} must be 'cox', 'logistic_hazard' or 'binary'"
            )
        if not self.horizon > 0:
            raise ValueError(
                f"SurvivalConfig: horizon={self.horizon} must be > 0 (same unit as cohort times)"
            )
        if self.t_max is None:
            self.t_max = 1.25 * self.horizon
        if self.t_max < self.horizon:
            raise ValueError(f"SurvivalConfig: t_max={self.t_max} must be >= horizon={self.horizon}")
        if self.n_intervals < 1:
            raise ValueError(f"SurvivalConfig: n_intervals={self.n_intervals} must be >= 1")
        if self.ties not in ("efron", "breslow"):
            raise ValueError(f"SurvivalConfig: ties={self.ties!r} must be 'efron' or 'breslow'")
        if self.censored not in ("exclude", "ipcw"):
            raise ValueError(f"SurvivalConfig: censored={self.censored!r} must be 'exclude' or 'ipcw'")

    def grid(self) -> Tensor:
        """Equal-width cut-points over [0, t_max], with the horizon inserted if it is not already one."""
        assert self.t_max is not None
        g = torch.linspace(0.0, float(self.t_max), self.n_intervals + 1, dtype=torch.float64)
        if not bool(torch.isclose(g, torch.tensor(self.horizon, dtype=torch.float64)).any()):
            g = torch.sort(torch.cat([g, torch.tensor([self.horizon], dtype=torch.float64)])).values
        return g.float()

    def to_dict(self) -> dict:
        return asdict(self)


class SurvivalHead(nn.Module):
    """Linear map from pooled features to survival outputs, plus the four shared read-outs."""

    config: SurvivalConfig

    def __init__(self, in_features: int, out_features: int, config: SurvivalConfig) -> None:
        super().__init__()
        self.config = config
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(features)

    def loss(self, out: Tensor, time: Tensor, event: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def risk_score(self, out: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def survival(self, out: Tensor, times: Sequence[float] | Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def prob_event_by(self, out: Tensor, horizon: float | None = None) -> Tensor:
        h = self.config.horizon if horizon is None else horizon
        return 1.0 - self.survival(out, [h])[:, 0]


class CoxHead(SurvivalHead):
    """Log-hazard ratio eta = w.x + b; S(t) = exp(-H0(t) e^eta) with a Breslow baseline fitted after training.

    The baseline H0 lives on the fixed grid of ``SurvivalConfig.grid()`` as a buffer, so it travels in the
    safetensors checkpoint. Call ``fit_baseline`` on the training cohort before asking for S(t).
    """

    def __init__(self, in_features: int, config: SurvivalConfig) -> None:
        super().__init__(in_features, 1, config)
        self.register_buffer("grid", config.grid())
        self.register_buffer("base_cumhaz", torch.full_like(self.grid, float("nan")))

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(features)[:, 0]

    def loss(self, out: Tensor, time: Tensor, event: Tensor) -> Tensor:
        return cox_ph_loss(out, time, event, ties=self.config.ties)

    def risk_score(self, out: Tensor) -> Tensor:
        return out

    @torch.no_grad()
    def fit_baseline(self, out: Tensor, time: Tensor, event: Tensor) -> None:
        """Breslow estimator H0(t) = sum_{t_i <= t, d_i=1} 1 / sum_{j: t_j >= t_i} exp(eta_j), on the grid."""
        eta = out.detach().double().cpu()
        t = time.detach().double().cpu()
        ev = event.detach().bool().cpu()
        shift = eta.max()
        w = torch.exp(eta - shift)
        ev_times = torch.unique(t[ev])
        incr = torch.stack([ev.logical_and(t == u).sum() / w[t >= u].sum() for u in ev_times]) * torch.exp(
            -shift
        )
        grid = self.grid.double().cpu()
        cum = (
            torch.stack([incr[ev_times <= g].sum() for g in grid])
            if ev_times.numel()
            else torch.zeros_like(grid)
        )
        self.base_cumhaz.copy_(cum.to(self.base_cumhaz))

    def survival(self, out: Tensor, times: Sequence[float] | Tensor) -> Tensor:
        if bool(torch.isnan(self.base_cumhaz).any()):
            raise RuntimeError(
                "CoxHead.survival: no baseline hazard; call fit_baseline(out, time, event) first"
            )
        tt = torch.as_tensor(times, dtype=self.grid.dtype, device=self.grid.device)
        # step function: H0 at the last grid point <= t (exact at grid points, which include the horizon)
        idx = torch.searchsorted(self.grid, tt + 1e-6 * max(1.0, float(self.grid[-1])), right=True) - 1
        h0 = self.base_cumhaz[idx.clamp(min=0)]
        return torch.exp(-h0[None, :].to(out.dtype) * torch.exp(out)[:, None])


class LogisticHazardHead(SurvivalHead):
    """One logit per interval of the grid; S(t) = prod (1 - h_k), log-linear inside an interval."""

    def __init__(self, in_features: int, config: SurvivalConfig) -> None:
        grid = config.grid()
        super().__init__(in_features, grid.numel() - 1, config)
        self.register_buffer("cuts", grid)

    def loss(self, out: Tensor, time: Tensor, event: Tensor) -> Tensor:
        return logistic_hazard_loss(out, time, event, self.cuts.to(time.dtype))

    def survival(self, out: Tensor, times: Sequence[float] | Tensor) -> Tensor:
        log_s = F.logsigmoid(-out.float())  # log(1 - h_k)
        cum = torch.cat([log_s.new_zeros(out.shape[0], 1), torch.cumsum(log_s, 1)], 1)  # at cuts
        tt = torch.as_tensor(times, dtype=torch.float32, device=out.device).clamp(0, float(self.cuts[-1]))
        cuts = self.cuts.float()
        k = torch.searchsorted(cuts[1:].contiguous(), tt.contiguous(), right=False).clamp(
            max=cuts.numel() - 2
        )
        frac = (tt - cuts[k]) / (cuts[k + 1] - cuts[k])
        val = cum[:, k] + frac[None, :] * (cum[:, k + 1] - cum[:, k])
        return torch.exp(val)

    def risk_score(self, out: Tensor) -> Tensor:
        return self.prob_event_by(out)


class BinaryHorizonHead(SurvivalHead):
    """A single logit for "dead by the horizon" (the CXR-risk formulation); S(t) only at the horizon."""

    def __init__(self, in_features: int, config: SurvivalConfig) -> None:
        super().__init__(in_features, 1, config)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(features)[:, 0]

    def loss(self, out: Tensor, time: Tensor, event: Tensor) -> Tensor:
        weight = None
        if self.config.censored == "ipcw":
            weight = binary_horizon_targets(time, event, self.config.horizon, "ipcw")[1]
        return binary_horizon_loss(out, time, event, self.config.horizon, weight)

    def risk_score(self, out: Tensor) -> Tensor:
        return out

    def survival(self, out: Tensor, times: Sequence[float] | Tensor) -> Tensor:
        tt = torch.as_tensor(times, dtype=torch.float64)
        if not bool(torch.isclose(tt, torch.tensor(self.config.horizon, dtype=torch.float64)).all()):
            raise ValueError(
                f"BinaryHorizonHead.survival: this head only knows S(t) at the horizon "
                f"{self.config.horizon}; got times {tt.tolist()} (train a 'cox' or 'logistic_hazard' head for curves)"
            )
        return torch.sigmoid(-out.float())[:, None].expand(-1, tt.numel())


def build_head(in_features: int, config: SurvivalConfig) -> SurvivalHead:
    """The head named by ``config.kind``."""
    cls = {"cox": CoxHead, "logistic_hazard": LogisticHazardHead, "binary": BinaryHorizonHead}[config.kind]
    return cls(in_features, config)


# ------------------------------------------------------------------------------------------ risk groups
def risk_groups(prob: np.ndarray | Tensor, cutpoints: Sequence[float] = CXR_RISK_CUTPOINTS) -> np.ndarray:
    """Group index 0..len(cutpoints) ("very low" .. "very high") from P(death by horizon).

    A probability equal to a cut-point goes to the higher group (cut-points are lower bounds of groups 1..4).
    """
    p = prob.detach().cpu().numpy() if isinstance(prob, Tensor) else np.asarray(prob)
    cuts = np.asarray(cutpoints, dtype=np.float64)
    if cuts.ndim != 1 or np.any(np.diff(cuts) <= 0):
        raise ValueError(f"risk_groups: cutpoints={list(cutpoints)} must be strictly increasing")
    return np.searchsorted(cuts, p, side="right").astype(np.int64)


def quantile_cutpoints(
    prob: np.ndarray | Tensor, quantiles: Sequence[float] = (0.2, 0.4, 0.6, 0.8)
) -> tuple[float, ...]:
    """Cohort-specific cut-points: the given quantiles of the predicted probabilities (quintiles by default)."""
    p = prob.detach().cpu().numpy() if isinstance(prob, Tensor) else np.asarray(prob, dtype=np.float64)
    q = np.quantile(p, np.asarray(quantiles))
    # strictly increasing even when predictions tie
    for i in range(1, q.size):
        if q[i] <= q[i - 1]:
            q[i] = math.nextafter(q[i - 1], math.inf)
    return tuple(float(x) for x in q)
