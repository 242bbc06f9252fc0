"""Checkpoints: ``model.safetensors`` + a ``model.json`` sidecar that says how to use the weights.

A checkpoint directory holds

* ``model.safetensors``: the task's state dict (encoder, heads, decoder/projector as trained);
* ``model.json``: the sidecar: what kind of model, the timm backbone, the survival head, the preprocessing
  contract (:class:`~cxr_risk.PreprocessConfig` as a dict plus its fingerprint), the input size, the label
  set, the package version, the seed and the training configuration, the unit of follow-up time and
  the development cohort's risk-group cut-points (older checkpoints have neither and load with
  ``time_unit`` and ``risk_cutpoints`` None);
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

from ._version import __version__
from .cohort import check_time_unit
from .config import PreprocessConfig

__all__ = [
    "CHECKPOINT_FORMAT",
    "Sidecar",
    "load_sidecar",
    "load_state",
    "save_checkpoint",
    "store_risk_cutpoints",
    "update_sidecar",
]

CHECKPOINT_FORMAT = "cxr-risk-checkpoint/1"
KINDS = ("risk", "simclr", "moco", "autoencoder", "ssae")


@dataclass
class Sidecar:
    """Everything needed to rebuild and correctly feed a model; written as ``model.json``.

    ``time_unit``: what the survival horizon and the cohort's ``time`` are in (one of
    :data:`cxr_risk.cohort.TIME_UNITS`; None when not recorded). ``risk_cutpoints``: data-driven risk-group
    cut-points on P(death by horizon) from the development cohort (:func:`store_risk_cutpoints`), None when
    not recorded.
    """

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
    time_unit: str | None = None
    risk_cutpoints: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Sidecar: kind={self.kind!r} must be one of {KINDS}")
        check_time_unit(self.time_unit, name="Sidecar: time_unit")
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


def update_sidecar(directory: str | Path, **changes: Any) -> Sidecar:
    """Rewrite ``model.json`` in ``directory`` with ``changes`` applied (validated); the weights stay."""
    from dataclasses import replace

    sidecar = replace(load_sidecar(directory), **changes)
    _atomic_write_bytes(Path(directory) / "model.json", sidecar.to_json().encode())
    return sidecar


#: Quintiles: five groups, as many as the fixed CXR-risk groups (Lu et al. 2019).
DEVELOPMENT_QUANTILES: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)


def store_risk_cutpoints(
    directory: str | Path, prob: Any, quantiles: tuple[float, ...] = DEVELOPMENT_QUANTILES
) -> Sidecar:
    """Store the ``quantiles`` of the development cohort's patient-level P(death by horizon) as cut-points.

    Computed once, at training time, so that a validation report can stratify an external cohort on the
    development cohort's scale (quantiles of the validated cohort itself would make balanced groups by
    construction and hide a shift in predicted risk).
    """
    import numpy as np

    from .survival import quantile_cutpoints

    p = np.asarray(prob, dtype=np.float64)
    if p.ndim != 1 or p.size < len(quantiles) + 1 or not np.isfinite(p).all():
        raise ValueError(
            f"store_risk_cutpoints: need a 1-D array of at least {len(quantiles) + 1} finite probabilities; "
            f"got shape {p.shape}"
        )
    record = {
        "source": "development quantiles",
        "quantiles": [float(q) for q in quantiles],
        "cutpoints": list(quantile_cutpoints(p, quantiles)),
        "n_patients": int(p.size),
    }
    return update_sidecar(directory, risk_cutpoints=record)
