"""timm encoders: one channel in, any model name, transfer weights folded from RGB, clear errors."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from cxr_risk.backbones import BackboneConfig, RiskModel, create_encoder
from cxr_risk.survival import SurvivalConfig

torch.set_num_threads(1)


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext", "test_efficientnet"])
@pytest.mark.parametrize("hw", [(32, 32), (48, 40)], ids=["32x32", "48x40"])
def test_cnn_encoder_shapes(name, hw):
    enc = create_encoder(name)
    x = torch.rand(3, 1, *hw)
    fmap = enc.forward_maps(x)
    assert fmap.shape[:2] == (3, enc.num_features)
    assert enc(x).shape == (3, enc.num_features)


def test_vit_encoder_at_its_input_size():
    enc = create_encoder("test_vit")
    size = timm.create_model("test_vit").default_cfg["input_size"][1:]
    assert enc(torch.rand(2, 1, *size)).shape == (2, enc.num_features)


def test_transfer_folds_rgb_stem_and_keeps_grey_response(tmp_path):
    rgb = timm.create_model("test_resnet", in_chans=3).eval()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(path))
    enc = create_encoder("test_resnet", checkpoint_path=path).eval()
    x = torch.rand(2, 1, 32, 32)
    # a grey image replicated to RGB gives the same features in the RGB model
    ref = rgb.forward_features(x.expand(-1, 3, -1, -1))
    torch.testing.assert_close(enc.forward_maps(x), ref, rtol=1e-4, atol=1e-4)


def test_bad_names_and_paths_are_explained(tmp_path):
    with pytest.raises(ValueError, match="not a timm model"):
        BackboneConfig("resnet_does_not_exist")
    with pytest.raises(FileNotFoundError, match="checkpoint_path"):
        BackboneConfig("test_resnet", str(tmp_path / "missing.pth"))
    enc = create_encoder("test_resnet")
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        enc(torch.rand(2, 3, 32, 32))


def test_risk_model_outputs():
    model = RiskModel(
        create_encoder("test_resnet"), SurvivalConfig(kind="logistic_hazard", horizon=5, n_intervals=5)
    )
    out = model.predict(torch.rand(4, 1, 32, 32))
    assert out["out"].shape == (
        4,
        6 if 5.0 not in SurvivalConfig(horizon=5, n_intervals=5).grid().tolist() else 5,
    )
    assert ((out["prob"] >= 0) & (out["prob"] <= 1)).all()
