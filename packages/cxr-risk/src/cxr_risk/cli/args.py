"""Arguments shared by the subcommands, and API errors spelled as the flags that cause them.

:func:`add_preprocess_arguments` and :func:`config_from_args` are the :class:`PreprocessConfig` flags of
every command that reads images; :func:`cli_message` rewrites a library error (``batch_size=0``) into the
flag the user typed (``--batch-size 0``).
"""

from __future__ import annotations

import argparse
import re

from ..config import PreprocessConfig

__all__ = ["COMMAND_FLAGS", "FLAGS", "add_preprocess_arguments", "cli_message", "config_from_args"]


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
