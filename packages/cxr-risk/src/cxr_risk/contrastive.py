"""Contrastive self-supervised pretraining: SimCLR (NT-Xent) and MoCo v2, with grayscale augmentations.

Chen, Lu & Raghu (MIDL 2023) use contrastive learning as one of the self-supervised baselines the
semi-supervised autoencoder is compared against. SimCLR: Chen et al. 2020 (ICML), two augmented views per
image, the other 2N-2 views in the batch are negatives. MoCo v2: He et al. 2020 / Chen et al. 2020
(arXiv:2003.04297), a momentum-updated key encoder and a queue of past keys as negatives, an MLP projector.

Augmentations (:class:`GrayscaleAugment`) suit radiographs: random resized crop, a small rotation,
brightness/contrast jitter and Gaussian blur, drawn independently per image in one batched pass; no hue,
saturation or horizontal flip (the heart's side carries information; flip is off by default).

Each pretraining task is an ``nn.Module`` whose ``forward(batch)`` returns ``(loss, logs)``, so the trainer
(and DDP, which hooks ``forward``) treats every method alike.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import Encoder

__all__ = ["AugmentConfig", "GrayscaleAugment", "MoCo", "SimCLR", "nt_xent_loss", "nt_xent_loss_reference"]


@dataclass
class AugmentConfig:
    """Ranges of the random transforms (per image). Scales are fractions of the image area/intensity."""

    crop_scale: tuple[float, float] = (0.5, 1.0)
    max_rotation_deg: float = 10.0
    brightness: float = 0.2
    contrast: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    hflip_prob: float = 0.0
    gamma: float = 0.0  # display-curve jitter: y ** g, g uniform in [1 - gamma, 1 + gamma]; 0 = off

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"AugmentConfig: crop_scale={self.crop_scale} needs 0 < low <= high <= 1")
        if not 0 <= self.max_rotation_deg <= 45:
            raise ValueError(f"AugmentConfig: max_rotation_deg={self.max_rotation_deg} must be in [0, 45]")
        for name in ("brightness", "contrast", "blur_prob", "hflip_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"AugmentConfig: {name}={getattr(self, name)} must be in [0, 1]")
        if not 0 <= self.gamma < 1:
            raise ValueError(f"AugmentConfig: gamma={self.gamma} must be in [0, 1)")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"AugmentConfig: blur_sigma={self.blur_sigma} needs 0 < low <= high")


class GrayscaleAugment(nn.Module):
    """Batched, per-image random crop + rotation (one ``affine_grid``), intensity jitter and blur.

    Input and output: ``[B, 1, H, W]`` in ``[0, 1]``; the output has the input's size.
    """

    def __init__(self, config: AugmentConfig | None = None) -> None:
        super().__init__()
        self.config = config or AugmentConfig()

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        c = self.config
        b = x.shape[0]
        dev, dt = x.device, x.dtype

        def u(lo: float, hi: float) -> Tensor:
            return lo + (hi - lo) * torch.rand(b, generator=generator, device="cpu").to(dev, dt)

        scale = torch.sqrt(u(*c.crop_scale))  # side length of the crop, as a fraction
        angle = u(-c.max_rotation_deg, c.max_rotation_deg) * (math.pi / 180.0)
        tx = (1 - scale) * u(-1.0, 1.0)
        ty = (1 - scale) * u(-1.0, 1.0)
        flip = torch.where(u(0.0, 1.0) < c.hflip_prob, -1.0, 1.0).to(dt)
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        theta = torch.stack(
            [torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        y = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        mean = y.mean(dim=(1, 2, 3), keepdim=True)
        y = (y - mean) * u(1 - c.contrast, 1 + c.contrast)[:, None, None, None] + mean
        y = y + u(-c.brightness, c.brightness)[:, None, None, None]
        if c.gamma > 0:
            y = y.clamp(0.0, 1.0) ** u(1 - c.gamma, 1 + c.gamma)[:, None, None, None]
        if c.blur_prob > 0:
            sigma = u(*c.blur_sigma)
            radius = max(1, math.ceil(3 * c.blur_sigma[1]))
            r = torch.arange(-radius, radius + 1, device=dev, dtype=dt)
            k = torch.exp(-0.5 * (r[None, :] / sigma[:, None]) ** 2)
            k = k / k.sum(1, keepdim=True)
            apply = (u(0.0, 1.0) < c.blur_prob)[:, None]
            delta = (r == 0).to(dt)[None, :].expand(b, -1)
            k = torch.where(apply, k, delta)  # images not blurred get the identity kernel
            # separable per-image blur as one grouped convolution: batch -> channels
            z = y.transpose(0, 1)  # [1, B, H, W]
            z = F.pad(z, (radius, radius, radius, radius), mode="reflect")
            z = F.conv2d(z, k[:, None, None, :], groups=b)
            z = F.conv2d(z, k[:, None, :, None], groups=b)
            y = z.transpose(0, 1)
        return y.clamp(0.0, 1.0)


def _at_least_fp32(z: Tensor) -> Tensor:
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """SimCLR's normalised-temperature cross entropy over 2N views (Chen et al. 2020, eq. 1).

    View i's positive is its partner; the other 2N-2 views are negatives. Mean over all 2N anchors.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(
            f"nt_xent_loss: z1, z2 must both be [N, D]; got {tuple(z1.shape)}, {tuple(z2.shape)}"
        )
    n = z1.shape[0]
    z = F.normalize(_at_least_fp32(torch.cat([z1, z2])), dim=1)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def nt_xent_loss_reference(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """Per-anchor loop of NT-Xent, written as in the paper; the spec for :func:`nt_xent_loss`."""
    z = F.normalize(_at_least_fp32(torch.cat([z1, z2])), dim=1)
    n2 = z.shape[0]
    n = n2 // 2
    total = z.new_zeros(())
    for i in range(n2):
        j = (i + n) % n2
        sims = torch.stack([torch.dot(z[i], z[k]) / temperature for k in range(n2) if k != i])
        pos = torch.dot(z[i], z[j]) / temperature
        total = total - (pos - torch.logsumexp(sims, 0))
    return total / n2


def _projector(in_dim: int, hidden: int, out_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class SimCLR(nn.Module):
    """SimCLR pretraining task: encoder + 2-layer MLP projector, NT-Xent on two augmented views."""

    def __init__(
        self,
        encoder: Encoder,
        proj_dim: int = 128,
        hidden: int = 512,
        temperature: float = 0.1,
        augment: GrayscaleAugment | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = _projector(encoder.num_features, hidden, proj_dim)
        self.temperature = temperature
        self.augment = augment or GrayscaleAugment()

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x = batch["image"]
        v1, v2 = self.augment(x), self.augment(x)
        z = self.projector(self.encoder(torch.cat([v1, v2])))
        z1, z2 = z.chunk(2)
        loss = nt_xent_loss(z1, z2, self.temperature)
        return loss, {"nt_xent": float(loss.detach())}


class MoCo(nn.Module):
    """MoCo v2 task: query encoder trained by InfoNCE against a momentum key encoder and a queue of keys.

    ``momentum``: EMA factor of the key encoder (0.999 in the paper for 200 epochs of ImageNet; smaller
    runs need a smaller value, 0.99 by default). ``queue_size``: number of negative keys kept (65536 in the
    paper; it must not exceed the number of training images by much or it fills with stale duplicates).
    Under DDP the keys of all ranks are gathered before they enter the queue. Shuffling BN is not done:
    use a backbone with GroupNorm/LayerNorm or accept the (small, at these batch sizes) leakage.
    """

    queue: Tensor
    queue_ptr: Tensor

    def __init__(
        self,
        encoder: Encoder,
        proj_dim: int = 128,
        hidden: int = 512,
        queue_size: int = 4096,
        momentum: float = 0.99,
        temperature: float = 0.2,
        augment: GrayscaleAugment | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= momentum < 1:
            raise ValueError(f"MoCo: momentum={momentum} must be in [0, 1)")
        if queue_size < 1:
            raise ValueError(f"MoCo: queue_size={queue_size} must be >= 1")
        self.encoder = encoder
        self.projector = _projector(encoder.num_features, hidden, proj_dim)
        self.key_encoder = copy.deepcopy(encoder)
        self.key_projector = copy.deepcopy(self.projector)
        for p in [*self.key_encoder.parameters(), *self.key_projector.parameters()]:
            p.requires_grad_(False)
        self.momentum = momentum
        self.temperature = temperature
        self.augment = augment or GrayscaleAugment()
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self) -> None:
        """key <- m * key + (1 - m) * query, for weights and (copied) buffers."""
        pairs = [(self.encoder, self.key_encoder), (self.projector, self.key_projector)]
        for q_mod, k_mod in pairs:
            for pq, pk in zip(q_mod.parameters(), k_mod.parameters()):
                pk.mul_(self.momentum).add_(pq.detach(), alpha=1 - self.momentum)
            for bq, bk in zip(q_mod.buffers(), k_mod.buffers()):
                bk.copy_(bq)

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, keys.contiguous())
            keys = torch.cat(gathered)
        k = keys.shape[0]
        size = self.queue.shape[0]
        ptr = int(self.queue_ptr)
        idx = (torch.arange(k, device=keys.device) + ptr) % size
        self.queue[idx[-size:]] = keys[-size:].to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + k) % size)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x = batch["image"]
        v1, v2 = self.augment(x), self.augment(x)
        q = F.normalize(self.projector(self.encoder(v1)).float(), dim=1)
        with torch.no_grad():
            if self.training:
                self.momentum_update()
            k = F.normalize(self.key_projector(self.key_encoder(v2)).float(), dim=1)
        pos = (q * k).sum(1, keepdim=True)
        neg = q @ self.queue.clone().float().t()
        logits = torch.cat([pos, neg], 1) / self.temperature
        loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
        if self.training:
            self._enqueue(k)
        return loss, {"info_nce": float(loss.detach())}
