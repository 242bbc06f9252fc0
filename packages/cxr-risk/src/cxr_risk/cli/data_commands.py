"""The data subcommands of ``cxr-risk``: ``inspect``, ``synth`` and ``preprocess``.

They need the readers, the cohort table and the cache, never the model stack (torch models, timm), so
:func:`cxr_risk.cli.main` runs them without importing :mod:`cxr_risk.cli.model_commands`. Outputs never
contain patient names or IDs: reports name images by row number and image key.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..preprocess import read_images
from ..qc import TABLE_COLUMNS
from .args import add_preprocess_arguments, cli_message, config_from_args

__all__ = ["DATA_COMMANDS", "register"]

DATA_COMMANDS = ("inspect", "synth", "preprocess")


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

    from ..synth import make_cohort

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

    from ..cache import CachedImageDataset
    from ..cohort import Cohort

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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the data subcommands to the ``cxr-risk`` parser's subparsers."""
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
