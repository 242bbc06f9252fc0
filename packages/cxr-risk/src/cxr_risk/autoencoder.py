"""The semi-supervised autoencoder: the pretraining recipe that won in Chen, Lu & Raghu (MIDL 2023).

An encoder and a light decoder are trained on every image (labelled or not) with the joint loss

    w_rec * reconstruction  +  w_dx * masked multi-label BCE (diagnostic labels)  +  w_risk * survival loss

where the BCE ignores missing and uncertain labels (``label_mask`` = 0) and the survival term only sees
images whose patient has follow-up (finite ``time``). With ``w_dx = w_risk = 0`` it is a plain autoencoder,
the paper's unsupervised baseline. The decoder is deliberately small (a 1x1 projection and a few
upsample-conv blocks from the last feature map): its job is to make the encoder keep image content, not to
reconstruct fine detail.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import Encoder
from .survival import SurvivalConfig, SurvivalHead, build_head

__all__ = ["AutoencoderWeights", "Decoder", "SemiSupervisedAutoencoder", "masked_bce"]


def masked_bce(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Binary cross entropy averaged over the known labels only (mask 1); exactly 0 when none is known."""
    if logits.shape != labels.shape or labels.shape != mask.shape:
        raise ValueError(
            f"masked_bce: logits, labels and mask must share a shape; got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)}, {tuple(mask.shape)}"
        )
    m = mask.to(logits.dtype)
    y = torch.nan_to_num(labels.to(logits.dtype), nan=0.0).clamp(0, 1)
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return (bce * m).sum() / m.sum().clamp(min=1.0)


class Decoder(nn.Module):
    """1x1 projection to ``width`` channels, then ``log2(reduction)`` x2 upsample + 3x3 conv blocks."""

    def __init__(self, in_channels: int, reduction: int, width: int = 32) -> None:
        super().__init__()
        n_up = round(math.log2(reduction))
        if 2**n_up != reduction:
            raise ValueError(f"Decoder: encoder reduction={reduction} must be a power of two")
        self.proj = nn.Conv2d(in_channels, width, 1)
        blocks = []
        for i in range(n_up):
            w_out = max(8, width // 2 ** (i + 1))
            w_in = max(8, width // 2**i)
            blocks += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(w_in, w_out, 3, padding=1),
                nn.GroupNorm(1, w_out),
                nn.GELU(),
            ]
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv2d(max(8, width // 2**n_up), 1, 3, padding=1)

    def forward(self, fmap: Tensor, size: tuple[int, int]) -> Tensor:
        y = self.out(self.blocks(self.proj(fmap)))
        if tuple(y.shape[-2:]) != tuple(size):
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(y)


@dataclass
class AutoencoderWeights:
    """Loss weights; ``w_dx = w_risk = 0`` gives the plain autoencoder."""

    w_rec: float = 1.0
    w_dx: float = 1.0
    w_risk: float = 1.0

    def __post_init__(self) -> None:
        for name, v in asdict(self).items():
            if v < 0:
                raise ValueError(f"AutoencoderWeights: {name}={v} must be >= 0")
        if self.w_rec == 0 and self.w_dx == 0 and self.w_risk == 0:
            raise ValueError("AutoencoderWeights: all weights are 0; nothing would be learned")


class SemiSupervisedAutoencoder(nn.Module):
    """Encoder + light decoder + diagnostic-label head + survival head, trained jointly.

    ``forward(batch)`` takes the dataset's dict (``image``; optional ``labels``/``label_mask`` [B, L];
    optional ``time``/``event``, NaN where a patient has no follow-up) and returns ``(loss, logs)``.
    """

    def __init__(
        self,
        encoder: Encoder,
        n_labels: int,
        survival: SurvivalConfig | None = None,
        weights: AutoencoderWeights | None = None,
        decoder_width: int = 32,
    ) -> None:
        super().__init__()
        self.weights = weights or AutoencoderWeights()
        if self.weights.w_dx > 0 and n_labels < 1:
            raise ValueError("SemiSupervisedAutoencoder: w_dx > 0 needs n_labels >= 1 (or set w_dx=0)")
        if self.weights.w_risk > 0 and survival is None:
            raise ValueError("SemiSupervisedAutoencoder: w_risk > 0 needs a SurvivalConfig (or set w_risk=0)")
        self.encoder = encoder
        self.decoder = Decoder(encoder.num_features, encoder.reduction, decoder_width)
        self.dx_head = nn.Linear(encoder.num_features, n_labels) if n_labels > 0 else None
        self.surv_head: SurvivalHead | None = (
            build_head(encoder.num_features, survival) if survival is not None else None
        )

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x = batch["image"]
        fmap = self.encoder.forward_maps(x)
        feats = self.encoder.dropout(fmap.mean(dim=(2, 3)))
        w = self.weights
        logs: dict[str, float] = {}
        loss = x.new_zeros(())
        if w.w_rec > 0:
            rec = F.mse_loss(self.decoder(fmap, (x.shape[-2], x.shape[-1])).float(), x.float())
            loss = loss + w.w_rec * rec
            logs["rec"] = float(rec.detach())
        if w.w_dx > 0 and self.dx_head is not None and "labels" in batch:
            dx = masked_bce(self.dx_head(feats).float(), batch["labels"].float(), batch["label_mask"])
            loss = loss + w.w_dx * dx
            logs["dx"] = float(dx.detach())
        if w.w_risk > 0 and self.surv_head is not None and "time" in batch:
            has = torch.isfinite(batch["time"]) & torch.isfinite(batch["event"])
            out = self.surv_head(feats)
            if bool(has.any()):
                risk = self.surv_head.loss(
                    out[has].float(), batch["time"][has].float(), batch["event"][has].float()
                )
            else:
                risk = (out * 0.0).sum()  # keeps every parameter in the graph (DDP)
            loss = loss + w.w_risk * risk
            logs["risk"] = float(risk.detach())
        elif self.surv_head is not None:
            loss = loss + 0.0 * self.surv_head(feats).sum()
        if self.dx_head is not None and "dx" not in logs:
            loss = loss + 0.0 * self.dx_head(feats).sum()
        if w.w_rec == 0:
            loss = loss + 0.0 * sum(p.sum() for p in self.decoder.parameters())
        return loss, logs

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder.forward_maps(x), (x.shape[-2], x.shape[-1]))
