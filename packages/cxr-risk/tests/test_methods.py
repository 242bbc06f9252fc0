"""Method labels are honest: transfer needs real weights, --init records its method, ssae's survival term."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from cxr_risk import Cohort, PreprocessConfig
from cxr_risk.backbones import WEIGHT_SOURCES, BackboneConfig
from cxr_risk.checkpoint import load_sidecar
from cxr_risk.cli import main
from cxr_risk.methods import finetune, pretrain
from cxr_risk.survival import SurvivalConfig
from cxr_risk.synth import make_cohort
from cxr_risk.trainer import TrainConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
PRE = PreprocessConfig(size=32)
FAST = TrainConfig(epochs=1, batch_size=8, progress=False)
HAS_IMAGENET = WEIGHT_SOURCES["imagenet"]["tf_efficientnet_lite0"].available()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("methods")
    pre = make_cohort(root / "pre", n=16, seed=21, size=32)
    no_fu = root / "pre" / "no_followup.csv"
    pd.read_csv(pre).drop(columns=["time", "event"]).to_csv(no_fu, index=False)
    return {
        "root": root,
        "pre": pre,
        "pre_no_followup": no_fu,
        "dev": make_cohort(root / "dev", n=24, seed=22, size=32),
        "cache": root / "cache",
    }


def _cohort(path: Path) -> Cohort:
    return Cohort.read(path, check_files=False)


def test_transfer_without_weights_is_an_error(site):
    with pytest.raises(ValueError, match=r"pip install cxr-risk\[imagenet\].*checkpoint_path"):
        finetune(
            _cohort(site["dev"]),
            site["root"] / "t",
            PRE,
            FAST,
            site["cache"],
            SurvivalConfig(),
            backbone=BackboneConfig("test_resnet"),
            method="transfer",
        )
    assert not (site["root"] / "t" / "model.json").exists()
    with pytest.raises(ValueError, match="pretraining method"):
        finetune(
            _cohort(site["dev"]), site["root"] / "t2", PRE, FAST, site["cache"], SurvivalConfig(),
            backbone=BackboneConfig("test_resnet"), method="ssae",
        )  # fmt: skip


@pytest.mark.parametrize("followup", [True, False], ids=["with-followup", "no-followup"])
def test_ssae_survival_term_follows_the_cohort(site, followup):
    out = site["root"] / f"ssae-{followup}"
    pretrain(
        "ssae",
        _cohort(site["pre"] if followup else site["pre_no_followup"]),
        out,
        BackboneConfig("test_resnet"),
        PRE,
        FAST,
        site["cache"],
    )
    side = load_sidecar(out)
    assert side.extra["survival_term"] is followup
    assert (side.survival is not None) is followup


def test_init_records_the_checkpoint_method_and_refuses_a_contradiction(site, capsys):
    pre_ck = site["root"] / "pre_ae"
    pretrain(
        "autoencoder", _cohort(site["pre"]), pre_ck, BackboneConfig("test_resnet"), PRE, FAST, site["cache"]
    )
    out = site["root"] / "ft_ae"
    argv = ["finetune", site["dev"], "--out", out, "--cache-dir", site["cache"], "--init", pre_ck]
    argv += ["--epochs", "1", "--batch-size", "8", "--no-progress", "--horizon", "8"]
    assert main([str(a) for a in argv]) == 0
    assert load_sidecar(out).extra["method"] == "autoencoder"  # it recorded "scratch" before
    with pytest.raises(ValueError, match="contradicts --init"):
        finetune(
            _cohort(site["dev"]), site["root"] / "ft_bad", None, FAST, site["cache"], SurvivalConfig(),
            init=pre_ck, method="scratch",
        )  # fmt: skip
    scratch = site["root"] / "ft_scratch"
    finetune(
        _cohort(site["dev"]), scratch, PRE, FAST, site["cache"], SurvivalConfig(), backbone=BackboneConfig("test_resnet")
    )  # fmt: skip
    side = load_sidecar(scratch)
    assert side.extra["method"] == "scratch" and side.extra["init_weights"] is None


@pytest.mark.skipif(not HAS_IMAGENET, reason="needs the cxr-risk[imagenet] extra")
def test_transfer_with_imagenet_weights_records_its_source_and_predicts_without_them(site, monkeypatch):
    from cxr_risk import backbones
    from cxr_risk.predict import load_risk_model

    out = site["root"] / "ft_imagenet"
    finetune(
        _cohort(site["dev"]), out, PRE, FAST, site["cache"], SurvivalConfig(),
        backbone=BackboneConfig("tf_efficientnet_lite0", weights="imagenet"),
    )  # fmt: skip
    side = load_sidecar(out)
    assert side.extra["method"] == "transfer"
    assert side.extra["init_weights"]["file"] == "efficientnet-lite0-57934424.pth"
    assert side.backbone["weights"] is None and side.backbone["input_mean"] == [0.5, 0.5, 0.5]
    # loading the fine-tuned model never reads the ImageNet file
    monkeypatch.setattr(backbones, "load_named_weights", lambda *a, **k: pytest.fail("weights were loaded"))
    model, _ = load_risk_model(out)
    assert model.encoder.config.rgb_input
