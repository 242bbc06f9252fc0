"""cxr-risk benchmark: the paper's label-efficiency experiment in miniature, plus the data layer's cache speed.

Chen, Lu & Raghu (MIDL 2023) ask which pretraining makes mortality-risk prediction most label-efficient.
Here, on the synthetic cohorts of :mod:`cxr_risk.synth` (survival depends on a lesion's size and texture
through a known hazard):

* a pretraining cohort with diagnostic labels and follow-up (other patients than the development cohort's;
  only the ssae uses its follow-up, in its survival term),
* a development cohort with follow-up (patient-level 70/30 train/internal-test split; nested label fractions
  of the training patients),
* an external cohort from a shifted site (10-bit MONOCHROME1 DX, sigmoid window, other contrast, more noise).

Methods: scratch, transfer (real ImageNet weights: ``tf_efficientnet_lite0`` from the ``cxr-risk[imagenet]``
extra, in the bench venv via BENCH_EXTRAS; ``CXR_RISK_IMAGENET_WEIGHTS`` may point at a local timm-format file
of that architecture instead), contrastive (SimCLR), autoencoder, semi-supervised autoencoder (ssae). Each is
compared with the strongest peers that need no training on pixels: a Cox model on age (a pixel-free
baseline; age is part of the true hazard) and the true log-hazard (the ceiling). Reported: patient-level
Harrell's C with bootstrap 95% CIs on the internal and external test cohorts, per method and fraction.

``python benchmarks/run.py --device cpu --profile default --out bench-results/cxr-risk-cpu.json``
(``nox -s "bench(cxr-risk, cpu)"``). Sections and their budgets (seconds on a quiet 2-core CPU) are in
``benchmarks/budget.json``; a section that would pass its budget stops with what it has and says which
cells are missing. Profiles (all: 64 px, timm ``test_resnet`` for every method but transfer, which needs the
architecture of its weights, ``tf_efficientnet_lite0``; 5 methods, internal and external tests):

* ``quick`` (about 30 s): every section on tiny cohorts, one seed, 25% and 100% labels; a smoke test (CI),
  its C-indices mean little.
* ``default`` (about 3 min): 2 seeds (each draws its own labelled patients) x 5% and 100% labels, the
  README's cohorts and epochs; 12 DICOMs for the cache speed.
* ``full``: on CPU the README's table (3 seeds x 5/10/25/50/100%, 24 DICOMs; about 6 min); with
  ``--device cuda`` the GPU scale (224 px, resnet18, larger cohorts, 1-100%, MoCo too).
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

from cxr_risk import CachedImageDataset, Cohort, PreprocessConfig
from cxr_risk.backbones import BackboneConfig
from cxr_risk.cohort import label_fraction_subsets, patient_split
from cxr_risk.methods import PRETRAINED_METHODS, finetune, pretrain
from cxr_risk.metrics import bootstrap_ci, harrell_c
from cxr_risk.predict import load_risk_model, patient_level, predict_cohort
from cxr_risk.survival import SurvivalConfig

# _finetune_config: the sweep's own rule for batch size and epochs (at least min_steps steps), so a cell
# here trains exactly as the same cell of run_sweep would.
from cxr_risk.sweep import SweepConfig, _finetune_config, plot_label_efficiency
from cxr_risk.synth import DEVELOPMENT_NOISE, EXTERNAL_GAMMA, EXTERNAL_NOISE, make_cohort
from cxr_risk.trainer import TrainConfig

METHODS = (
    "scratch",
    "ssae",
    "simclr",
    "autoencoder",
    "transfer",
)  # the paper's best first; transfer (lite0, ~6x a cell) last
# The settings of the README's table (measured: 324 s for the whole script on a quiet 2-core CPU).
_CPU_PAPER = dict(
    size=64,
    backbone="test_resnet",
    # the one architecture with offline ImageNet weights; about 5x test_resnet's step time at 64 px on CPU
    transfer_backbone="tf_efficientnet_lite0",
    n_pre=500,
    n_dev=800,
    n_ext=300,
    pretrain_epochs=6,
    finetune_epochs=6,
    min_steps=30,
    batch=32,
    seeds=(0, 1, 2),
    methods=METHODS,
    fractions=(0.05, 0.1, 0.25, 0.5, 1.0),
    n_boot=100,
)
PROFILES = {
    # every section once on tiny cohorts (1 pretraining epoch, a few fine-tuning steps): a smoke test
    "quick": dict(
        _CPU_PAPER,
        n_pre=64,
        n_dev=120,
        n_ext=60,
        pretrain_epochs=1,
        finetune_epochs=1,
        min_steps=4,
        batch=16,
        seeds=(0,),
        fractions=(0.25, 1.0),
        n_boot=20,
    ),
    # the README's cohorts and epochs, 2 of its 3 seeds and its two end fractions: 20 fine-tunes of the 75
    "default": dict(_CPU_PAPER, seeds=(0, 1), fractions=(0.05, 1.0)),
    "full": _CPU_PAPER,
}
FULL_CUDA = dict(
    size=224,
    backbone="tf_efficientnet_lite0",
    transfer_backbone="tf_efficientnet_lite0",
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
)
EXT_SEED = 103  # the external cohort (and its shift-ablation copies: same patients)
HORIZON = 8.0  # years: inside follow-up of the synthetic cohort (administratively censored at 12)
COHORTS = ("internal", "external")


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


def _pretrain_all(
    config: SweepConfig, pre: Cohort, work: Path, clock: benchkit.SectionClock
) -> tuple[dict[str, Path], dict[str, float]]:
    """Pretrain each method once; one that would pass the budget is not started and its method is left out.

    The next pretraining's cost is taken as the last one's: the first also fills the image cache and warms up
    torch, so it overstates the rest.
    """
    paths: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    todo = [m for m in config.methods if m in PRETRAINED_METHODS]
    for i, method in enumerate(todo):
        if seconds and clock.over(next_cost=list(seconds.values())[-1]):
            clock.stop(f"{len(paths)}/{len(todo)} pretrainings done; not pretrained: {', '.join(todo[i:])}")
            break
        clock.progress(
            f"pretrain {method} ({i + 1}/{len(todo)}): {config.pretrain.epochs} epochs, {len(pre)} images"
        )
        t0 = time.perf_counter()
        paths[method] = pretrain(
            method,
            pre,
            work / "sweep" / "pretrain" / method,
            BackboneConfig(config.backbone),
            config.preprocess,
            config.pretrain,
            work / "cache",
            survival=config.survival,
            survival_term=method == "ssae" and config.pretrain_survival(pre),
        )
        seconds[method] = time.perf_counter() - t0
        clock.progress(f"pretrain {method} done in {seconds[method]:.1f} s")
    return paths, seconds


def _cells(config: SweepConfig, methods: tuple[str, ...]) -> list[tuple[int, float, str]]:
    """(seed, fraction, method) in run order: seed by seed, the smallest and the 100% fraction first, so a
    run stopped at its budget keeps whole seeds of the headline fractions, every method alike."""
    ends = [min(config.fractions), max(config.fractions)]
    order = list(dict.fromkeys(ends + sorted(config.fractions)))
    return [(seed, frac, method) for seed in config.seeds for frac in order for method in methods]


def _label_efficiency(
    config: SweepConfig,
    dev: Cohort,
    ext: Cohort,
    pretrained: dict[str, Path],
    methods: tuple[str, ...],
    work: Path,
    clock: benchkit.SectionClock,
) -> tuple[pd.DataFrame, dict[str, float], list[tuple[int, float, str]]]:
    """The sweep of :func:`cxr_risk.sweep.run_sweep`, one fine-tune at a time so it can stop at the budget.

    Same split, nested label subsets, fine-tuning settings and tests as ``run_sweep``; a cell is not started
    when it would pass the budget (its cost estimated from the cells done). Returns the tidy results, the
    seconds per cell and the cells not run.
    """
    split = patient_split(dev, (1 - config.test_fraction, config.test_fraction), ("train", "test"), seed=0)
    subsets = {
        seed: label_fraction_subsets(split["train"], config.fractions, seed=seed) for seed in config.seeds
    }
    tests = {"internal": split["test"], "external": ext}
    # read every image into the cache first (the cells would, one by one), so each cell's time is its own
    clock.progress(f"reading {len(dev) + len(ext)} development and external images into the cache")
    for cohort in (dev, ext):
        CachedImageDataset(cohort, config.preprocess, work / "cache").warm()
    cells = _cells(config, methods)
    rows: list[dict] = []
    seconds: dict[str, float] = {}
    cost: dict[float, list[float]] = {}  # seconds per fine-tune, by fraction
    per_step: list[float] = []  # seconds per optimizer step of the cells done (upper bound: includes eval)
    for i, (seed, frac, method) in enumerate(cells):
        sub = subsets[seed][frac]
        ft = _finetune_config(config.finetune, len(sub), config.finetune_min_steps, seed)
        steps = ft.epochs * max(1, len(sub) // ft.batch_size)
        estimate = (
            float(np.mean(cost[frac]))
            if frac in cost
            else (float(np.median(per_step)) * steps if per_step else 0.0)
        )
        if clock.over(next_cost=estimate):
            clock.stop(
                f"{i}/{len(cells)} fine-tunes done; next ({method} {frac:g} seed {seed}) ~{estimate:.0f} s"
            )
            return pd.DataFrame(rows), seconds, cells[i:]
        t0 = time.perf_counter()
        ck = work / "sweep" / "finetune" / f"{method}-f{frac:g}-s{seed}"
        finetune(
            sub,
            ck,
            None if method in pretrained else config.preprocess,
            ft,
            work / "cache",
            config.survival,
            backbone=config.finetune_backbone(method),
            init=pretrained.get(method),
            method=method,
        )
        model, side = load_risk_model(ck)
        for name, cohort in tests.items():
            pats = patient_level(predict_cohort(model, side, cohort, work / "cache"))
            t, e, r = (pats[c].to_numpy() for c in ("time", "event", "risk"))
            c, lo, hi = bootstrap_ci(harrell_c, t, e, r, n_boot=config.n_boot, seed=seed)
            rows.append(
                {
                    "method": method,
                    "fraction": frac,
                    "seed": seed,
                    "n_train_patients": int(pd.unique(sub.patient_ids).size),
                    "n_train_images": len(sub),
                    "test_cohort": name,
                    "n_test_patients": len(pats),
                    "c_index": c,
                    "ci_low": lo,
                    "ci_high": hi,
                }
            )
        dt = time.perf_counter() - t0
        seconds[f"finetune/{method}/{frac:g}/{seed}"] = dt
        cost.setdefault(frac, []).append(dt)
        per_step.append(dt / steps)
        clock.progress(
            f"finetune {i + 1}/{len(cells)} {method} fraction {frac:g} seed {seed} ({steps} steps, {dt:.1f} s): "
            + ", ".join(f"{r['test_cohort']} C={r['c_index']:.3f}" for r in rows[-len(tests) :])
        )
    return pd.DataFrame(rows), seconds, []


def _missing_note(missing: list[tuple[int, float, str]]) -> str:
    by: dict[tuple[int, float], list[str]] = {}
    for seed, frac, method in missing:
        by.setdefault((seed, frac), []).append(method)
    return "; ".join(f"seed {s} at {f:g}: {', '.join(ms)}" for (s, f), ms in by.items())


def _sweep_rows(table: pd.DataFrame, methods: tuple[str, ...], fractions: tuple[float, ...]) -> list[list]:
    agg = table.groupby(["method", "fraction", "test_cohort"], sort=False).agg(
        c=("c_index", "mean"),
        sd=("c_index", "std"),
        n_seeds=("c_index", "size"),
        lo=("ci_low", "mean"),
        hi=("ci_high", "mean"),
        n=("n_train_patients", "mean"),
    )
    rows = []
    for method in methods:
        for frac in fractions:
            if (method, frac, "internal") not in agg.index:
                continue
            a = agg.loc[(method, frac, "internal")]
            r = [method, f"{frac:g}", round(float(a["n"])), int(a["n_seeds"])]
            for cohort in COHORTS:
                a = agg.loc[(method, frac, cohort)]
                sd = float(a["sd"]) if a["n_seeds"] > 1 else float("nan")
                r += [round(float(a["c"]), 3), round(sd, 3), f"{a['lo']:.3f}-{a['hi']:.3f}"]
            rows.append(r)
    return rows


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def _mean_c(table: pd.DataFrame, cohort: str, frac: float) -> pd.Series:
    """Mean C over the seeds run, per method, at one fraction on one test cohort."""
    sub = table[(table.test_cohort == cohort) & (table.fraction == frac)]
    return sub.groupby("method", sort=False)["c_index"].mean()


def _add_headlines(
    result: benchkit.Result,
    table: pd.DataFrame,
    methods: tuple[str, ...],
    fractions: tuple[float, ...],
    references: dict[str, dict[str, float]],
) -> None:
    lo, hi = min(fractions), max(fractions)
    ceiling = references["external"]["true log-hazard (ceiling)"]
    at_lo = _mean_c(table, "external", lo) if len(table) else pd.Series(dtype=float)
    at_hi = _mean_c(table, "external", hi) if len(table) else pd.Series(dtype=float)
    seeds = table.groupby(["method", "fraction"])["seed"].nunique() if len(table) else pd.Series(dtype=int)
    for method in methods:
        done = [(f, c) for f, c in ((lo, at_lo), (hi, at_hi)) if method in c.index]
        n_seeds = {int(seeds[(method, f)]) for f, _ in done}
        cells = [f"{c[method]:.3f}" if method in c.index else "not run" for c in (at_lo, at_hi)]
        if len(n_seeds) == 1:
            n = n_seeds.pop()
            value = " / ".join(cells) + f" (mean of {_seeds(n)})"
        else:  # the budget cut seeds at one fraction only
            value = " / ".join(
                f"{c[method]:.3f} ({_seeds(int(seeds[(method, f)]))})" if method in c.index else "not run"
                for f, c in ((lo, at_lo), (hi, at_hi))
            )
        result.add_headline(
            f"external C, {method}, {lo:.0%} / {hi:.0%} of labels",
            value,
            f"> 0.5 (chance); true-hazard ceiling {ceiling:.3f}",
        )
    for cohort in COHORTS:
        c = _mean_c(table, cohort, lo).sort_values(ascending=False) if len(table) else pd.Series(dtype=float)
        value = "not run"
        if len(c):
            value = f"{c.index[0]} ({c.iloc[0]:.3f}"
            value += f"; next {c.index[1]} {c.iloc[1]:.3f})" if len(c) > 1 else ")"
            if len(c) < len(methods):
                value += f" of {len(c)}/{len(methods)} methods"
        result.add_headline(
            f"most label-efficient method: highest {cohort} C at {lo:.0%} labels",
            value,
            "ssae (the paper's finding)",
        )


# The external site's shift taken apart: (display gamma, noise s.d.) of make_cohort's external site. The
# encoding (10-bit MONOCHROME1, SIGMOID window) stays in every variant; the reader undoes it exactly.
SHIFT_PARTS = {
    "gamma only": (EXTERNAL_GAMMA, DEVELOPMENT_NOISE),
    "noise only": (1.0, EXTERNAL_NOISE),
    "encoding only": (1.0, DEVELOPMENT_NOISE),
}


def _shift_ablation(
    work: Path,
    p: dict,
    table: pd.DataFrame,
    seconds_per_image: float,
    clock: benchkit.SectionClock,
) -> benchkit.Section:
    """C-index of the 100%-label models on external cohorts with one part of the shift each (same patients)."""
    section = benchkit.Section(
        title="External shift taken apart (models fine-tuned on 100% of labels)",
        description=(
            "Harrell's C, mean (sd) over seeds, of the same fine-tuned models on external cohorts of the same "
            "patients with only part of the acquisition shift: the full shift is 10-bit MONOCHROME1 + SIGMOID "
            f"window + display gamma {EXTERNAL_GAMMA} + noise s.d. {EXTERNAL_NOISE} (development site: "
            f"{DEVELOPMENT_NOISE}). Synthetic data only."
        ),
        columns=["method", "seeds", "internal", "full shift", *SHIFT_PARTS],
    )
    frac = max(p["fractions"])
    full = table[table.fraction == frac] if len(table) else table
    if not len(full):
        section.notes.append("not run: no 100%-label model was fine-tuned (label-efficiency section stopped)")
        clock.stop("no 100%-label models")
        return section
    estimate = seconds_per_image * p["n_ext"] * len(SHIFT_PARTS)
    if clock.over(next_cost=estimate):
        section.notes.append(
            f"not run: making the {len(SHIFT_PARTS)} cohorts (~{estimate:.0f} s) would pass the budget"
        )
        clock.stop("no time to make the shifted cohorts")
        return section
    clock.progress(
        f"{len(SHIFT_PARTS)} external cohorts of {p['n_ext']} images, one part of the shift each (made and cached)"
    )
    cohorts = {
        name: Cohort.read(
            make_cohort(
                work / f"ext-{name.replace(' ', '-')}",
                n=p["n_ext"],
                seed=EXT_SEED,
                size=max(64, p["size"]),
                shift="external",
                external_gamma=gamma,
                external_noise=noise,
            ),
            check_files=False,
        )
        for name, (gamma, noise) in SHIFT_PARTS.items()
    }
    for cohort in cohorts.values():  # cached now, so each model's time below is its own
        CachedImageDataset(cohort, PreprocessConfig(size=p["size"]), work / "cache").warm()
    models = list(full[["method", "seed"]].drop_duplicates().itertuples(index=False, name=None))
    cs: dict[tuple[str, int], dict[str, float]] = {}
    last = 0.0
    for i, (method, seed) in enumerate(models):
        if clock.over(next_cost=last):
            left = ", ".join(f"{m} seed {s}" for m, s in models[i:])
            section.notes.append(f"stopped at the budget; models not tested: {left}")
            clock.stop(f"{i}/{len(models)} models tested")
            break
        t0 = time.perf_counter()
        model, side = load_risk_model(work / "sweep" / "finetune" / f"{method}-f{frac:g}-s{seed}")
        cs[(method, seed)] = {
            name: harrell_c(pats["time"], pats["event"], pats["risk"])
            for name, cohort in cohorts.items()
            for pats in [patient_level(predict_cohort(model, side, cohort, work / "cache"))]
        }
        last = time.perf_counter() - t0
        clock.progress(f"shift ablation {i + 1}/{len(models)}: {method} seed {seed}")

    def cell(values: list[float]) -> str:
        return f"{np.mean(values):.3f}" + (f" ({np.std(values, ddof=1):.3f})" if len(values) > 1 else "")

    for method in dict.fromkeys(m for m, _ in cs):
        seeds = [s for m, s in cs if m == method]
        rows = full[(full.method == method) & full.seed.isin(seeds)]
        internal = rows[rows.test_cohort == "internal"].c_index
        external = rows[rows.test_cohort == "external"].c_index.tolist()
        parts = [cell([cs[(method, s)][name] for s in seeds]) for name in SHIFT_PARTS]
        section.rows.append([method, len(seeds), f"{internal.mean():.3f}", cell(external), *parts])
    return section


def _load_cache_speed():
    spec = importlib.util.spec_from_file_location(
        "cxr_risk_cache_speed", Path(__file__).with_name("cache_speed.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    p = dict(FULL_CUDA if (args.profile, args.device) == ("full", "cuda") else PROFILES[args.profile])
    for item in args.override:
        key, _, value = item.partition("=")
        if key not in p:
            sys.exit(f"--override {item}: unknown setting {key!r}; known: {sorted(p)}")
        old = p[key]
        if isinstance(old, tuple):
            p[key] = tuple(type(old[0])(v) for v in value.split(","))
        else:
            p[key] = type(old)(value)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    outdir = args.out.parent
    outdir.mkdir(parents=True, exist_ok=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cxr-risk-bench-"))
    result = benchkit.Result(
        package="cxr-risk",
        device=args.device,
        profile=args.profile,
        environment=benchkit.environment(["cxr-risk"]),
    )
    result.extra = {
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
        "overrides": args.override,
    }
    runner = benchkit.Runner(result, benchkit.load_budgets(Path(__file__).parent, args.profile))
    runner.plan()

    with runner.section("synthetic cohorts") as clock:
        clock.progress(
            f"{p['n_pre']} pretraining, {p['n_dev']} development, {p['n_ext']} external images in {work}"
        )
        t0 = time.perf_counter()
        size = max(64, p["size"])
        # diagnostic labels and follow-up: the ssae's survival term uses the follow-up, the others ignore it
        pre_csv = make_cohort(work / "pre", n=p["n_pre"], seed=101, size=size)
        dev_csv = make_cohort(work / "dev", n=p["n_dev"], seed=102, size=size)
        ext_csv = make_cohort(work / "ext", n=p["n_ext"], seed=EXT_SEED, size=size, shift="external")
        seconds_per_image = (time.perf_counter() - t0) / (p["n_pre"] + p["n_dev"] + p["n_ext"])
        ref_rows = _reference_rows(dev_csv, "development (all)", p["n_boot"]) + _reference_rows(
            ext_csv, "external", p["n_boot"]
        )
        references = {
            cohort: {row[0]: row[3] for row in ref_rows if row[1] == name}
            for cohort, name in (("internal", "development (all)"), ("external", "external"))
        }
        result.sections.append(
            benchkit.Section(
                title="Reference scores on the same synthetic cohorts (no training on pixels)",
                description=(
                    "The true log-hazard is the ceiling any model can reach; age alone is the pixel-free peer."
                ),
                columns=["score", "cohort", "-", "C", "95% CI"],
                rows=ref_rows,
                notes=[f"synthetic data generation {seconds_per_image * 1000:.1f} ms per image"],
            )
        )
    result.write(args.out)

    weights = os.environ.get("CXR_RISK_IMAGENET_WEIGHTS")
    base = TrainConfig(batch_size=p["batch"], lr=1e-3, progress=False, amp="auto")
    config = SweepConfig(
        methods=p["methods"],
        fractions=p["fractions"],
        seeds=p["seeds"],
        backbone=p["backbone"],
        transfer_backbone=p["transfer_backbone"],
        transfer_checkpoint=weights,
        preprocess=PreprocessConfig(size=p["size"]),
        survival=SurvivalConfig(kind="cox", horizon=HORIZON, t_max=12.0),
        pretrain=replace(base, epochs=p["pretrain_epochs"]),
        finetune=replace(base, epochs=p["finetune_epochs"]),
        finetune_min_steps=p["min_steps"],
        n_boot=p["n_boot"],
    )
    with runner.section("pretraining") as clock:
        pretrained, pre_seconds = _pretrain_all(config, Cohort.read(pre_csv, check_files=False), work, clock)
    methods = tuple(m for m in config.methods if m not in PRETRAINED_METHODS or m in pretrained)
    dropped = [m for m in config.methods if m not in methods]
    result.extra["timings_s"] = {f"pretrain/{m}": s for m, s in pre_seconds.items()}
    result.write(args.out)

    with runner.section("label efficiency") as clock:
        table, ft_seconds, missing = _label_efficiency(
            config,
            Cohort.read(dev_csv, check_files=False),
            Cohort.read(ext_csv, check_files=False),
            pretrained,
            methods,
            work,
            clock,
        )
        result.extra["timings_s"].update(ft_seconds)
        missing = [(s, f, m) for s in config.seeds for f in config.fractions for m in dropped] + missing
        notes = [
            f"transfer: ImageNet weights ({config.transfer_config().provenance()}) on "
            f"{config.transfer_config().name}, grey repeated to RGB and normalised with the weights' "
            "mean/std; the other methods use the backbone named in the title.",
            "ssae here: reconstruction + masked diagnostic-label BCE + survival loss on the pretraining "
            f"cohort's follow-up (survival term on: {config.pretrain_survival(Cohort.read(pre_csv, check_files=False))}).",
        ]
        if missing:
            notes.append(f"cells not run (time budget): {_missing_note(missing)}")
        plots = []
        if len(table):
            ext_mean = (
                table[table.test_cohort == "external"].groupby(["fraction", "method"])["c_index"].mean()
            )
            winners = {f"{f:g}": str(ext_mean[f].idxmax()) for f in config.fractions if f in ext_mean.index}
            notes.append(
                "best method by mean external C per fraction: "
                + ", ".join(f"{f}: {m}" for f, m in winners.items())
            )
            result.extra["best_method_by_fraction_external"] = winners
            result.extra["best_external_c"] = {
                m: float(g["c_index"].max())
                for m, g in table[table.test_cohort == "external"].groupby("method")
            }
            plot = "cxr-risk-label-efficiency.png"
            plot_label_efficiency(
                table,
                outdir / plot,
                title=f"synthetic cohorts, {p['backbone']} at {p['size']} px",
                references=references,
            )
            plots.append(plot)
            table.to_csv(outdir / "cxr-risk-sweep-results.csv", index=False)
        result.sections.insert(
            0,
            benchkit.Section(
                title="Label efficiency: C-index by pretraining method and fraction of labelled patients",
                description=(
                    "Patient-level Harrell's C of a Cox head fine-tuned (whole network) on nested patient-level "
                    f"fractions of the training split of {p['n_dev']} development images (70% of patients), "
                    f"tested on the internal 30% and on {p['n_ext']} external-site images (10-bit MONOCHROME1, "
                    f"sigmoid window, other contrast, more noise). C: mean over seeds {list(p['seeds'])} (each "
                    "seed draws its own labelled patients and fine-tuning run); sd: over seeds; 95% CI: patient "
                    "bootstrap, mean of the per-seed bounds. Encoders pretrained once per method on "
                    f"{p['n_pre']} images with diagnostic labels and no follow-up. Backbone timm "
                    f"{p['backbone']!r}, {p['size']} px. Synthetic data only."
                ),
                columns=[
                    "method",
                    "fraction",
                    "train patients",
                    "seeds",
                    "internal C",
                    "internal sd",
                    "internal 95% CI",
                    "external C",
                    "external sd",
                    "external 95% CI",
                ],
                rows=_sweep_rows(table, config.methods, config.fractions) if len(table) else [],
                plots=plots,
                notes=notes,
            ),
        )
        _add_headlines(result, table, config.methods, config.fractions, references)
    result.write(args.out)

    with runner.section("shift ablation") as clock:
        result.sections.append(_shift_ablation(work, p, table, seconds_per_image, clock))
    result.write(args.out)

    with runner.section("cache speed") as clock:
        section = _load_cache_speed().run(args.profile, outdir, log=clock.progress)
        result.sections.append(section)
        ratio = next((r[-1] for r in section.rows if r[0] == "warm"), float("nan"))
        result.add_headline(
            "cached dataset: warm / cold images per second", f"{ratio:.1f}x", ">= 10x (issue target)"
        )
    result.write(args.out)

    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    benchkit.progress(f"cxr-risk done in {result.duration_s:.0f} s")


if __name__ == "__main__":
    np.seterr(over="ignore")
    # before any torch op, so the intra-op threads inherit it (see TrainConfig.flush_denormal)
    torch.set_flush_denormal(True)
    main()
