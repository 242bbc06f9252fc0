"""Every model command end to end on a tiny synthetic cohort (in-process, CPU, 32 px, test_resnet)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxr_risk.cli import main
from cxr_risk.methods import FINETUNE_AUGMENT
from cxr_risk.synth import make_cohort

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
BACKBONE = ["--backbone", "test_resnet"]
FAST = ["--epochs", "1", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cxr")
    return {
        "root": root,
        "pre": make_cohort(root / "pre", n=24, seed=11, size=32),
        "dev": make_cohort(root / "dev", n=40, seed=12, size=32),
        "ext": make_cohort(root / "ext", n=16, seed=13, size=32, shift="external"),
        "cache": root / "cache",
    }


def run(*argv: object) -> int:
    return main([str(a) for a in argv])


@pytest.mark.parametrize("method", ["simclr", "moco", "autoencoder", "ssae"])
def test_pretrain_each_method(site, method):
    out = site["root"] / "pre_ck" / method
    extra = ["--followup-cohort", site["dev"], "--horizon", "8"] if method == "ssae" else []
    assert (
        run(
            "pretrain",
            site["pre"],
            "--method",
            method,
            "--out",
            out,
            "--cache-dir",
            site["cache"],
            "--size",
            32,
            *BACKBONE,
            *FAST,
            *extra,
        )
        == 0
    )
    side = json.loads((out / "model.json").read_text())
    assert side["kind"] == method and side["input_size"] == [32, 32]
    assert side["labels"] == ["label_nodule", "label_opacity", "label_cardiomegaly"]
    assert (out / "model.safetensors").is_file() and (out / "log.csv").is_file()


@pytest.fixture(scope="module")
def finetuned(site) -> Path:
    pre = site["root"] / "pre_ssae_for_ft"
    assert (
        run(
            "pretrain",
            site["pre"],
            "--method",
            "ssae",
            "--out",
            pre,
            "--cache-dir",
            site["cache"],
            "--size",
            32,
            *BACKBONE,
            *FAST,
        )
        == 0
    )
    out = site["root"] / "ft"
    assert (
        run(
            "finetune",
            site["dev"],
            "--init",
            pre,
            "--out",
            out,
            "--cache-dir",
            site["cache"],
            "--horizon",
            8,
            "--epochs",
            2,
            "--batch-size",
            8,
            "--no-progress",
        )
        == 0
    )
    return out


def test_finetune_from_pretraining_keeps_its_contract(site, finetuned):
    side = json.loads((finetuned / "model.json").read_text())
    pre = json.loads((site["root"] / "pre_ssae_for_ft" / "model.json").read_text())
    assert side["kind"] == "risk" and side["preprocess_fingerprint"] == pre["preprocess_fingerprint"]
    assert side["extra"]["init"]["kind"] == "ssae" and side["survival"]["horizon"] == 8
    # asking for other preprocessing than the pretrained encoder's is refused
    assert (
        run(
            "finetune",
            site["dev"],
            "--init",
            site["root"] / "pre_ssae_for_ft",
            "--out",
            site["root"] / "bad",
            "--cache-dir",
            site["cache"],
            "--size",
            48,
            *FAST,
        )
        == 2
    )


def test_transfer_from_local_three_channel_weights(site, tmp_path):
    import timm
    from safetensors.torch import save_file

    rgb = timm.create_model("test_resnet", in_chans=3)
    weights = tmp_path / "imagenet.safetensors"
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(weights))
    out = tmp_path / "transfer"
    assert (
        run(
            "finetune",
            site["dev"],
            "--out",
            out,
            "--cache-dir",
            site["cache"],
            "--size",
            32,
            *BACKBONE,
            "--checkpoint-path",
            weights,
            "--method",
            "transfer",
            "--head",
            "logistic_hazard",
            "--horizon",
            8,
            "--epochs",
            1,
            "--batch-size",
            8,
            "--lr",
            "1e-9",
            "--no-progress",
        )
        == 0
    )
    from cxr_risk.checkpoint import load_state

    stem = load_state(out)["model.encoder.body.conv1.0.weight"]
    # lr ~ 0: the stem is still ImageNet's, folded from RGB to grey by summing channels
    torch.testing.assert_close(
        stem, rgb.state_dict()["conv1.0.weight"].sum(1, keepdim=True), rtol=1e-5, atol=1e-6
    )


def test_predict_reload_gives_identical_risks(site, finetuned, tmp_path):
    from cxr_risk import Cohort
    from cxr_risk.predict import load_risk_model, predict_cohort

    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert run("predict", site["ext"], "--model", finetuned, "--out", a, "--cache-dir", site["cache"]) == 0
    assert run("predict", site["ext"], "--model", finetuned, "--out", b) == 0  # cold path, no cache
    pa, pb = pd.read_csv(a), pd.read_csv(b)
    assert np.array_equal(pa["risk"].to_numpy(), pb["risk"].to_numpy())
    model, side = load_risk_model(finetuned)
    direct = predict_cohort(model, side, Cohort.read(site["ext"], check_files=False), site["cache"])
    assert np.allclose(pa["risk"].to_numpy(), direct["risk"].to_numpy(), rtol=0, atol=1e-6)
    # keys to join back (CSV line, path), never patient identifiers; both risk-group scales
    assert set(pa.columns) == {
        "path",
        "csv_line",
        "risk",
        "prob",
        "group",
        "group_development",
        "time",
        "event",
    }
    assert pa["prob"].between(0, 1).all() and pa["group"].between(0, 4).all()
    # the same images given as files give the same risks as through the cohort and its cache
    cohort = Cohort.read(site["ext"], check_files=False)
    files = cohort.paths[:3]
    c = tmp_path / "c.csv"
    assert run("predict", *files, "--model", finetuned, "--out", c) == 0
    pc = pd.read_csv(c)
    assert np.allclose(pc["risk"].to_numpy(), pa["risk"].to_numpy()[:3], rtol=0, atol=1e-6)


def test_predict_refuses_other_preprocessing(site, finetuned, tmp_path, capsys):
    assert run("predict", site["ext"], "--model", finetuned, "--out", tmp_path / "x.csv", "--size", 64) == 2
    assert "--size [64, 64] (model needs [32, 32])" in capsys.readouterr().err


def test_validate_writes_report(site, finetuned, tmp_path):
    out = tmp_path / "report"
    assert (
        run(
            "validate",
            "--model",
            finetuned,
            "--cohort",
            site["ext"],
            "--out",
            out,
            "--n-boot",
            20,
            "--cutpoints",
            "quantiles",
        )
        == 0
    )
    rep = json.loads((out / "report.json").read_text())
    for key in (
        "harrell_c",
        "uno_c",
        "time_dependent_auc",
        "brier_at_horizon",
        "integrated_brier",
        "calibration",
        "risk_groups",
        "logrank",
    ):
        assert key in rep, key
    assert 0 <= rep["harrell_c"]["estimate"] <= 1 and rep["horizon"] == 8
    assert len(rep["risk_groups"]) == 5 and rep["cutpoint_source"] == "quantiles"
    for png in ("km.png", "calibration.png", "auc.png"):
        assert (out / png).stat().st_size > 1000
    text = (out / "report.md").read_text()
    assert "Harrell's C" in text and "horizon 8 years" in text and rep["time_unit"] == "years"
    names = [s["name"] for s in rep["stratifications"]]
    assert names == ["validated-cohort quintiles", "CXR-risk", "development quantiles"]
    assert all(s["available"] for s in rep["stratifications"])
    side = json.loads((finetuned / "model.json").read_text())
    assert rep["stratifications"][2]["cutpoints"] == side["risk_cutpoints"]["cutpoints"]
    assert "## Risk groups: development quantiles" in text


def test_finetune_records_time_unit_and_development_cutpoints(site, finetuned):
    side = json.loads((finetuned / "model.json").read_text())
    assert side["time_unit"] == "years"
    rec = side["risk_cutpoints"]
    n_patients = pd.read_csv(site["dev"])["patient_id"].nunique()
    assert rec["n_patients"] == n_patients and rec["quantiles"] == [0.2, 0.4, 0.6, 0.8]
    assert len(rec["cutpoints"]) == 4 and np.all(np.diff(rec["cutpoints"]) > 0)


def test_horizon_beyond_follow_up_names_the_flag_and_column(site, finetuned, tmp_path, capsys):
    longest = pd.read_csv(site["ext"])["time"].max()
    args = ["--model", finetuned, "--cohort", site["ext"], "--out", tmp_path / "r", "--n-boot", 5]
    assert run("validate", *args, "--horizon", 50) == 2
    err = capsys.readouterr().err
    assert "cxr-risk validate: --horizon 50 years is beyond the longest follow-up in column 'time'" in err
    assert f"{longest:.4g} years" in err and not (tmp_path / "r").exists()
    # the same check before training, so that no time is spent on a model whose horizon is unobserved
    ft = ["finetune", site["dev"], "--out", tmp_path / "ft", "--cache-dir", site["cache"], "--size", 32]
    assert run(*ft, *BACKBONE, *FAST, "--horizon", 40, "--time-unit", "months") == 2
    assert "--horizon 40 months is beyond" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()
    # a validation cohort in another unit than the model's is refused
    assert run("validate", *args, "--time-unit", "days") == 2
    assert "differs from the model's time unit (years)" in capsys.readouterr().err


def test_validate_old_checkpoint_without_unit_or_cutpoints(site, finetuned, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(finetuned, old)
    raw = json.loads((old / "model.json").read_text())
    raw.pop("time_unit"), raw.pop("risk_cutpoints")
    (old / "model.json").write_text(json.dumps(raw))
    out = tmp_path / "report"
    assert run("validate", "--model", old, "--cohort", site["ext"], "--out", out, "--n-boot", 5) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["time_unit"] is None
    dev = rep["stratifications"][1]
    assert dev["name"] == "development quantiles" and not dev["available"] and "unavailable" in dev["note"]
    text = (out / "report.md").read_text()
    assert "unit not recorded" in text and "re-run finetune" in text


def test_explain_writes_overlay(site, finetuned, tmp_path):
    from cxr_risk import Cohort

    image = Cohort.read(site["ext"], check_files=False).paths[0]
    out = tmp_path / "cam.png"
    assert run("explain", image, "--model", finetuned, "--out", out) == 0
    assert out.stat().st_size > 1000


def test_sweep_command(site, tmp_path):
    out = tmp_path / "sweep"
    assert (
        run(
            "sweep",
            "--pretrain-cohort",
            site["pre"],
            "--dev-cohort",
            site["dev"],
            "--external-cohort",
            site["ext"],
            "--out",
            out,
            "--cache-dir",
            site["cache"],
            "--methods",
            "scratch,autoencoder",
            "--fractions",
            "0.5,1",
            "--size",
            32,
            *BACKBONE,
            "--pretrain-epochs",
            1,
            "--epochs",
            1,
            "--min-steps",
            2,
            "--batch-size",
            8,
            "--n-boot",
            10,
            "--horizon",
            8,
            "--seeds",
            "0,1",
            "--augment",
            "--no-progress",
        )
        == 0
    )
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 2 * 2 * 2 * 2  # methods x fractions x seeds x test cohorts
    assert sorted(set(table["seed"])) == [0, 1]
    side = json.loads((out / "finetune" / "autoencoder-f0.5-s1" / "model.json").read_text())
    assert side["extra"]["augment"]["gamma"] == FINETUNE_AUGMENT.gamma  # --augment reached every fine-tune
    assert set(table["test_cohort"]) == {"internal", "external"}
    small = table[table["fraction"] == 0.5]["n_train_patients"].iloc[0]
    assert small < table[table["fraction"] == 1.0]["n_train_patients"].iloc[0]
    assert (out / "label_efficiency.png").stat().st_size > 1000
