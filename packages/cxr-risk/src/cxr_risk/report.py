"""Validation report: every number CXR-risk papers quote, patient-level, as JSON + markdown + PNGs.

Lu et al. (2019) and Chen, Lu & Raghu (2023) report discrimination (C-index with CIs, time-dependent AUC),
calibration at the horizon, and stratification into five risk groups (Kaplan-Meier curves, log-rank test,
hazard ratios against the lowest group). :func:`validation_report` computes them from patient-level
predictions; :func:`write_report` writes ``report.json``, ``report.md``, ``km.png``, ``calibration.png`` and
``auc.png``. Image-level predictions are averaged per patient first (metrics are patient-level).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .metrics import (
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
from .survival import CXR_RISK_CUTPOINTS, RISK_GROUP_NAMES, quantile_cutpoints, risk_groups

__all__ = ["validation_report", "write_report"]


def validation_report(
    patients: pd.DataFrame,
    horizon: float,
    auc_times: Sequence[float] | None = None,
    surv: np.ndarray | None = None,
    surv_times: Sequence[float] | None = None,
    cutpoints: Sequence[float] | str = CXR_RISK_CUTPOINTS,
    n_boot: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics from a patient-level frame with ``time``, ``event``, ``risk``, ``prob`` columns.

    ``surv``: optional [N, len(surv_times)] survival curves for the integrated Brier score.
    ``cutpoints``: the fixed CXR-risk cut-points, other fixed ones, or ``"quantiles"`` (cohort quintiles).
    """
    for col in ("time", "event", "risk", "prob"):
        if col not in patients:
            raise ValueError(
                f"validation_report: column {col!r} missing; validation needs a cohort with follow-up"
            )
    t = patients["time"].to_numpy(np.float64)
    e = patients["event"].to_numpy(np.int64)
    r = patients["risk"].to_numpy(np.float64)
    p = patients["prob"].to_numpy(np.float64)
    cuts = quantile_cutpoints(p) if cutpoints == "quantiles" else tuple(float(c) for c in cutpoints)
    groups = risk_groups(p, cuts)
    c_h = bootstrap_ci(harrell_c, t, e, r, n_boot=n_boot, seed=seed)
    c_u = bootstrap_ci(lambda a, b, c: uno_c(a, b, c, tau=horizon), t, e, r, n_boot=n_boot, seed=seed)
    if auc_times is None:  # within follow-up: AUC(t) needs controls still event-free after t
        auc_times = [x for x in (horizon * f for f in (0.25, 0.5, 0.75, 1.0)) if (t > x).any()]
    aucs = {f"{x:g}": time_dependent_auc(t, e, r, float(x)) for x in auc_times}
    cal = calibration_at_horizon(t, e, p, horizon)
    out: dict[str, Any] = {
        "n_patients": int(t.size),
        "n_events": int(e.sum()),
        "horizon": horizon,
        "harrell_c": {"estimate": c_h[0], "ci95": [c_h[1], c_h[2]]},
        "uno_c": {"estimate": c_u[0], "ci95": [c_u[1], c_u[2]], "tau": horizon},
        "bootstrap": {"n": n_boot, "seed": seed, "unit": "patient"},
        "time_dependent_auc": aucs,
        "brier_at_horizon": brier_score(t, e, 1.0 - p, horizon),
        "calibration": {
            "slope": cal.slope,
            "intercept": cal.intercept,
            "n_used": cal.n_used,
            "bins": [{"predicted": a, "observed": b, "n": c} for a, b, c in cal.bins],
        },
        "cutpoints": list(cuts),
        "cutpoint_source": "quantiles" if cutpoints == "quantiles" else "fixed",
    }
    if surv is not None and surv_times is not None and len(surv_times) >= 2:
        out["integrated_brier"] = integrated_brier_score(t, e, surv, surv_times)
    lr = logrank_test(t, e, groups)
    hr = cox_hazard_ratios(t, e, groups)
    table = []
    for g in range(len(cuts) + 1):
        m = groups == g
        row: dict[str, Any] = {"group": g, "name": RISK_GROUP_NAMES[g] if len(cuts) == 4 else str(g)}
        row.update(n=int(m.sum()), events=int(e[m].sum()))
        if m.any():
            row["observed_mortality_at_horizon"] = float(1.0 - kaplan_meier(t[m], e[m]).at(horizon))
            row["mean_predicted"] = float(p[m].mean())
        if g in hr.groups:
            j = hr.groups.index(g)
            row.update(hr=hr.hazard_ratio[j], hr_ci95=[hr.ci_low[j], hr.ci_high[j]], hr_p=hr.p_value[j])
        elif g == hr.reference:
            row.update(hr=1.0, reference=True)
        table.append(row)
    out["risk_groups"] = table
    out["logrank"] = {"statistic": lr.statistic, "df": lr.df, "p_value": lr.p_value}
    return out


