"""Grad-CAM for the risk score (Selvaraju et al. 2017, "Grad-CAM", ICCV), as used for CXR-risk saliency.

The map is ReLU(sum_k alpha_k A_k) over the encoder's last feature maps A_k, with alpha_k the spatial mean
of d(risk)/dA_k, upsampled to the input size and scaled to [0, 1]. Which regions raise the predicted risk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .backbones import RiskModel

__all__ = ["grad_cam", "save_overlay"]


def grad_cam(model: RiskModel, image: Tensor) -> Tensor:
    """Grad-CAM of ``model.head.risk_score`` for one image ``[1, 1, H, W]``; returns ``[H, W]`` in [0, 1]."""
    if image.ndim != 4 or image.shape[:2] != (1, 1):
        raise ValueError(f"grad_cam: image must be [1, 1, H, W]; got {tuple(image.shape)}")
    model.eval()
    with torch.enable_grad():
        fmap = model.encoder.forward_maps(image)
        risk = model.head.risk_score(model.head(fmap.mean(dim=(2, 3))))
        (grad,) = torch.autograd.grad(risk.sum(), fmap)
    alpha = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((alpha * fmap).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    peak = cam.max()
    return cam / peak if peak > 0 else cam


def save_overlay(image: np.ndarray, cam: np.ndarray, path: str | Path, title: str = "") -> Path:
    """The radiograph in grey with the Grad-CAM map as a translucent heat map, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    ax.imshow(cam, cmap="jet", alpha=0.35, vmin=0, vmax=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
