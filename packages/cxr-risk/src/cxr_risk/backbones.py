"""Encoders from timm (any model name, one input channel) and the risk model built on them.

Chen, Lu & Raghu (MIDL 2023) compare pretraining recipes on one encoder architecture; here the encoder is
whatever ``timm`` model the user names, created with ``in_chans=1`` and ``features_only=True`` so that the
autoencoder's decoder and Grad-CAM can use the last feature map. ImageNet transfer loads a local weight
file (``checkpoint_path``; nothing is downloaded): timm folds the 3-channel stem into one channel by summing
over the input channels, which keeps the response to a grey image (R = G = B) unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from .survival import SurvivalConfig, SurvivalHead, build_head

__all__ = ["BackboneConfig", "Encoder", "RiskModel", "create_encoder"]


@dataclass
class BackboneConfig:
    """Which timm model and how to initialise it.

    ``name``: any ``timm.list_models()`` name (``resnet50``, ``densenet121``, ``convnext_tiny``, the tiny
    ``test_resnet`` used on CPU). ``checkpoint_path``: a local ``.safetensors``/``.pth`` state dict of that
    architecture (e.g. ImageNet weights) for transfer learning; ``None`` = random initialisation.
    ``drop_rate``: dropout before the heads.
    """

    name: str = "resnet18"
    checkpoint_path: str | None = None
    drop_rate: float = 0.0

    def __post_init__(self) -> None:
        if not timm.is_model(self.name):
            raise ValueError(
                f"BackboneConfig: name={self.name!r} is not a timm model; see timm.list_models('*{self.name}*')"
            )
        if self.checkpoint_path is not None and not Path(self.checkpoint_path).is_file():
            raise FileNotFoundError(
                f"BackboneConfig: checkpoint_path={self.checkpoint_path!r} does not exist; pass a local "
                "state-dict file (weights are never downloaded) or None for random initialisation"
            )
        if not 0 <= self.drop_rate < 1:
            raise ValueError(f"BackboneConfig: drop_rate={self.drop_rate} must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Encoder(nn.Module):
    """A timm ``features_only`` network: ``forward`` pools the last feature map to ``[B, num_features]``."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        kwargs: dict[str, Any] = {"in_chans": 1, "features_only": True, "out_indices": (-1,)}
        if config.checkpoint_path is not None:
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(config.checkpoint_path)})
        self.body = timm.create_model(config.name, **kwargs)
        info = self.body.feature_info
        self.num_features: int = int(info.channels()[-1])
        self.reduction: int = int(info.reduction()[-1])
        self.dropout = nn.Dropout(config.drop_rate)

    def forward_maps(self, x: Tensor) -> Tensor:
        """Last feature map ``[B, C, h, w]`` (channels-last outputs of some timm models are permuted)."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"Encoder: expected images [B, 1, H, W]; got {tuple(x.shape)}")
        fmap = self.body(x)[-1]
        if fmap.shape[1] != self.num_features and fmap.shape[-1] == self.num_features:
            fmap = fmap.permute(0, 3, 1, 2)
        return fmap

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.forward_maps(x).mean(dim=(2, 3)))


def create_encoder(name: str, checkpoint_path: str | Path | None = None, drop_rate: float = 0.0) -> Encoder:
    """Shorthand for ``Encoder(BackboneConfig(name, checkpoint_path, drop_rate))``."""
    return Encoder(BackboneConfig(name, None if checkpoint_path is None else str(checkpoint_path), drop_rate))


class RiskModel(nn.Module):
    """Encoder + survival head (+ optional diagnostic-label head): what ``finetune`` trains and ships.

    ``forward(images)`` returns the survival head's raw output; ``features`` and ``dx_logits`` are separate
    so that callers pay only for what they use.
    """

    def __init__(self, encoder: Encoder, survival: SurvivalConfig, n_labels: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        self.head: SurvivalHead = build_head(encoder.num_features, survival)
        self.dx_head = nn.Linear(encoder.num_features, n_labels) if n_labels > 0 else None

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.encoder(images))

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, Tensor]:
        """Risk score, P(death by horizon) and the raw head output for a batch (eval mode is the caller's)."""
        out = self(images)
        return {"out": out, "risk": self.head.risk_score(out), "prob": self.head.prob_event_by(out)}
