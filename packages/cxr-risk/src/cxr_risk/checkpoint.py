"""Checkpoints: ``model.safetensors`` + a ``model.json`` sidecar that says how to use the weights.

A checkpoint directory holds

* ``model.safetensors``: the task's state dict (encoder, heads, decoder/projector as trained);
* ``model.json``: the sidecar: what kind of model, the timm backbone, the survival head, the preprocessing
  contract (:class:`~cxr_risk.PreprocessConfig` as a dict plus its fingerprint), the input size, the label
  set, the package version, the seed and the training configuration;
* ``optimizer.safetensors`` + ``trainer_state.json`` (only while training): what resume needs.

Safetensors keeps checkpoints loadable without unpickling arbitrary code; the JSON keeps them readable.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .preprocess import PreprocessConfig

__all__ = ["CHECKPOINT_FORMAT", "Sidecar", "load_sidecar", "load_state", "save_checkpoint"]

CHECKPOINT_FORMAT = "cxr-risk-checkpoint/1"
KINDS = ("risk", "simclr", "moco", "autoencoder", "ssae")


@dataclass
class Sidecar:
    """Everything needed to rebuild and correctly feed a model; written as ``model.json``."""

    kind: str
    backbone: dict[str, Any]
    preprocess: dict[str, Any]
    preprocess_fingerprint: str
    input_size: list[int]
    labels: list[str] = field(default_factory=list)
    survival: dict[str, Any] | None = None
    seed: int = 0
    package_version: str = ""
    train: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = CHECKPOINT_FORMAT
    created_utc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Sidecar: kind={self.kind!r} must be one of {KINDS}")
        if self.format != CHECKPOINT_FORMAT:
            raise ValueError(
                f"Sidecar: format={self.format!r} is not {CHECKPOINT_FORMAT!r}; this checkpoint was written by "
                "an incompatible cxr-risk version"
            )

    @classmethod
    def create(
        cls,
        kind: str,
        backbone: Mapping[str, Any],
        preprocess: PreprocessConfig,
        **kwargs: Any,
    ) -> Sidecar:
        from . import __version__

        if preprocess.size is None:
            raise ValueError("Sidecar: the preprocessing contract needs a fixed size (PreprocessConfig.size)")
        return cls(
            kind=kind,
            backbone=dict(backbone),
            preprocess=preprocess.to_dict(),
            preprocess_fingerprint=preprocess.fingerprint(),
            input_size=list(preprocess.size),  # type: ignore[arg-type]
            package_version=__version__,
            created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **kwargs,
        )

    def preprocess_config(self) -> PreprocessConfig:
        """The contract, checked: a pipeline change since training changes the fingerprint and is an error."""
        config = PreprocessConfig.from_dict(self.preprocess)
        if config.fingerprint() != self.preprocess_fingerprint:
            raise ValueError(
                f"checkpoint preprocessing fingerprint {self.preprocess_fingerprint} does not match what this "
                f"cxr-risk version produces for the same settings ({config.fingerprint()}): the image pipeline "
                "changed since training; re-train or use the cxr-risk version recorded in the sidecar "
                f"({self.package_version})"
            )
        return config

    def to_json(self) -> str:
        from dataclasses import asdict

        return json.dumps(asdict(self), indent=1, sort_keys=True)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_checkpoint(directory: str | Path, module: nn.Module, sidecar: Sidecar) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``directory`` (created); return the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    tmp = out / f".model.safetensors.tmp-{os.getpid()}"
    save_file(state, str(tmp), metadata={"format": CHECKPOINT_FORMAT, "kind": sidecar.kind})
    os.replace(tmp, out / "model.safetensors")
    _atomic_write_bytes(out / "model.json", sidecar.to_json().encode())
    return out


def load_sidecar(directory: str | Path) -> Sidecar:
    path = Path(directory) / "model.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint: {path} not found; --model must be a checkpoint directory written by cxr-risk "
            "(model.safetensors + model.json)"
        )
    return Sidecar(**json.loads(path.read_text()))


def load_state(directory: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(directory) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path} not found")
    return load_file(str(path), device=str(device))
