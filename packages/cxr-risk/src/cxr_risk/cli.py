"""The ``cxr-risk`` command: ``inspect``, ``synth`` and ``preprocess`` here, model commands from ``commands``.

Model subcommands (pretrain, finetune, predict, ...) live in :mod:`cxr_risk.commands`, which exposes
``register(subparsers)``; it is imported only when present, so the data layer works without it.
Outputs never contain patient names or IDs: reports name images by row number and image key.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .preprocess import PreprocessConfig, read_images
from .qc import TABLE_COLUMNS


def add_preprocess_arguments(parser: argparse.ArgumentParser, *, size_default: int | None = 512) -> None:
    """The :class:`PreprocessConfig` flags, for every subcommand that reads images."""
    group = parser.add_argument_group("preprocessing")
    group.add_argument(
        "--size", type=int, default=size_default, help="square output side in pixels (0: keep)"
    )
    group.add_argument("--fit", choices=("pad", "crop", "stretch"), default="pad")
    group.add_argument("--mm-per-pixel", type=float, default=None, help="resample to this spacing first")
    group.add_argument("--no-trim", action="store_true", help="keep flat borders")
    group.add_argument("--views", default=None, help="comma-separated views to keep, e.g. PA,AP")
    group.add_argument("--voi", choices=("auto", "percentile"), default="auto")


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    return PreprocessConfig(
        size=args.size or None,
        fit=args.fit,
        mm_per_pixel=args.mm_per_pixel,
        trim=not args.no_trim,
        allowed_views=tuple(v for v in args.views.split(",") if v) if args.views else None,
        voi=args.voi,
    )


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, (int, float)) for v in value):
            return " x ".join(_format(v) for v in value)  # shapes and spacings
        return "; ".join(_format(v) for v in value) if value else "-"
    return str(value)


def _cmd_inspect(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    records: list[dict[str, Any]] = []
    for item in read_images(args.files, config):
        if item.error is not None:
            records.append({"path": item.path, "error": item.error.reason})
        else:
            assert item.qc is not None
            records.append(item.qc.to_dict())
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(show_lines=False)
        columns = [*TABLE_COLUMNS, "error"]
        for col in columns:
            table.add_column(col, overflow="fold")
        for rec in records:
            table.add_row(*(_format(rec.get(col)) for col in columns))
        Console(width=max(160, 20 * len(columns)), soft_wrap=True).print(table)
    return 1 if any("error" in r for r in records) else 0


def _cmd_synth(args: argparse.Namespace) -> int:
    import warnings

    from .synth import make_cohort

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        csv = make_cohort(
            args.out_dir, n=args.n, seed=args.seed, shift=args.shift, size=args.image_size, copies=args.copies
        )
    for w in caught:
        print(f"note: {cli_message(str(w.message), 'synth')}", file=sys.stderr)
    print(f"wrote {args.n} images and {csv}")
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    import pandas as pd

    from .cache import CachedImageDataset
    from .cohort import Cohort

    config = config_from_args(args)
    cohort = Cohort.read(args.cohort, check_files=False)
    dataset = CachedImageDataset(cohort, config, args.cache_dir)
    failures = dataset.warm()
    lines = cohort.lines
    rows = []
    for i, path in enumerate(dataset.paths):
        key = dataset.cache.lookup(path) if i not in dataset.read_errors else None
        rec: dict[str, Any] = {"row": i, "csv_line": int(lines[i]), "file": Path(path).name}
        if key is not None:
            rec.update(dataset.cache.load_qc(key).to_dict(include_path=False))
            rec["warnings"] = "; ".join(rec["warnings"])
        else:
            err = dataset.read_errors[i].to_dict()
            rec.update(error=err["error"], reason=err["reason"])
        rows.append(rec)
    report = Path(args.report) if args.report else dataset.cache.root / "report.csv"
    pd.DataFrame(rows).to_csv(report, index=False)
    print(
        f"cached {len(cohort) - len(failures)}/{len(cohort)} images in {dataset.cache.root} "
        f"(config {config.fingerprint()}); {len(failures)} skipped; report: {report}"
    )
    for row, _ in failures:
        err = dataset.read_errors[row]
        print(f"  line {err.line}: {Path(err.path).name}: {err.reason}", file=sys.stderr)
    return 1 if failures and args.strict else 0


DATA_COMMANDS = ("inspect", "synth", "preprocess")

#: Library keyword arguments and config fields -> the flags that set them, so that an error raised by the
#: Python API reads as CLI on the command line (``--batch-size 0 must be >= 1``, not ``batch_size=0``).
FLAGS: dict[str, str] = {
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "grad_accum": "--grad-accum",
    "num_workers": "--workers",
    "amp": "--amp",
    "kind": "--head",
    "horizon": "--horizon",
    "t_max": "--t-max",
    "n_intervals": "--intervals",
    "censored": "--censored",
    "size": "--size",
    "fit": "--fit",
    "mm_per_pixel": "--mm-per-pixel",
    "allowed_views": "--views",
    "voi": "--voi",
    "method": "--method",
    "init": "--init",
    "time_unit": "--time-unit",
    "followup_cohort": "--followup-cohort",
    "freeze_encoder": "--freeze-encoder",
}
COMMAND_FLAGS: dict[str, dict[str, str]] = {
    "synth": {"n": "--n", "seed": "--seed", "shift": "--shift", "size": "--image-size"},
}
# "TrainConfig: ", "make_cohort: " ...: the command already says where the error came from.
_API_PREFIX = re.compile(r"^(?:[A-Z]\w*(?:Config)?(?:\.\w+)?|make_cohort|pretrain|finetune|predict): ")


def cli_message(message: str, command: str | None = None) -> str:
    """``message`` with the API's ``name=value`` spelled as the flag (``--name value``) that sets it."""
    flags = {**FLAGS, **COMMAND_FLAGS.get(command or "", {})}
    names = "|".join(sorted(map(re.escape, flags), key=len, reverse=True))

    def assignment(m: re.Match[str]) -> str:
        value = m.group(2)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        return f"{flags[m.group(1)]} {value}"

    out = _API_PREFIX.sub("", message)
    out = re.sub(rf"(?<![\w.-])({names})=('[^']*'|\"[^\"]*\"|[^\s,;)]+)", assignment, out)
    # bare snake_case names (never plain words such as "size" or "method", which are prose too)
    bare = "|".join(re.escape(k) for k in flags if "_" in k)
    return re.sub(rf"(?<![\w.-])({bare})(?![\w=])", lambda m: flags[m.group(1)], out)


