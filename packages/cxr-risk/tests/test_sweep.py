"""Sweep configuration, fine-tuning budget for small fractions, and the label-efficiency plot.

The sweep itself runs end to end in tests/test_commands.py::test_sweep_command.
"""

from __future__ import annotations

import pandas as pd
import pytest

from cxr_risk.sweep import SweepConfig, _finetune_config, plot_label_efficiency
from cxr_risk.trainer import TrainConfig


def test_config_validates():
    with pytest.raises(ValueError, match="unknown methods"):
        SweepConfig(methods=("scratch", "dino"))
    with pytest.raises(ValueError, match="fractions"):
        SweepConfig(fractions=(0.0, 1.0))


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
