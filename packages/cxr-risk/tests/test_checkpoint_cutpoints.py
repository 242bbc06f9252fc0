"""Time unit and development-cohort risk cut-points in the checkpoint sidecar: stored, reloaded, optional."""

from __future__ import annotations

import json

import numpy as np
import pytest
from torch import nn

from cxr_risk.checkpoint import Sidecar, load_sidecar, save_checkpoint, store_risk_cutpoints, update_sidecar
from cxr_risk.preprocess import PreprocessConfig
from cxr_risk.survival import SurvivalConfig, quantile_cutpoints


def write(tmp_path, **kwargs) -> Sidecar:
    side = Sidecar.create(
        "risk",
        {"name": "test_resnet", "checkpoint_path": None, "drop_rate": 0.0},
        PreprocessConfig(size=32),
        survival=SurvivalConfig(horizon=8.0).to_dict(),
        **kwargs,
    )
    save_checkpoint(tmp_path, nn.Linear(2, 1), side)
    return side


def test_quantile_cutpoints_round_trip(tmp_path):
    write(tmp_path, time_unit="years")
    prob = np.random.default_rng(0).beta(2.0, 8.0, 333)
    stored = store_risk_cutpoints(tmp_path, prob)
    loaded = load_sidecar(tmp_path)
    assert loaded.risk_cutpoints == stored.risk_cutpoints
    rec = loaded.risk_cutpoints
    assert rec["cutpoints"] == list(quantile_cutpoints(prob)) and rec["n_patients"] == 333
    assert rec["quantiles"] == [0.2, 0.4, 0.6, 0.8] and loaded.time_unit == "years"
    # the fifths of the development cohort fall in each group
    counts = np.bincount(np.searchsorted(rec["cutpoints"], prob, side="right"), minlength=5)
    assert counts.min() >= 66 and counts.max() <= 67
    assert loaded.preprocess_fingerprint == stored.preprocess_fingerprint  # the rest is untouched


def test_old_checkpoint_without_unit_or_cutpoints_loads(tmp_path):
    write(tmp_path)
    raw = json.loads((tmp_path / "model.json").read_text())
    for key in ("time_unit", "risk_cutpoints"):
        raw.pop(key)
    (tmp_path / "model.json").write_text(json.dumps(raw))
    side = load_sidecar(tmp_path)
    assert side.time_unit is None and side.risk_cutpoints is None


def test_bad_unit_and_too_few_predictions_are_refused(tmp_path):
    write(tmp_path)
    with pytest.raises(ValueError, match="time_unit='hours' must be one of years, months, weeks, days"):
        update_sidecar(tmp_path, time_unit="hours")
    assert load_sidecar(tmp_path).time_unit is None  # nothing written
    with pytest.raises(ValueError, match="at least 5 finite probabilities"):
        store_risk_cutpoints(tmp_path, [0.1, 0.2, np.nan, 0.3, 0.4])
