"""QC records, image keys, the preprocessing config's validation and fingerprint, and batch mode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dicom_builders import make_ds, write
from PIL import Image

from cxr_risk import ImageReadError, PreprocessConfig, QCRecord, image_key, read_images


def test_image_key_stable_and_distinct() -> None:
    assert image_key("1.2.3") == image_key("1.2.3")
    assert image_key("1.2.3") != image_key("1.2.4")
    assert len(image_key("1.2.3")) == 32 and "1.2.3" not in image_key("1.2.3")


def test_qc_roundtrip_json() -> None:
    qc = QCRecord(path="a.dcm", kind="dicom", window=(1.0, 2.0), output_shape=(4, 5), warnings=["x"])
    data = json.loads(json.dumps(qc.to_dict()))
    assert QCRecord.from_dict(data) == qc
    assert "path" not in qc.to_dict(include_path=False)


def test_config_fingerprint_stable_and_sensitive() -> None:
    a = PreprocessConfig(size=256, mm_per_pixel=0.4, allowed_views=("pa", "AP"))
    b = PreprocessConfig(size=(256, 256), mm_per_pixel=0.4, allowed_views=("PA", "AP"))
    assert a == b and a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != PreprocessConfig(size=255, mm_per_pixel=0.4).fingerprint()
    assert PreprocessConfig().fingerprint() == PreprocessConfig().fingerprint()
    assert len(a.fingerprint()) == 16


def test_config_dict_roundtrip() -> None:
    cfg = PreprocessConfig(size=(128, 96), fit="crop", allowed_views=("PA",), percentile_window=(1, 99))
    data = json.loads(json.dumps(cfg.to_dict()))
    assert PreprocessConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        PreprocessConfig.from_dict({**data, "bogus": 1})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 0}, "size"),
        ({"size": (1, 2, 3)}, "size"),
        ({"fit": "zoom"}, "fit"),
        ({"mm_per_pixel": 0.0}, "mm_per_pixel"),
        ({"allowed_views": "PA"}, "allowed_views"),
        ({"voi": "window"}, "voi"),
        ({"percentile_window": (50, 10)}, "percentile_window"),
        ({"trim_max_fraction": 0.5}, "trim_max_fraction"),
    ],
)
def test_config_validation_names_the_argument(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PreprocessConfig(**kwargs)


def test_batch_mode_reports_and_skips(tmp_path: Path) -> None:
    good = write(make_ds(np.arange(16, dtype=np.uint16).reshape(4, 4)), tmp_path / "good.dcm")
    ct = write(make_ds(np.zeros((4, 4)), modality="CT"), tmp_path / "ct.dcm")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((4, 4), np.uint8), mode="L").save(tmp_path / "ok.png")
    items = list(read_images([good, ct, tmp_path / "bad.png", tmp_path / "missing.dcm", tmp_path / "ok.png"]))
    assert [i.error is None for i in items] == [True, False, False, False, True]
    assert all(isinstance(i.error, ImageReadError) for i in items if i.error is not None)
    assert "CT" in items[1].error.reason and "missing.dcm" in str(items[3].error)
