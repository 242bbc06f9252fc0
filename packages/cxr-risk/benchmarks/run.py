"""cxr-risk benchmark: the paper's label-efficiency experiment in miniature, plus the data layer's cache speed.

Chen, Lu & Raghu (MIDL 2023) ask which pretraining makes mortality-risk prediction most label-efficient.
Here, on the synthetic cohorts of :mod:`cxr_risk.synth` (survival depends on a lesion's size and texture
through a known hazard):

* a pretraining cohort with diagnostic labels and no follow-up (the survival columns are dropped),
* a development cohort with follow-up (patient-level 70/30 train/internal-test split; nested label fractions
  of the training patients),
* an external cohort from a shifted site (10-bit MONOCHROME1 DX, sigmoid window, other contrast, more noise).

Methods: scratch, transfer (ImageNet weights with ``--profile full`` when ``CXR_RISK_IMAGENET_WEIGHTS``
points at a local file for the backbone; on CPU a random-initialisation stand-in, so it measures only seed
variation against scratch), contrastive (SimCLR), autoencoder, semi-supervised autoencoder (ssae). Each is
compared with the strongest peers that need no training on pixels: a Cox model on age (a pixel-free
baseline; age is part of the true hazard) and the true log-hazard (the ceiling). Reported: patient-level
Harrell's C with bootstrap 95% CIs on the internal and external test cohorts, per method and fraction.

``python benchmarks/run.py --device cpu --profile default --out bench-results/cxr-risk-cpu.json``
(``nox -s "bench(cxr-risk, cpu)"``); default: 64 px, timm ``test_resnet``, 3 seeds (each draws its own
labelled patients), fractions 5-100%; about 5.5 min on a quiet 2-core CPU (README).
``--profile full``: 224 px, resnet18, larger cohorts, 3 seeds and MoCo too (a GPU run).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import benchkit
import numpy as np
import pandas as pd
import torch

from cxr_risk import Cohort, PreprocessConfig
from cxr_risk.metrics import bootstrap_ci, harrell_c
from cxr_risk.predict import load_risk_model, patient_level, predict_cohort
from cxr_risk.survival import SurvivalConfig
from cxr_risk.sweep import SweepConfig, plot_label_efficiency, run_sweep
from cxr_risk.synth import DEVELOPMENT_NOISE, EXTERNAL_GAMMA, EXTERNAL_NOISE, make_cohort
from cxr_risk.trainer import TrainConfig

PROFILES = {
    # default: sized for < 8 min on a quiet 2-core CPU (see README for the measured time): 3 seeds x 5 fractions
    # x 5 methods = 75 fine-tunes of a few seconds each, 3 pretrainings of under a minute each.
    "default": dict(
        size=64,
        backbone="test_resnet",
        n_pre=500,
        n_dev=800,
        n_ext=300,
        pretrain_epochs=6,
        finetune_epochs=6,
        min_steps=30,
        batch=32,
        seeds=(0, 1, 2),
        methods=("scratch", "transfer", "simclr", "autoencoder", "ssae"),
        fractions=(0.05, 0.1, 0.25, 0.5, 1.0),
        n_boot=100,
    ),
    "full": dict(
        size=224,
        backbone="resnet18",
        n_pre=4000,
        n_dev=3000,
        n_ext=1500,
        pretrain_epochs=40,
        finetune_epochs=15,
        min_steps=200,
        batch=64,
        seeds=(0, 1, 2),
        methods=("scratch", "transfer", "simclr", "moco", "autoencoder", "ssae"),
        fractions=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0),
        n_boot=200,
    ),
}
EXT_SEED = 103  # the external cohort (and its shift-ablation copies: same patients)
HORIZON = 8.0  # years: inside follow-up of the synthetic cohort (administratively censored at 12)


def _patient_table(csv: Path) -> pd.DataFrame:
    """One row per patient of a synthetic cohort with its true log-hazard and age."""
    cohort = Cohort.read(csv, check_files=False)
    table = cohort.table.copy()
    truth = pd.read_csv(csv.parent / "truth.csv")
    truth["path"] = [str((csv.parent / p).resolve()) for p in truth["path"]]
    table["path"] = [str(Path(p).resolve()) for p in table["path"]]
    merged = table.merge(truth[["path", "log_hazard"]], on="path", how="left")
    return merged.groupby("patient_id", sort=True).first().reset_index()


def _reference_rows(csv: Path, name: str, n_boot: int) -> list[list]:
    pats = _patient_table(csv)
    t, e = pats["time"].to_numpy(float), pats["event"].to_numpy(int)
    rows = []
    for label, score in (
        ("true log-hazard (ceiling)", pats["log_hazard"]),
        ("age only (no pixels)", pats["age"]),
    ):
        c, lo, hi = bootstrap_ci(harrell_c, t, e, score.to_numpy(float), n_boot=n_boot, seed=0)
        rows.append([label, name, "-", round(c, 3), f"{lo:.3f}-{hi:.3f}"])
    return rows


# The external site's shift taken apart: (display gamma, noise s.d.) of make_cohort's external site. The
# encoding (10-bit MONOCHROME1, SIGMOID window) stays in every variant; the reader undoes it exactly.
SHIFT_PARTS = {
    "gamma only": (EXTERNAL_GAMMA, DEVELOPMENT_NOISE),
    "noise only": (1.0, EXTERNAL_NOISE),
    "encoding only": (1.0, DEVELOPMENT_NOISE),
}


def _shift_ablation(
    work: Path, p: dict, config: SweepConfig, table: pd.DataFrame, ext_seed: int
) -> benchkit.Section:
    """C-index of the 100%-label models on external cohorts with one part of the shift each (same patients)."""
    frac = max(config.fractions)
    cohorts = {
        name: Cohort.read(
            make_cohort(
                work / f"ext-{name.replace(' ', '-')}",
                n=p["n_ext"],
                seed=ext_seed,
                size=max(64, p["size"]),
                shift="external",
                external_gamma=gamma,
                external_noise=noise,
            ),
            check_files=False,
        )
        for name, (gamma, noise) in SHIFT_PARTS.items()
    }
    rows = []
    for method in config.methods:
        full = table[(table.method == method) & (table.fraction == frac) & (table.test_cohort == "external")]
        internal = table[
            (table.method == method) & (table.fraction == frac) & (table.test_cohort == "internal")
        ]
        cs: dict[str, list[float]] = {name: [] for name in SHIFT_PARTS}
        for seed in config.seeds:
            model, side = load_risk_model(work / "sweep" / "finetune" / f"{method}-f{frac:g}-s{seed}")
            for name, cohort in cohorts.items():
                pats = patient_level(predict_cohort(model, side, cohort, work / "cache"))
                cs[name].append(harrell_c(pats["time"], pats["event"], pats["risk"]))
        cells = [f"{internal.c_index.mean():.3f}", f"{full.c_index.mean():.3f} ({full.c_index.std():.3f})"]
        cells += [
            f"{np.mean(v):.3f} ({np.std(v, ddof=1) if len(v) > 1 else float('nan'):.3f})" for v in cs.values()
        ]
        rows.append([method, *cells])
    return benchkit.Section(
        title="External shift taken apart (models fine-tuned on 100% of labels)",
        description=(
            "Harrell's C, mean (sd) over seeds, of the same fine-tuned models on external cohorts of the same "
            "patients with only part of the acquisition shift: the full shift is 10-bit MONOCHROME1 + SIGMOID "
            f"window + display gamma {EXTERNAL_GAMMA} + noise s.d. {EXTERNAL_NOISE} (development site: "
            f"{DEVELOPMENT_NOISE}). Synthetic data only."
        ),
        columns=["method", "internal", "full shift", *SHIFT_PARTS],
        rows=rows,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--profile", default="default", choices=tuple(PROFILES))
    ap.add_argument("--out", type=Path, default=Path("bench-results/cxr-risk-cpu.json"))
    ap.add_argument("--workdir", type=Path, default=None, help="keep cohorts and checkpoints here")
    ap.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a profile setting, e.g. pretrain_epochs=4 or fractions=0.05,1 (reported)",
    )
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA GPU is available")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    p = dict(PROFILES[args.profile])
    for item in args.override:
        key, _, value = item.partition("=")
        if key not in p:
            sys.exit(f"--override {item}: unknown setting {key!r}; known: {sorted(p)}")
        old = p[key]
        if isinstance(old, tuple):
            p[key] = tuple(type(old[0])(v) for v in value.split(","))
        else:
            p[key] = type(old)(value)
    t_start = time.perf_counter()
    outdir = args.out.parent
    outdir.mkdir(parents=True, exist_ok=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cxr-risk-bench-"))
    result = benchkit.Result(
        package="cxr-risk",
        device=args.device,
        profile=args.profile,
        environment=benchkit.environment(["cxr-risk"]),
    )

    benchkit.progress(f"synthetic cohorts in {work}")
    pre_csv = make_cohort(work / "pre", n=p["n_pre"], seed=101, size=max(64, p["size"]))
    frame = pd.read_csv(pre_csv).drop(columns=["time", "event"])  # diagnostic labels, no follow-up
    frame.to_csv(pre_csv, index=False)
    dev_csv = make_cohort(work / "dev", n=p["n_dev"], seed=102, size=max(64, p["size"]))
    ext_csv = make_cohort(
        work / "ext", n=p["n_ext"], seed=EXT_SEED, size=max(64, p["size"]), shift="external"
    )
    t_synth = time.perf_counter() - t_start

    weights = os.environ.get("CXR_RISK_IMAGENET_WEIGHTS") if args.profile == "full" else None
    base = TrainConfig(batch_size=p["batch"], lr=1e-3, progress=False, amp="auto")
    config = SweepConfig(
        methods=p["methods"],
        fractions=p["fractions"],
        seeds=p["seeds"],
        backbone=p["backbone"],
        transfer_checkpoint=weights,
        preprocess=PreprocessConfig(size=p["size"]),
        survival=SurvivalConfig(kind="cox", horizon=HORIZON, t_max=12.0),
        pretrain=replace(base, epochs=p["pretrain_epochs"]),
        finetune=replace(base, epochs=p["finetune_epochs"]),
        finetune_min_steps=p["min_steps"],
        n_boot=p["n_boot"],
    )
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    table = run_sweep(
        Cohort.read(pre_csv, check_files=False),
        Cohort.read(dev_csv, check_files=False),
        Cohort.read(ext_csv, check_files=False),
        work / "sweep",
        config,
        work / "cache",
        log=benchkit.progress,
    )
    ref_rows = _reference_rows(dev_csv, "development (all)", p["n_boot"]) + _reference_rows(
        ext_csv, "external", p["n_boot"]
    )
    references = {
        cohort: {row[0]: row[3] for row in ref_rows if row[1] == name}
        for cohort, name in (("internal", "development (all)"), ("external", "external"))
    }
    plot = "cxr-risk-label-efficiency.png"
    plot_label_efficiency(
        table,
        outdir / plot,
        title=f"synthetic cohorts, {p['backbone']} at {p['size']} px",
        references=references,
    )

    rows = []
    agg = table.groupby(["method", "fraction", "test_cohort"], sort=False).agg(
        c=("c_index", "mean"),
        sd=("c_index", "std"),
        lo=("ci_low", "mean"),
        hi=("ci_high", "mean"),
        n=("n_train_patients", "mean"),
    )
    for method in config.methods:
        for frac in config.fractions:
            r = [method, f"{frac:g}", round(float(agg.loc[(method, frac, "internal"), "n"]))]
            for cohort in ("internal", "external"):
                a = agg.loc[(method, frac, cohort)]
                sd = float(a["sd"]) if len(config.seeds) > 1 else float("nan")
                r += [round(float(a["c"]), 3), round(sd, 3), f"{a['lo']:.3f}-{a['hi']:.3f}"]
            rows.append(r)
    # which method is best (mean external C over seeds) at each fraction, reported as measured
    ext = agg.xs("external", level="test_cohort")["c"].unstack("fraction")
    winners = {f"{f:g}": str(ext[f].idxmax()) for f in config.fractions}
    sweep_section = benchkit.Section(
        title="Label efficiency: C-index by pretraining method and fraction of labelled patients",
        description=(
            "Patient-level Harrell's C of a Cox head fine-tuned (whole network) on nested patient-level "
            f"fractions of the training split of {p['n_dev']} development images (70% of patients), tested on "
            f"the internal 30% and on {p['n_ext']} external-site images (10-bit MONOCHROME1, sigmoid window, "
            f"other contrast, more noise). C: mean over seeds {list(p['seeds'])} (each seed draws its own "
            "labelled patients and fine-tuning run); sd: over seeds; 95% CI: patient bootstrap, mean of the "
            f"per-seed bounds. Encoders pretrained once per method on {p['n_pre']} images with diagnostic "
            f"labels and no follow-up. Backbone timm {p['backbone']!r}, {p['size']} px. Synthetic data only."
        ),
        columns=[
            "method",
            "fraction",
            "train patients",
            "internal C",
            "internal sd",
            "internal 95% CI",
            "external C",
            "external sd",
            "external 95% CI",
        ],
        rows=rows,
        plots=[plot],
        notes=[
            "transfer on CPU: no ImageNet weights are available offline, so it is a random-initialisation "
            "stand-in (differs from scratch by seed only); --profile full uses CXR_RISK_IMAGENET_WEIGHTS.",
            "ssae here: reconstruction + masked diagnostic-label BCE; the pretraining cohort has no "
            "follow-up, so its survival term is off (the fine-tuning stage supplies the survival loss).",
            "best method by mean external C per fraction: "
            + ", ".join(f"{f}: {m}" for f, m in winners.items()),
            f"synthetic data generation {t_synth:.0f} s; timings per stage in the sweep's results.json.",
        ],
    )
    ref_section = benchkit.Section(
        title="Reference scores on the same synthetic cohorts (no training on pixels)",
        description="The true log-hazard is the ceiling any model can reach; age alone is the pixel-free peer.",
        columns=["score", "cohort", "-", "C", "95% CI"],
        rows=ref_rows,
    )
    result.sections += [sweep_section, ref_section]
    benchkit.progress("external shift ablation (100% models)")
    result.sections.append(_shift_ablation(work, p, config, table, ext_seed=EXT_SEED))

    cache_speed = Path(__file__).with_name("cache_speed.py")
    if cache_speed.is_file():
        benchkit.progress("cache speed (data layer)")
        spec = importlib.util.spec_from_file_location("cxr_risk_cache_speed", cache_speed)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        section = module.run(args.profile, outdir)
        result.sections.append(section)

    best = {
        m: float(table[(table.method == m) & (table.test_cohort == "external")]["c_index"].max())
        for m in config.methods
    }
    result.extra = {
        "best_external_c": best,
        "best_method_by_fraction_external": winners,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
        "overrides": args.override,
    }
    result.duration_s = time.perf_counter() - t_start
    result.write(args.out)
    shutil.copy(work / "sweep" / "results.csv", outdir / "cxr-risk-sweep-results.csv")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    benchkit.progress(
        f"done in {result.duration_s:.0f} s; best external C per method: "
        + ", ".join(f"{k} {v:.3f}" for k, v in best.items())
    )


if __name__ == "__main__":
    np.seterr(over="ignore")
    # before any torch op, so the intra-op threads inherit it (see TrainConfig.flush_denormal)
    torch.set_flush_denormal(True)
    main()