def build_parser(*, plugins: bool = True) -> argparse.ArgumentParser:
    """The argument parser; ``plugins=False`` leaves out :mod:`cxr_risk.commands` (and its imports)."""
    parser = argparse.ArgumentParser(
        prog="cxr-risk",
        description="Mortality risk from chest radiographs: data commands (inspect, synth, preprocess) "
        "and model commands.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="read radiographs and print their QC records (table or JSON)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_preprocess_arguments(p, size_default=None)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("synth", help="write a synthetic cohort (DICOM/PNG/TIFF + cohort.csv + truth.csv)")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--n", type=int, default=500, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128, help="image side in pixels")
    p.add_argument("--shift", choices=("external",), default=None, help="write the shifted external site")
    p.add_argument("--copies", action="store_true", help="also write PNG and TIFF copies of every DICOM")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("preprocess", help="decode a cohort once into the on-disk cache; report bad files")
    p.add_argument("cohort", metavar="COHORT", help="cohort CSV or parquet")
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--report", default=None, help="QC report CSV (default: inside the cache)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any file was skipped")
    add_preprocess_arguments(p)
    p.set_defaults(func=_cmd_preprocess)

    if plugins and importlib.util.find_spec("cxr_risk.commands") is not None:
        importlib.import_module("cxr_risk.commands").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The data commands do not need the model stack (torch models, timm), so skip importing it.
    parser = build_parser(plugins=not (argv and argv[0] in DATA_COMMANDS))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"cxr-risk {args.command}: {cli_message(str(err), args.command)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
