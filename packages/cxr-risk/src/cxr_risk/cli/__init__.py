"""The ``cxr-risk`` command: :func:`main` and its parser.

Data subcommands (inspect, synth, preprocess) are in :mod:`cxr_risk.cli.data_commands`, model subcommands
(pretrain, finetune, predict, validate, explain, sweep) in :mod:`cxr_risk.cli.model_commands`, and the
flags they share, with the flag spelling of library errors, in :mod:`cxr_risk.cli.args`. The model
subcommands import the training stack (torch models, timm), so a data command runs without them.
Outputs never contain patient names or IDs: reports name images by row number and image key.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import data_commands
from .args import COMMAND_FLAGS, FLAGS, add_preprocess_arguments, cli_message, config_from_args
from .data_commands import DATA_COMMANDS

__all__ = [
    "COMMAND_FLAGS",
    "DATA_COMMANDS",
    "FLAGS",
    "add_preprocess_arguments",
    "build_parser",
    "cli_message",
    "config_from_args",
    "main",
]


def build_parser(*, plugins: bool = True) -> argparse.ArgumentParser:
    """The argument parser; ``plugins=False`` leaves out the model subcommands (and their imports)."""
    parser = argparse.ArgumentParser(
        prog="cxr-risk",
        description="Mortality risk from chest radiographs: data commands (inspect, synth, preprocess) "
        "and model commands.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data_commands.register(sub)
    if plugins:
        # by name, so that the module is looked up (and can be replaced) in sys.modules
        importlib.import_module(f"{__name__}.model_commands").register(sub)
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
