"""Semi-supervised autoencoder: masked BCE, the joint loss's parts, and missing follow-up handled."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cxr_risk.autoencoder import AutoencoderWeights, Decoder, SemiSupervisedAutoencoder, masked_bce
from cxr_risk.backbones import create_encoder
from cxr_risk.survival import SurvivalConfig

torch.set_num_threads(1)


def test_masked_bce_ignores_masked_entries():
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[True, False], [False, True]])
    expected = (F.softplus(-logits[0, 0]) + F.softplus(-logits[1, 1])) / 2
    assert abs(masked_bce(logits, labels, mask).item() - expected.item()) < 1e-6
    # changing a masked label changes nothing; no known label gives exactly 0
    labels2 = labels.clone()
    labels2[0, 1] = 1.0
    assert masked_bce(logits, labels2, mask) == masked_bce(logits, labels, mask)
    assert masked_bce(logits, labels, torch.zeros_like(mask)).item() == 0.0


def batch(n: int = 6, followup: bool = True) -> dict:
    g = torch.Generator().manual_seed(0)
    t = torch.rand(n, generator=g) * 10
    if not followup:
        t[:] = math.nan
    return {
        "image": torch.rand(n, 1, 32, 32, generator=g),
        "labels": torch.randint(0, 2, (n, 3), generator=g).float(),
        "label_mask": torch.rand(n, 3, generator=g) > 0.3,
        "time": t,
        "event": torch.where(torch.isnan(t), t, (torch.rand(n, generator=g) > 0.5).float()),
    }


def test_joint_loss_is_weighted_sum_of_parts():
    torch.manual_seed(0)
    model = SemiSupervisedAutoencoder(
        create_encoder("test_resnet"), 3, SurvivalConfig(horizon=5), AutoencoderWeights(2.0, 0.5, 3.0)
    )
    model.eval()
    loss, logs = model(batch())
    assert abs(loss.item() - (2.0 * logs["rec"] + 0.5 * logs["dx"] + 3.0 * logs["risk"])) < 1e-5


def test_no_followup_gives_zero_risk_term_but_full_graph():
    torch.manual_seed(0)
    model = SemiSupervisedAutoencoder(create_encoder("test_resnet"), 3, SurvivalConfig(horizon=5))
    loss, logs = model(batch(followup=False))
    loss.backward()
    assert logs["risk"] == 0.0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_plain_autoencoder_and_validation():
    model = SemiSupervisedAutoencoder(
        create_encoder("test_resnet"), 0, None, AutoencoderWeights(1.0, 0.0, 0.0)
    )
    _, logs = model({"image": torch.rand(2, 1, 32, 32)})
    assert set(logs) == {"rec"} and model.reconstruct(torch.rand(2, 1, 32, 32)).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="n_labels"):
        SemiSupervisedAutoencoder(create_encoder("test_resnet"), 0, None, AutoencoderWeights(1, 1, 0))
    with pytest.raises(ValueError, match="all weights"):
        AutoencoderWeights(0, 0, 0)
    with pytest.raises(ValueError, match="power of two"):
        Decoder(8, 24)


def test_reconstruction_improves_with_training():
    torch.manual_seed(0)
    model = SemiSupervisedAutoencoder(
        create_encoder("test_convnext"), 0, None, AutoencoderWeights(1.0, 0.0, 0.0)
    )
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    imgs = torch.stack([((yy - 16) ** 2 + (xx - c) ** 2 < 40).float() * 0.8 + 0.1 for c in (8, 16, 24, 12)])[
        :, None
    ]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = model({"image": imgs})[0].item()
    for _ in range(30):
        opt.zero_grad()
        loss, _ = model({"image": imgs})
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
