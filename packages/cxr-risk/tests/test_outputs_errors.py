"""predict's key columns and exclusion list, CSV lines through the cohort and the QC report, errors that
speak CLI, training refused without events, synth without the JPEG extra, time unit + cut-points from the API."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxr_risk import Cohort
from cxr_risk.backbones import BackboneConfig
from cxr_risk.cli import main
from cxr_risk.methods import finetune
from cxr_risk.preprocess import PreprocessConfig
from cxr_risk.survival import SurvivalConfig, risk_groups
from cxr_risk.synth import make_cohort
from cxr_risk.trainer import TrainConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
FAST = ["--epochs", "1", "--batch-size", "8", "--no-progress"]


def run(*argv: object) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cxr")
    dev = make_cohort(root / "dev", n=24, seed=21, size=32)
    cache = root / "cache"
    model = finetune(
        Cohort.read(dev),
        root / "ft",
        PreprocessConfig(size=32),
        TrainConfig(epochs=1, batch_size=8, progress=False),
        cache,
        SurvivalConfig(horizon=8),
        backbone=BackboneConfig("test_resnet"),
        time_unit="months",
    )
    return {"root": root, "dev": dev, "cache": cache, "model": model}


def test_api_finetune_records_time_unit_and_development_quintiles(site):
    side = json.loads((site["model"] / "model.json").read_text())
    assert side["time_unit"] == "months"
    rec = side["risk_cutpoints"]
    assert rec["n_patients"] == Cohort.read(site["dev"]).table["patient_id"].nunique()
    assert len(rec["cutpoints"]) == 4 and np.all(np.diff(rec["cutpoints"]) > 0)


def test_cohort_keeps_csv_lines_through_exclusions(tmp_path):
    frame = pd.DataFrame(
        {
            "path": ["a.png", "b.png", "c.png", "d.png"],
            "patient_id": ["1", "1", "2", "3"],
            "study_date": ["2001-01-01", "2003-01-01", "2001-01-01", "2001-01-01"],
            "index_date": ["2002-01-01"] * 4,
        }
    )
    frame.to_csv(tmp_path / "c.csv", index=False)
    cohort = Cohort.read(tmp_path / "c.csv", check_files=False)
    assert cohort.lines.tolist() == [2, 4, 5]  # row 1 is line 4: the image of line 3 was dropped
    assert cohort.excluded["csv_line"].tolist() == [3]
    assert cohort.subset([2]).lines.tolist() == [5]
    frame.assign(csv_line=1).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(ValueError, match="'csv_line' is reserved"):
        Cohort.read(tmp_path / "d.csv", check_files=False)


def _cohort_with_problems(site, tmp_path) -> tuple[Path, pd.DataFrame]:
    frame = pd.read_csv(site["dev"])
    frame["path"] = [str(site["dev"].parent / p) for p in frame["path"]]
    frame["pseudonym"] = [f"ps{i:03d}" for i in range(len(frame))]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    frame.loc[3, "path"] = str(tmp_path / "broken.png")  # line 5
    frame.loc[3, "study_date"] = frame.loc[3, "index_date"]
    # line 9: an image taken after the patient's index date
    frame.loc[7, "study_date"] = str(pd.Timestamp(frame.loc[7, "index_date"]) + pd.Timedelta(days=30))[:10]
    csv = tmp_path / "cohort.csv"
    frame.to_csv(csv, index=False)
    return csv, frame


def test_predict_writes_keys_and_lists_exclusions(site, tmp_path, capsys):
    csv, frame = _cohort_with_problems(site, tmp_path)
    late = pd.to_datetime(frame["study_date"]) > pd.to_datetime(frame["index_date"])
    assert late.any() and not late[3]
    out = tmp_path / "pred.csv"
    assert run("predict", csv, "--model", site["model"], "--out", out, "--cache-dir", site["cache"]) == 0
    err = capsys.readouterr().err
    pred, excl = pd.read_csv(out), pd.read_csv(tmp_path / "pred.excluded.csv")
    n_excluded = int(late.sum()) + 1
    assert f"excluded {n_excluded} image(s)" in err and "line 5:" in err
    assert len(pred) + len(excl) == len(frame)
    assert list(pred.columns[:3]) == ["path", "csv_line", "pseudonym"] and "patient_id" not in pred
    assert "row" not in pred and "patient" not in pred
    # every key joins back to its own CSV line
    for _, r in pred.iterrows():
        src = frame.iloc[int(r["csv_line"]) - 2]
        assert r["path"] == src["path"] and r["pseudonym"] == src["pseudonym"]
    broken = excl[excl["csv_line"] == 5].iloc[0]
    assert broken["path"].endswith("broken.png") and broken["pseudonym"] == "ps003"
    assert set(excl.loc[excl["csv_line"] != 5, "csv_line"]) == set(np.flatnonzero(late) + 2)
    assert excl.loc[excl["csv_line"] != 5, "reason"].eq("image taken after the index date").all()
    # the development-quintile group from the checkpoint's cut-points, beside the fixed CXR-risk group
    cuts = json.loads((site["model"] / "model.json").read_text())["risk_cutpoints"]["cutpoints"]
    assert np.array_equal(pred["group_development"], risk_groups(pred["prob"].to_numpy(), cuts))
    assert np.array_equal(pred["group"], risk_groups(pred["prob"].to_numpy()))


def test_predict_without_cutpoints_has_no_development_group(site, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(site["model"], old)
    raw = json.loads((old / "model.json").read_text())
    raw["risk_cutpoints"] = None
    (old / "model.json").write_text(json.dumps(raw))
    out = tmp_path / "p.csv"
    assert run("predict", site["dev"], "--model", old, "--out", out, "--cache-dir", site["cache"]) == 0
    assert "group_development" not in pd.read_csv(out) and "group" in pd.read_csv(out)
    assert len(pd.read_csv(tmp_path / "p.excluded.csv")) == len(Cohort.read(site["dev"]).excluded)


def test_preprocess_report_names_file_and_line(site, tmp_path, capsys):
    csv, _ = _cohort_with_problems(site, tmp_path)
    report = tmp_path / "qc.csv"
    assert run("preprocess", csv, "--cache-dir", site["cache"], "--size", 32, "--report", report) == 0
    assert "line 5: broken.png: " in capsys.readouterr().err
    rep = pd.read_csv(report)
    bad = rep[rep["error"].notna()]
    assert bad[["csv_line", "file"]].values.tolist() == [[5, "broken.png"]]
    assert bad["reason"].iloc[0] and rep["csv_line"].is_unique


@pytest.mark.parametrize("problem", ["all_censored", "zero_time"])
def test_finetune_without_events_fails_before_training(site, tmp_path, capsys, problem):
    frame = pd.read_csv(site["dev"])
    frame["path"] = [str(site["dev"].parent / p) for p in frame["path"]]
    if problem == "all_censored":
        frame["event"] = 0
        expect = "no events: column 'event' is 0 (censored) in all"
    else:
        frame["time"] = 0.0
        expect = "no usable follow-up: column 'time' is 0 or empty"
    csv = tmp_path / "c.csv"
    frame.to_csv(csv, index=False)
    out = tmp_path / "ft"
    args = ["--out", out, "--cache-dir", tmp_path / "cache", "--size", 32, "--backbone", "test_resnet"]
    code = run("finetune", csv, *args, "--horizon", 0.001 if problem == "zero_time" else 8, *FAST)
    assert code == 2 and expect in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "cache").exists()  # nothing trained, nothing decoded
    with pytest.raises(ValueError, match=re.escape(expect)):
        finetune(
            Cohort.read(csv),
            out,
            PreprocessConfig(size=32),
            TrainConfig(epochs=1, batch_size=8, progress=False),
            tmp_path / "cache",
            SurvivalConfig(horizon=8),
            backbone=BackboneConfig("test_resnet"),
        )
    assert not out.exists()
    if problem == "all_censored":
        assert run("validate", "--model", site["model"], "--cohort", csv, "--out", tmp_path / "r") == 2
        assert expect in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_cli_errors_name_flags_and_csv_headers(site, tmp_path, capsys):
    (tmp_path / "c.csv").write_text("file,pid\na.png,1\n")
    assert run("preprocess", tmp_path / "c.csv", "--cache-dir", tmp_path / "cache") == 2
    err = capsys.readouterr().err
    assert "name that column 'path' in the CSV header" in err and "patient_id" in err
    args = ["--out", tmp_path / "ft", "--cache-dir", site["cache"], "--size", 32, "--backbone", "test_resnet"]
    assert run("finetune", site["dev"], *args, "--batch-size", 0, "--no-progress") == 2
    err = capsys.readouterr().err
    assert "cxr-risk finetune: --batch-size 0 must be >= 1" in err and "batch_size" not in err
    assert run("finetune", site["dev"], *args, "--method", "transfer") == 2
    err = capsys.readouterr().err
    assert "--method transfer needs ImageNet weights" in err and "method=" not in err
    assert run("synth", tmp_path / "s", "--image-size", 8) == 2
    assert "cxr-risk synth: --image-size 8 must be >= 32" in capsys.readouterr().err


def test_synth_without_jpeg_extra_writes_uncompressed(tmp_path, monkeypatch, capsys):
    from pydicom import dcmread
    from pydicom.pixels import get_encoder
    from pydicom.uid import JPEG2000Lossless

    from cxr_risk import read_image
    from cxr_risk.synth import VARIANTS, encode_dicom

    # What pydicom sees without pylibjpeg-openjpeg: a JPEG 2000 encoder with no plugin available.
    monkeypatch.setattr(get_encoder(JPEG2000Lossless), "_available", {})
    with pytest.raises(RuntimeError):  # the old code path: ds.compress raises, mid-cohort
        ds = encode_dicom(np.zeros((32, 32)), "cr_mono2_12bit_linear", "P", "PA")
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    out = tmp_path / "syn"
    assert run("synth", out, "--n", len(VARIANTS), "--image-size", 32) == 0
    err = capsys.readouterr().err
    assert "note:" in err and "JPEG 2000 Image Compression (Lossless Only)" in err and "cxr-risk[jpeg]" in err
    truth = pd.read_csv(out / "truth.csv")
    j2k = truth[truth["variant"] == "dx_mono1_12bit_j2k"].iloc[0]
    assert j2k["transfer_syntax"] == "Explicit VR Little Endian"
    assert dcmread(out / j2k["path"]).file_meta.TransferSyntaxUID.name == "Explicit VR Little Endian"
    rle = truth[truth["variant"] == "cr_mono2_12bit_rle"].iloc[0]
    assert rle["transfer_syntax"] == "RLE Lossless"  # pydicom's own RLE encoder needs no extra
    for path in pd.read_csv(out / "cohort.csv")["path"]:
        read_image(out / path, PreprocessConfig(size=32))
    with pytest.warns(UserWarning, match="written uncompressed"):
        make_cohort(tmp_path / "api", n=2, size=32)


def test_sweep_records_time_unit(tmp_path):
    from cxr_risk.sweep import SweepConfig, run_sweep

    dev = Cohort.read(make_cohort(tmp_path / "dev", n=40, seed=3, size=32))
    config = SweepConfig(
        methods=("scratch",),
        fractions=(1.0,),
        backbone="test_resnet",
        preprocess=PreprocessConfig(size=32),
        survival=SurvivalConfig(horizon=8),
        finetune=TrainConfig(epochs=1, batch_size=8, progress=False),
        finetune_min_steps=1,
        n_boot=5,
        time_unit="months",
    )
    run_sweep(dev, dev, None, tmp_path / "sweep", config, tmp_path / "cache", log=lambda _: None)
    side = json.loads((tmp_path / "sweep" / "finetune" / "scratch-f1-s0" / "model.json").read_text())
    assert side["time_unit"] == "months" and len(side["risk_cutpoints"]["cutpoints"]) == 4
    with pytest.raises(ValueError, match="time_unit='fortnights' must be one of"):
        SweepConfig(methods=("scratch",), time_unit="fortnights")
