"""Moved to :mod:`cxr_risk.cli.model_commands`; this alias keeps ``cxr_risk.commands.register`` importable."""

from .cli.model_commands import register

__all__ = ["register"]