def _fmt(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def write_report(
    report: dict[str, Any], patients: pd.DataFrame, out_dir: str | Path, title: str = "cxr-risk validation"
) -> Path:
    """Write ``report.json``, ``report.md`` and the PNGs into ``out_dir``; return the markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    t = patients["time"].to_numpy(np.float64)
    e = patients["event"].to_numpy(np.int64)
    groups = risk_groups(patients["prob"].to_numpy(), report["cutpoints"])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for g in np.unique(groups):
        km = kaplan_meier(t[groups == g], e[groups == g])
        name = report["risk_groups"][int(g)]["name"]
        ax.step(
            np.r_[0, km.times],
            np.r_[1, km.survival],
            where="post",
            label=f"{name} (n={int((groups == g).sum())})",
        )
    ax.set(
        xlabel="time",
        ylabel="survival (Kaplan-Meier)",
        title=f"log-rank p = {report['logrank']['p_value']:.2g}",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "km.png", dpi=120)
    plt.close(fig)
    bins = report["calibration"]["bins"]
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], "o-")
    cal = report["calibration"]
    ax.set(
        xlabel=f"predicted P(death by {report['horizon']:g})",
        ylabel="observed (Kaplan-Meier)",
        title=f"slope {cal['slope']:.2f}, intercept {cal['intercept']:.2f}",
    )
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4, 3))
    aucs = report["time_dependent_auc"]
    ax.plot([float(k) for k in aucs], list(aucs.values()), "o-")
    ax.set(xlabel="time", ylabel="time-dependent AUC", ylim=(0.4, 1.0))
    fig.tight_layout()
    fig.savefig(out / "auc.png", dpi=120)
    plt.close(fig)
    hc, uc = report["harrell_c"], report["uno_c"]
    lines = [
        f"# {title}",
        "",
        f"{report['n_patients']} patients, {report['n_events']} events; horizon {report['horizon']:g}; "
        f"bootstrap CIs over patients (n = {report['bootstrap']['n']}).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| Harrell's C | {hc['estimate']:.3f} ({hc['ci95'][0]:.3f}-{hc['ci95'][1]:.3f}) |",
        f"| Uno's C (tau = {uc['tau']:g}) | {uc['estimate']:.3f} ({uc['ci95'][0]:.3f}-{uc['ci95'][1]:.3f}) |",
        *[f"| AUC(t = {k}) | {v:.3f} |" for k, v in report["time_dependent_auc"].items()],
        f"| Brier at horizon | {report['brier_at_horizon']:.4f} |",
        *(
            [f"| integrated Brier | {report['integrated_brier']:.4f} |"]
            if "integrated_brier" in report
            else []
        ),
        f"| calibration slope | {cal['slope']:.3f} |",
        f"| calibration intercept | {cal['intercept']:.3f} |",
        f"| log-rank (df {report['logrank']['df']}) | {report['logrank']['statistic']:.2f}, "
        f"p = {report['logrank']['p_value']:.2g} |",
        "",
        f"Risk groups ({report['cutpoint_source']} cut-points {', '.join(f'{c:.3g}' for c in report['cutpoints'])}):",
        "",
        "| group | n | events | observed mortality | mean predicted | HR vs lowest (95% CI) |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["risk_groups"]:
        hr = (
            "reference"
            if row.get("reference")
            else (
                f"{row['hr']:.2f} ({row['hr_ci95'][0]:.2f}-{row['hr_ci95'][1]:.2f})" if "hr" in row else "-"
            )
        )
        lines.append(
            f"| {row['name']} | {row['n']} | {row['events']} | {_fmt(row.get('observed_mortality_at_horizon', '-'))} "
            f"| {_fmt(row.get('mean_predicted', '-'))} | {hr} |"
        )
    lines += [
        "",
        "![Kaplan-Meier by risk group](km.png)",
        "![calibration](calibration.png)",
        "![AUC](auc.png)",
        "",
    ]
    md = out / "report.md"
    md.write_text("\n".join(lines))
    return md
