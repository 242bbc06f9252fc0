"""Load a fine-tuned risk model and predict, with the checkpoint's preprocessing enforced.

CXR-risk outputs a probability of death by the horizon per radiograph and a risk group (Lu et al. 2019).
A model is only valid for images prepared the way its training images were; the sidecar records that
contract (:class:`~cxr_risk.PreprocessConfig` and its fingerprint) and every entry point here checks it:
a different config, a cache built with different settings, or an array of the wrong size is an error, never
a silently wrong risk.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .backbones import BackboneConfig, Encoder, RiskModel
from .cache import CachedImageDataset, collate
from .checkpoint import Sidecar, load_sidecar, load_state
from .cohort import Cohort
from .config import PreprocessConfig
from .survival import CXR_RISK_CUTPOINTS, SurvivalConfig, risk_groups

__all__ = [
    "as_model_input",
    "check_preprocess",
    "load_risk_model",
    "patient_level",
    "predict_cohort",
    "predict_images",
]


def as_model_input(image: np.ndarray) -> Tensor:
    """``[1, H, W]`` tensor of a :func:`~cxr_risk.read_image` output, quantised to 16 bits as the training
    cache stores it, so that a file read directly and the same file read from a cache predict identically."""
    q = np.round(np.clip(image, 0.0, 1.0) * 65535.0).astype(np.float32) / np.float32(65535.0)
    return torch.from_numpy(q)[None]


def build_risk_model(sidecar: Sidecar) -> RiskModel:
    """An untrained :class:`RiskModel` with the checkpoint's architecture (no weight file is read)."""
    if sidecar.survival is None:
        raise ValueError(f"checkpoint of kind {sidecar.kind!r} has no survival head; fine-tune it first")
    backbone = {**sidecar.backbone, "checkpoint_path": None}
    return RiskModel(Encoder(BackboneConfig(**backbone)), SurvivalConfig(**sidecar.survival), n_labels=0)


def load_risk_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[RiskModel, Sidecar]:
    """A fine-tuned model (eval mode) and its sidecar from a ``finetune`` checkpoint directory."""
    sidecar = load_sidecar(directory)
    if sidecar.kind != "risk":
        raise ValueError(
            f"--model {directory}: a {sidecar.kind!r} pretraining checkpoint cannot predict risk; pass it to "
            "`cxr-risk finetune --init` and use the fine-tuned checkpoint"
        )
    sidecar.preprocess_config()  # raises when the pipeline changed since training
    model = build_risk_model(sidecar)
    state = load_state(directory)
    state = {k.removeprefix("model."): v for k, v in state.items()}
    model.load_state_dict(state)
    return model.to(device).eval(), sidecar


def check_preprocess(sidecar: Sidecar, config: PreprocessConfig | None) -> PreprocessConfig:
    """The checkpoint's config; ``config`` (if given) must produce the same pixels (same fingerprint)."""
    required = sidecar.preprocess_config()
    if config is not None and config.fingerprint() != required.fingerprint():
        diff = {
            k: (v, required.to_dict()[k])
            for k, v in config.to_dict().items()
            if required.to_dict().get(k) != v
        }
        raise ValueError(
            "preprocessing differs from the checkpoint's contract: "
            + ", ".join(f"{k}={given!r} (model needs {need!r})" for k, (given, need) in diff.items())
            + "; drop the preprocessing options to use the checkpoint's, or re-train"
        )
    return required


@torch.no_grad()
def predict_images(
    model: RiskModel, sidecar: Sidecar, images: Tensor, batch_size: int = 64
) -> dict[str, Tensor]:
    """Risk, P(death by horizon) and raw output for prepared images ``[N, 1, H, W]`` in [0, 1]."""
    h, w = sidecar.input_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, h, w):
        raise ValueError(
            f"predict_images: images must be [N, 1, {h}, {w}] as the checkpoint was trained; got "
            f"{tuple(images.shape)} (prepare them with the checkpoint's PreprocessConfig)"
        )
    device = next(model.parameters()).device
    outs = [
        model.predict(images[i : i + batch_size].to(device)) for i in range(0, images.shape[0], batch_size)
    ]
    return {k: torch.cat([o[k] for o in outs]).cpu() for k in outs[0]}


@torch.no_grad()
def predict_cohort(
    model: RiskModel,
    sidecar: Sidecar,
    cohort: Cohort,
    cache_dir: str | Path | None = None,
    preprocess: PreprocessConfig | None = None,
    batch_size: int = 64,
    cutpoints: Sequence[float] = CXR_RISK_CUTPOINTS,
    surv_times: Sequence[float] = (),
) -> pd.DataFrame:
    """One row per image: ``row``, ``patient`` (a code, not the identifier), ``risk``, ``prob``, ``group``,
    plus ``time``/``event`` when the cohort has follow-up. Images are read through the checkpoint's
    preprocessing (a cache under ``cache_dir`` is keyed by its fingerprint, so a cache built with other
    settings is never read). ``surv_times`` adds columns ``S@t`` with S(t) per image."""
    config = check_preprocess(sidecar, preprocess)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = CachedImageDataset(cohort, config, cache_dir if cache_dir is not None else tmp)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
        rows, patients, risks, probs, survs = [], [], [], [], []
        device = next(model.parameters()).device
        for batch in loader:
            out = model.predict(batch["image"].to(device))
            rows.append(batch["index"])
            patients.append(batch["patient"])
            risks.append(out["risk"].float().cpu())
            probs.append(out["prob"].float().cpu())
            if surv_times:
                survs.append(model.head.survival(out["out"], list(surv_times)).float().cpu())
    prob = torch.cat(probs).numpy().astype(np.float64)
    frame = pd.DataFrame(
        {
            "row": torch.cat(rows).numpy(),
            "patient": torch.cat(patients).numpy(),
            "risk": torch.cat(risks).numpy().astype(np.float64),
            "prob": prob,
            "group": risk_groups(prob, cutpoints),
        }
    )
    if surv_times:
        s_all = torch.cat(survs).numpy().astype(np.float64)
        for k, t in enumerate(surv_times):
            frame[f"S@{t:g}"] = s_all[:, k]
    if cohort.has_survival:
        frame["time"] = cohort.table["time"].to_numpy(np.float64)[frame["row"]]
        frame["event"] = cohort.table["event"].to_numpy(np.int64)[frame["row"]]
    return frame


def patient_level(frame: pd.DataFrame, cutpoints: Sequence[float] = CXR_RISK_CUTPOINTS) -> pd.DataFrame:
    """Average the image-level risk and probability per patient (metrics are patient-level)."""
    agg: dict[str, str] = {"risk": "mean", "prob": "mean"}
    agg.update({c: "mean" for c in frame.columns if c.startswith("S@")})
    if "time" in frame:
        agg.update(time="first", event="first")
    out = frame.groupby("patient", sort=True).agg(agg).reset_index()
    out["group"] = risk_groups(out["prob"].to_numpy(), cutpoints)
    return out
