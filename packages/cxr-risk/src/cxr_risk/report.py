"""Validation report: every number CXR-risk papers quote, patient-level, as JSON + markdown + PNGs.

Lu et al. (2019) and Chen, Lu & Raghu (2023) report discrimination (C-index with CIs, time-dependent AUC),
calibration at the horizon, and stratification into five risk groups (Kaplan-Meier curves, log-rank test,
hazard ratios against the lowest group). :func:`validation_report` computes them from patient-level
predictions; :func:`write_report` writes ``report.json``, ``report.md``, ``km.png``, ``calibration.png`` and
``auc.png``. Image-level predictions are averaged per patient first (metrics are patient-level).

Every headline figure (Harrell's and Uno's C, AUC(t), Brier score at the horizon, integrated Brier score,
calibration slope and intercept) carries a 95% percentile bootstrap CI over patients: ``n_boot`` resamples
(200 by default: the Monte Carlo error of each 2.5/97.5% end is then about a fifth of the metric's
standard error, and a 300-patient report takes about a second; each statistic is resampled with the same
seeded patient draws), resamples where a statistic is undefined (e.g. no death
before t) left out.

Risk groups are shown under two stratifications: the fixed CXR-risk cut-points on P(death by 12 years)
(Lu et al. 2019), and quintiles of the development cohort's predicted risk, computed at training time and
stored in the checkpoint (:func:`cxr_risk.checkpoint.store_risk_cutpoints`). The fixed cut-points suit
only a model calibrated like CXR-risk at a 12-year horizon; when a stratification collapses (fewer than
two non-empty groups, or a group with fewer than :data:`MIN_GROUP_SIZE` patients) the report says so.
A checkpoint without stored cut-points (written before they were recorded) gets no development
stratification and a note saying why: quintiles of the validated cohort itself (``cutpoints="quantiles"``)
are balanced by construction and would hide a shift in predicted risk, so they are never substituted
silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .cohort import check_horizon
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

__all__ = ["MIN_GROUP_SIZE", "risk_group_warnings", "validation_report", "write_report"]

#: A risk group with fewer patients than this gives a Kaplan-Meier curve and hazard ratio too noisy to read
#: (with 10 patients one death moves the curve by 0.1).
MIN_GROUP_SIZE = 10


def _group_names(n_groups: int) -> list[str]:
    return list(RISK_GROUP_NAMES) if n_groups == len(RISK_GROUP_NAMES) else [str(g) for g in range(n_groups)]


def risk_group_warnings(
    groups: np.ndarray, n_groups: int, label: str, min_size: int = MIN_GROUP_SIZE
) -> list[str]:
    """Warnings for a stratification that does not stratify: < 2 non-empty groups, or small/empty groups."""
    names = _group_names(n_groups)
    counts = np.bincount(np.asarray(groups, dtype=np.int64), minlength=n_groups)
    nonempty = np.flatnonzero(counts)
    if nonempty.size < 2:
        where = f"'{names[int(nonempty[0])]}'" if nonempty.size else "no group"
        return [
            f"{label} risk groups collapsed: all {int(counts.sum())} patients fall in {where}, so there is "
            "no stratification (one Kaplan-Meier curve; log-rank test and hazard ratios not computed); "
            "these cut-points do not fit this model's predicted risks"
        ]
    out = []
    small = [f"'{names[g]}' ({counts[g]})" for g in range(n_groups) if 0 < counts[g] < min_size]
    empty = [f"'{names[g]}'" for g in range(n_groups) if counts[g] == 0]
    if small:
        out.append(
            f"{label} risk groups with fewer than {min_size} patients: {', '.join(small)}; their "
            "Kaplan-Meier curves and hazard ratios are unreliable"
        )
    if empty:
        out.append(f"{label} risk groups without patients: {', '.join(empty)}")
    return out


def _stratify(
    t: np.ndarray,
    e: np.ndarray,
    p: np.ndarray,
    cuts: Sequence[float],
    horizon: float,
    name: str,
    source: str,
    min_size: int,
) -> dict[str, Any]:
    groups = risk_groups(p, cuts)
    n_groups = len(cuts) + 1
    names = _group_names(n_groups)
    warnings = risk_group_warnings(groups, n_groups, name, min_size)
    table = []
    hr = cox_hazard_ratios(t, e, groups)
    for g in range(n_groups):
        m = groups == g
        row: dict[str, Any] = {"group": g, "name": names[g], "n": int(m.sum()), "events": int(e[m].sum())}
        if m.any():
            row["observed_mortality_at_horizon"] = float(1.0 - kaplan_meier(t[m], e[m]).at(horizon))
            row["mean_predicted"] = float(p[m].mean())
        if g in hr.groups:
            j = hr.groups.index(g)
            row.update(hr=hr.hazard_ratio[j], hr_ci95=[hr.ci_low[j], hr.ci_high[j]], hr_p=hr.p_value[j])
        elif g == hr.reference and hr.groups:
            row.update(hr=1.0, reference=True)
        table.append(row)
    lr = logrank_test(t, e, groups)
    logrank: dict[str, Any] = (
        {"statistic": lr.statistic, "df": lr.df, "p_value": lr.p_value}
        if lr.df > 0
        else {"statistic": None, "df": 0, "p_value": None, "note": "not computed: one non-empty group"}
    )
    return {
        "name": name,
        "source": source,
        "available": True,
        "cutpoints": [float(c) for c in cuts],
        "groups": table,
        "logrank": logrank,
        "warnings": warnings,
    }


def _ci(statistic: Callable[..., float], *arrays: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    est, lo, hi = bootstrap_ci(statistic, *arrays, n_boot=n_boot, seed=seed)
    return {"estimate": est, "ci95": [lo, hi]}


def validation_report(
    patients: pd.DataFrame,
    horizon: float,
    auc_times: Sequence[float] | None = None,
    surv: np.ndarray | None = None,
    surv_times: Sequence[float] | None = None,
    cutpoints: Sequence[float] | str = CXR_RISK_CUTPOINTS,
    n_boot: int = 200,
    seed: int = 0,
    *,
    time_unit: str | None = None,
    development_cutpoints: Mapping[str, Any] | Sequence[float] | None = None,
    min_group_size: int = MIN_GROUP_SIZE,
) -> dict[str, Any]:
    """Metrics from a patient-level frame with ``time``, ``event``, ``risk``, ``prob`` columns.

    ``horizon`` and ``time`` are in ``time_unit`` (None: not recorded; the report says so); a horizon
    beyond the longest follow-up is an error (:func:`cxr_risk.cohort.check_horizon`), and its unit
    warnings go to ``report["warnings"]``. ``surv``: optional [N, len(surv_times)] survival curves for the
    integrated Brier score. ``cutpoints``: the primary stratification: the fixed CXR-risk cut-points, other
    fixed ones, or ``"quantiles"`` (the validated cohort's own quintiles). ``development_cutpoints``: the
    checkpoint's :attr:`~cxr_risk.checkpoint.Sidecar.risk_cutpoints` record (or plain cut-points), shown as
    a second stratification; None gives an "unavailable" entry. ``n_boot`` resamples (seeded by ``seed``)
    for every CI.
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
    warnings = check_horizon(t, horizon, time_unit)
    boot = {"n_boot": n_boot, "seed": seed}
    c_h = _ci(harrell_c, t, e, r, **boot)
    c_u = _ci(lambda a, b, c: uno_c(a, b, c, tau=horizon), t, e, r, **boot)
    if auc_times is None:  # within follow-up: AUC(t) needs controls still event-free after t
        auc_times = [x for x in (horizon * f for f in (0.25, 0.5, 0.75, 1.0)) if (t > x).any()]
    aucs = {
        f"{x:g}": _ci(lambda a, b, c, x=float(x): time_dependent_auc(a, b, c, x), t, e, r, **boot)
        for x in auc_times
    }
    cal = calibration_at_horizon(t, e, p, horizon)
    out: dict[str, Any] = {
        "n_patients": int(t.size),
        "n_events": int(e.sum()),
        "horizon": horizon,
        "time_unit": time_unit,
        "follow_up": {"median": float(np.median(t)), "max": float(t.max())},
        "harrell_c": c_h,
        "uno_c": {**c_u, "tau": horizon},
        "bootstrap": {"n": n_boot, "seed": seed, "unit": "patient", "method": "percentile", "level": 0.95},
        "time_dependent_auc": aucs,
        "brier_at_horizon": _ci(lambda a, b, q: brier_score(a, b, 1.0 - q, horizon), t, e, p, **boot),
        "calibration": {
            "slope": _ci(lambda a, b, q: calibration_at_horizon(a, b, q, horizon).slope, t, e, p, **boot),
            "intercept": _ci(
                lambda a, b, q: calibration_at_horizon(a, b, q, horizon).intercept, t, e, p, **boot
            ),
            "n_used": cal.n_used,
            "bins": [{"predicted": a, "observed": b, "n": c} for a, b, c in cal.bins],
        },
    }
    if surv is not None and surv_times is not None and len(surv_times) >= 2:
        st = [float(x) for x in surv_times]
        ibs = _ci(lambda a, b, s: integrated_brier_score(a, b, s, st), t, e, np.asarray(surv), **boot)
        out["integrated_brier"] = {**ibs, "times": st}

    strata = []
    if isinstance(cutpoints, str):
        if cutpoints != "quantiles":
            raise ValueError(f"validation_report: cutpoints={cutpoints!r} must be 'quantiles' or numbers")
        primary = (
            "validated-cohort quintiles",
            "quintiles of this cohort's predictions",
            quantile_cutpoints(p),
        )
    elif tuple(float(c) for c in cutpoints) == CXR_RISK_CUTPOINTS:
        primary = ("CXR-risk", "fixed, Lu et al. 2019", CXR_RISK_CUTPOINTS)
    else:
        primary = ("fixed", "given cut-points", tuple(float(c) for c in cutpoints))
    strata.append(_stratify(t, e, p, primary[2], horizon, primary[0], primary[1], min_group_size))
    if primary[0] != "CXR-risk":
        strata.append(
            _stratify(
                t, e, p, CXR_RISK_CUTPOINTS, horizon, "CXR-risk", "fixed, Lu et al. 2019", min_group_size
            )
        )
    if development_cutpoints is None:
        strata.append(
            {
                "name": "development quantiles",
                "source": "checkpoint",
                "available": False,
                "note": "unavailable: the checkpoint stores no development cut-points (it was written before "
                "cxr-risk recorded them); re-run finetune to record them, or use --cutpoints quantiles for "
                "this cohort's own quintiles (balanced by construction)",
            }
        )
    else:
        record = development_cutpoints
        cuts = record["cutpoints"] if isinstance(record, Mapping) else record
        src = (
            f"quantiles {', '.join(f'{q:g}' for q in record['quantiles'])} of the development cohort's "
            f"predictions ({record['n_patients']} patients), stored in the checkpoint"
            if isinstance(record, Mapping)
            else "given development cut-points"
        )
        strata.append(
            _stratify(
                t, e, p, [float(c) for c in cuts], horizon, "development quantiles", src, min_group_size
            )
        )
    out["stratifications"] = strata
    # the primary stratification, where earlier reports had it
    out["cutpoints"] = strata[0]["cutpoints"]
    out["cutpoint_source"] = "quantiles" if isinstance(cutpoints, str) else "fixed"
    out["risk_groups"] = strata[0]["groups"]
    out["logrank"] = strata[0]["logrank"]
    out["warnings"] = warnings + [w for s in strata for w in s.get("warnings", [])]
    return out


def _fmt(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _with_ci(m: Mapping[str, Any], digits: int = 3) -> str:
    lo, hi = m["ci95"]
    return f"{m['estimate']:.{digits}f} ({lo:.{digits}f} to {hi:.{digits}f})"


def _unit(report: Mapping[str, Any]) -> str:
    return report.get("time_unit") or "unit not recorded"


def _logrank_text(lr: Mapping[str, Any]) -> str:
    if lr.get("statistic") is None:
        return lr.get("note", "not computed")
    return f"chi2 = {lr['statistic']:.2f} (df {lr['df']}), p = {lr['p_value']:.2g}"


def _plot_km(
    ax: Any, table_ax: Any, t: np.ndarray, e: np.ndarray, p: np.ndarray, stratum: Mapping[str, Any], unit: str
) -> None:
    """Kaplan-Meier per group with its 95% band (Greenwood, log-log) and numbers at risk underneath."""
    from matplotlib.ticker import MaxNLocator

    groups = risk_groups(p, stratum["cutpoints"])
    ticks = MaxNLocator(nbins=5).tick_values(0.0, float(t.max()))
    ticks = ticks[(ticks >= 0) & (ticks <= t.max() + 1e-12)]
    rows = [g for g in range(len(stratum["groups"])) if (groups == g).any()]
    for g in rows:  # colour and table row by group, so that panels line up
        m = groups == g
        km = kaplan_meier(t[m], e[m])
        lo, hi = km.confidence_band()
        x = np.r_[0.0, km.times]
        (line,) = ax.step(
            x,
            np.r_[1.0, km.survival],
            where="post",
            color=f"C{g}",
            label=f"{stratum['groups'][g]['name']} (n={int(m.sum())})",
        )
        ax.fill_between(
            x, np.r_[1.0, lo], np.r_[1.0, hi], step="post", color=line.get_color(), alpha=0.15, lw=0
        )
        for tick, n in zip(ticks, km.n_at_risk(ticks)):
            table_ax.text(tick, -g, str(int(n)), ha="center", va="center", fontsize=6, color=line.get_color())
        table_ax.text(
            -0.06,
            -g,
            stratum["groups"][g]["name"],
            transform=table_ax.get_yaxis_transform(),
            ha="right",
            va="center",
            fontsize=6,
            color=line.get_color(),
        )
    lr = stratum["logrank"]
    title = f"{stratum['name']}: log-rank " + (
        f"p = {lr['p_value']:.2g}" if lr.get("p_value") is not None else "not computed (one group)"
    )
    ax.set(ylabel="survival (Kaplan-Meier, 95% band)", ylim=(0.0, 1.02), title=title, xticks=ticks)
    ax.set_xlim(0.0, float(t.max()))
    ax.set_xlabel(f"time ({unit})")
    ax.legend(fontsize=6, loc="lower left")
    ax.title.set_fontsize(8)
    table_ax.set_ylim(-len(stratum["groups"]) + 0.5, 0.5)
    table_ax.set_xlim(ax.get_xlim())
    table_ax.axis("off")
    table_ax.set_title("number at risk", fontsize=7, loc="left")


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
    p = patients["prob"].to_numpy(np.float64)
    unit = _unit(report)
    shown = [s for s in report["stratifications"] if s["available"]]
    fig, axes = plt.subplots(
        2,
        len(shown),
        figsize=(5.0 * len(shown), 5.2),
        squeeze=False,
        gridspec_kw={"height_ratios": [3.2, 1.0]},
    )
    for j, stratum in enumerate(shown):
        _plot_km(axes[0, j], axes[1, j], t, e, p, stratum, unit)
    fig.tight_layout()
    fig.savefig(out / "km.png", dpi=120)
    plt.close(fig)

    cal = report["calibration"]
    horizon_text = f"{report['horizon']:g} {unit}"
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.plot([b["predicted"] for b in cal["bins"]], [b["observed"] for b in cal["bins"]], "o-")
    ax.set(
        xlabel=f"predicted P(death by {horizon_text})",
        ylabel="observed (Kaplan-Meier)",
        title=f"slope {cal['slope']['estimate']:.2f}, intercept {cal['intercept']['estimate']:.2f}",
    )
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4, 3))
    aucs = report["time_dependent_auc"]
    x = np.array([float(k) for k in aucs])
    y = np.array([v["estimate"] for v in aucs.values()])
    ci = np.array([v["ci95"] for v in aucs.values()]).reshape(-1, 2)
    ax.errorbar(x, y, yerr=np.abs(np.stack([y - ci[:, 0], ci[:, 1] - y])), fmt="o-", capsize=3)
    ax.set(xlabel=f"time ({unit})", ylabel="time-dependent AUC (95% CI)", ylim=(0.4, 1.0))
    fig.tight_layout()
    fig.savefig(out / "auc.png", dpi=120)
    plt.close(fig)

    fu = report["follow_up"]
    lines = [
        f"# {title}",
        "",
        f"{report['n_patients']} patients, {report['n_events']} events; horizon {horizon_text}; follow-up "
        f"median {fu['median']:.3g}, longest {fu['max']:.3g} {unit}. 95% CIs: percentile bootstrap over "
        f"patients ({report['bootstrap']['n']} resamples, seed {report['bootstrap']['seed']}).",
        "",
    ]
    if report["warnings"]:
        lines += ["**Warnings**", "", *[f"- {w}" for w in report["warnings"]], ""]
    uc = report["uno_c"]
    lines += [
        "| metric | value (95% CI) |",
        "|---|---|",
        f"| Harrell's C | {_with_ci(report['harrell_c'])} |",
        f"| Uno's C (tau = {uc['tau']:g} {unit}) | {_with_ci(uc)} |",
        *[f"| AUC(t = {k} {unit}) | {_with_ci(v)} |" for k, v in aucs.items()],
        f"| Brier at horizon | {_with_ci(report['brier_at_horizon'], 4)} |",
        *(
            [f"| integrated Brier | {_with_ci(report['integrated_brier'], 4)} |"]
            if "integrated_brier" in report
            else []
        ),
        f"| calibration slope | {_with_ci(cal['slope'])} |",
        f"| calibration intercept | {_with_ci(cal['intercept'])} |",
        "",
    ]
    for stratum in report["stratifications"]:
        lines += [f"## Risk groups: {stratum['name']}", ""]
        if not stratum["available"]:
            lines += [stratum["note"], ""]
            continue
        lines += [
            f"Cut-points on P(death by {horizon_text}): {', '.join(f'{c:.3g}' for c in stratum['cutpoints'])} "
            f"({stratum['source']}). Log-rank: {_logrank_text(stratum['logrank'])}.",
            "",
            *[f"- warning: {w}" for w in stratum["warnings"]],
            *([""] if stratum["warnings"] else []),
            "| group | n | events | observed mortality | mean predicted | HR vs lowest (95% CI) |",
            "|---|---|---|---|---|---|",
        ]
        for row in stratum["groups"]:
            hr = (
                "reference"
                if row.get("reference")
                else (
                    f"{row['hr']:.2f} ({row['hr_ci95'][0]:.2f}-{row['hr_ci95'][1]:.2f})"
                    if "hr" in row
                    else "-"
                )
            )
            lines.append(
                f"| {row['name']} | {row['n']} | {row['events']} | "
                f"{_fmt(row.get('observed_mortality_at_horizon', '-'))} | {_fmt(row.get('mean_predicted', '-'))} "
                f"| {hr} |"
            )
        lines.append("")
    lines += [
        "![Kaplan-Meier by risk group](km.png)",
        "![calibration](calibration.png)",
        "![AUC](auc.png)",
        "",
    ]
    md = out / "report.md"
    md.write_text("\n".join(lines))
    return md
