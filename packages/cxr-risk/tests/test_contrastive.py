"""SimCLR NT-Xent against its loop reference; MoCo momentum and queue; augmentations stay grey and in range."""

from __future__ import annotations

import pytest
import torch

from cxr_risk.backbones import create_encoder
from cxr_risk.contrastive import (
    AugmentConfig,
    GrayscaleAugment,
    MoCo,
    SimCLR,
    nt_xent_loss,
    nt_xent_loss_reference,
)

torch.set_num_threads(1)


@pytest.mark.parametrize("n,d", [(1, 3), (5, 7), (16, 32)], ids=["N1-D3", "N5-D7", "N16-D32"])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_matches_reference_forward_and_grad(n, d, temperature):
    g = torch.Generator().manual_seed(n * d)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    a = nt_xent_loss(z1, z2, temperature)
    b = nt_xent_loss_reference(z1, z2, temperature)
    ga = torch.autograd.grad(a, (z1, z2))
    gb = torch.autograd.grad(b, (z1, z2))
    assert abs(a.item() - b.item()) < 1e-10, (a.item(), b.item())
    for x, y in zip(ga, gb):
        assert (x - y).abs().max().item() < 1e-10


def test_nt_xent_prefers_aligned_views():
    z = torch.randn(8, 16)
    assert nt_xent_loss(z, z + 0.01 * torch.randn(8, 16)) < nt_xent_loss(z, torch.randn(8, 16))


def test_augment_is_per_image_in_range_and_seeded():
    x = torch.rand(6, 1, 32, 32)
    aug = GrayscaleAugment(AugmentConfig(blur_prob=0.5))
    a = aug(x, torch.Generator().manual_seed(0))
    b = aug(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    same = aug(x[:1].expand(6, -1, -1, -1).contiguous(), torch.Generator().manual_seed(1))
    assert (same[0] - same[1]).abs().max() > 1e-3  # draws differ between images of one batch
    ident = GrayscaleAugment(AugmentConfig((1.0, 1.0), 0.0, 0.0, 0.0, 0.0))(x)
    torch.testing.assert_close(ident, x, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="gamma"):
        AugmentConfig(gamma=1.0)


def test_augment_gamma_is_a_per_image_power():
    """Gamma jitter alone maps every pixel of image i through y ** g_i with g_i in [1 - gamma, 1 + gamma]."""
    x = torch.rand(5, 1, 16, 16).clamp(0.05, 0.95)
    cfg = AugmentConfig((1.0, 1.0), 0.0, 0.0, 0.0, 0.0, gamma=0.3)
    y = GrayscaleAugment(cfg)(x, torch.Generator().manual_seed(3))
    g = torch.log(y) / torch.log(x)  # one exponent per image
    spread = (g - g.mean(dim=(1, 2, 3), keepdim=True)).abs().max()
    assert spread < 1e-3, spread
    assert ((g.mean(dim=(1, 2, 3)) >= 0.7 - 1e-4) & (g.mean(dim=(1, 2, 3)) <= 1.3 + 1e-4)).all()
    assert g.mean(dim=(1, 2, 3)).std() > 0.01  # drawn per image


def test_moco_momentum_update_and_queue():
    torch.manual_seed(0)
    moco = MoCo(create_encoder("test_resnet"), proj_dim=8, hidden=16, queue_size=10, momentum=0.9)
    before = [p.clone() for p in moco.key_encoder.parameters()]
    with torch.no_grad():
        for p in moco.encoder.parameters():
            p.add_(1.0)
    loss, _ = moco({"image": torch.rand(4, 1, 32, 32)})
    loss.backward()
    for b, pk, pq in zip(before, moco.key_encoder.parameters(), moco.encoder.parameters()):
        torch.testing.assert_close(pk, 0.9 * b + 0.1 * pq.detach())
    assert int(moco.queue_ptr) == 4
    moco({"image": torch.rand(8, 1, 32, 32)})
    assert int(moco.queue_ptr) == 2  # wrapped around the queue of 10
    assert all(p.grad is None for p in moco.key_encoder.parameters())
    assert torch.allclose(moco.queue.norm(dim=1), torch.ones(10), atol=1e-5)


def test_simclr_step_reduces_loss():
    torch.manual_seed(0)
    task = SimCLR(create_encoder("test_convnext"), proj_dim=16, hidden=32)
    x = {"image": torch.rand(8, 1, 32, 32)}
    opt = torch.optim.Adam(task.parameters(), lr=1e-3)
    torch.manual_seed(1)
    first, _ = task(x)
    for _ in range(15):
        opt.zero_grad()
        loss, _ = task(x)
        loss.backward()
        opt.step()
    torch.manual_seed(1)
    last, _ = task(x)
    assert last.item() < first.item()
