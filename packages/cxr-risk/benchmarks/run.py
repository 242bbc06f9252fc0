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
(``nox -s "bench(cxr-risk, cpu)"``); default: 64 px, timm ``test_resnet``, a few minutes on 2 CPU cores.
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
from cxr_risk.survival import SurvivalConfig
from cxr_risk.sweep import SweepConfig, plot_label_efficiency, run_sweep
from cxr_risk.synth import make_cohort
from cxr_risk.trainer import TrainConfig

PROFILES = {
    # default: meant for < 10 min on a quiet 2-core CPU (34 min measured at load average ~14 on 2 cores)
    "default": dict(
        size=64,
        backbone="test_resnet",
        n_pre=200,
        n_dev=300,
        n_ext=150,
        pretrain_epochs=6,
        finetune_epochs=6,
        min_steps=30,
        batch=32,
        seeds=(0,),
        methods=("scratch", "transfer", "simclr", "autoencoder", "ssae"),
        fractions=(0.05, 0.25, 1.0),
        n_boot=50,
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
    ext_csv = make_cohort(work / "ext", n=p["n_ext"], seed=103, size=max(64, p["size"]), shift="external")
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
    plot = "cxr-risk-label-efficiency.png"
    plot_label_efficiency(table, outdir / plot, title=f"synthetic cohorts, {p['backbone']} at {p['size']} px")

    rows = []
    agg = table.groupby(["method", "fraction", "test_cohort"], sort=False).agg(
        c=("c_index", "mean"), lo=("ci_low", "mean"), hi=("ci_high", "mean"), n=("n_train_patients", "first")
    )
    for method in config.methods:
        for frac in config.fractions:
            r = [method, f"{frac:g}", int(agg.loc[(method, frac, "internal"), "n"])]
            for cohort in ("internal", "external"):
                a = agg.loc[(method, frac, cohort)]
                r += [round(float(a["c"]), 3), f"{a['lo']:.3f}-{a['hi']:.3f}"]
            rows.append(r)
    sweep_section = benchkit.Section(
        title="Label efficiency: C-index by pretraining method and fraction of labelled patients",
        description=(
            "Patient-level Harrell's C (mean over seeds; bootstrap 95% CI over test patients) of a Cox head "
            f"fine-tuned on nested fractions of {p['n_dev']} development images (70% of patients for training), "
            f"tested on the internal 30% and on {p['n_ext']} external-site images. Encoders pretrained once per "
            f"method on {p['n_pre']} images with diagnostic labels and no follow-up. Backbone timm "
            f"{p['backbone']!r}, {p['size']} px, seeds {list(p['seeds'])}."
        ),
        columns=[
            "method",
            "fraction",
            "train patients",
            "internal C",
            "internal 95% CI",
            "external C",
            "external 95% CI",
        ],
        rows=rows,
        plots=[plot],
        notes=[
            "transfer on CPU: no ImageNet weights are available offline, so it is a random-initialisation "
            "stand-in (differs from scratch by seed only); --profile full uses CXR_RISK_IMAGENET_WEIGHTS.",
            f"synthetic data generation {t_synth:.0f} s; timings per stage in the sweep's results.json.",
        ],
    )
    ref_rows = _reference_rows(dev_csv, "development (all)", p["n_boot"]) + _reference_rows(
        ext_csv, "external", p["n_boot"]
    )
    ref_section = benchkit.Section(
        title="Reference scores on the same synthetic cohorts (no training on pixels)",
        description="The true log-hazard is the ceiling any model can reach; age alone is the pixel-free peer.",
        columns=["score", "cohort", "-", "C", "95% CI"],
        rows=ref_rows,
    )
    result.sections += [sweep_section, ref_section]

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
    main()
