"""The synthetic cohort: every reader branch, faithful round trips, and risk that lives in the pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from lifelines.utils import concordance_index

from cxr_risk import Cohort, PreprocessConfig, read_image
from cxr_risk.synth import (
    EXTERNAL_VARIANTS,
    LUNG_CENTERS_X,
    VARIANTS,
    Lesion,
    encode_dicom,
    make_cohort,
    render,
)

RAW = PreprocessConfig(size=None, trim=False)

# Largest error of a round trip display -> file -> read_image, per variant (quantisation of each
# encoding; percentile-windowed and lossy variants are checked by correlation instead).
ROUND_TRIP_TOL = {
    "cr_mono2_12bit_linear": 0.5 / 4095 + 1e-6,
    "cr_mono2_12bit_rle": 0.5 / 4095 + 1e-6,
    "dx_mono1_16bit_rescale_linear_exact_inverse": 1.0 / 60000 + 1e-6,
    "cr_mono2_signed_voi_lut_sequence": 0.012,  # sqrt LUT over 12-bit m = 4095 y^2: worst near 0
    "dx_mono2_12bit_sigmoid": 0.5 / 1200 + 1.1e-3,  # half a step of the logit, plus the 1e-3 clip
    "ext_dx_mono1_10bit_sigmoid": 0.5 / 500 + 1.1e-3,
}
EXPECTED_QC = {
    "cr_mono2_12bit_linear": ("window", False, "Explicit VR Little Endian"),
    "dx_mono1_16bit_rescale_linear_exact_inverse": ("window", True, "Explicit VR Little Endian"),
    "dx_mono2_8bit_percentile": ("percentile", False, "Explicit VR Little Endian"),
    "cr_mono2_signed_voi_lut_sequence": ("voi_lut_sequence", False, "Explicit VR Little Endian"),
    "cr_mono2_12bit_rle": ("window", False, "RLE Lossless"),
    "dx_mono1_12bit_j2k": ("percentile", True, "JPEG 2000 Image Compression (Lossless Only)"),
    "dx_mono2_12bit_sigmoid": ("window", False, "Explicit VR Little Endian"),
    "cr_mono2_8bit_jpeg_baseline": ("percentile", False, "JPEG Baseline (Process 1)"),
    "ext_dx_mono1_10bit_sigmoid": ("window", True, "Explicit VR Little Endian"),
}


@pytest.fixture(scope="module")
def display() -> np.ndarray:
    rng = np.random.default_rng(0)
    return render(48, Lesion(0.1, 0.8, (0.45, 0.32)), 0.5, rng, noise=0.02, border=0.05)


@pytest.mark.parametrize(
    "variant", [v for v in VARIANTS + EXTERNAL_VARIANTS if not v.startswith(("png", "tiff"))]
)
def test_dicom_variant_round_trip(variant: str, display: np.ndarray, tmp_path: Path) -> None:
    ds = encode_dicom(display, variant, "P1", "PA")
    path = tmp_path / "v.dcm"
    ds.save_as(path, enforce_file_format=True)
    image, qc = read_image(path, RAW)
    voi_source, inverted, syntax = EXPECTED_QC[variant]
    assert (qc.voi_source, qc.inversion_applied, qc.transfer_syntax) == (voi_source, inverted, syntax)
    if variant in ROUND_TRIP_TOL:
        expected = display
        if variant == "ext_dx_mono1_10bit_sigmoid":
            # The external site's window cannot reach 0 or 1 within 10 bits: its range is compressed.
            c, w = 512.0, 500.0
            lo, hi = 1 / (1 + np.exp(4 * (1023 - c) / w)), 1 / (1 + np.exp(4 * c / w))
            expected = np.clip(display, lo, 1 - hi)
        err = np.abs(image - expected).max()
        assert err <= ROUND_TRIP_TOL[variant], f"{variant}: max abs err {err:.3g}"
    else:
        assert np.corrcoef(image.ravel(), display.ravel())[0, 1] > 0.98


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    make_cohort(out, n=160, seed=3, size=48)
    return out


def test_every_branch_written_and_readable(cohort_dir: Path) -> None:
    truth = pd.read_csv(cohort_dir / "truth.csv")
    assert set(truth["variant"]) == set(VARIANTS)
    cohort = Cohort.from_csv(cohort_dir / "cohort.csv")
    assert len(cohort.excluded) == int(truth["after_index_date"].sum()) > 0
    seen = set()
    for path in cohort.paths[: 2 * len(VARIANTS)]:
        image, qc = read_image(path, PreprocessConfig(size=32))
        assert image.shape == (32, 32)
        seen.add((qc.kind, qc.modality, qc.bits_stored, qc.photometric))
    assert {
        ("dicom", "CR", 12, "MONOCHROME2"),
        ("dicom", "DX", 16, "MONOCHROME1"),
        ("png", None, 8, "MONOCHROME2"),
    } <= seen
    assert ("tiff", None, 16, "MINISBLACK") in seen


def test_survival_follows_the_known_hazard(cohort_dir: Path) -> None:
    truth = pd.read_csv(cohort_dir / "truth.csv")
    table = pd.read_csv(cohort_dir / "cohort.csv")
    c_true = concordance_index(table["time"], -truth["log_hazard"], table["event"])
    assert c_true > 0.7
    assert 0.2 < table["event"].mean() < 0.8  # censoring present, events present
    nodule = table["label_nodule"]
    assert set(nodule.dropna().unique()) <= {-1.0, 0.0, 1.0} and nodule.isna().any() and (nodule == -1).any()
    known = nodule.isin([0, 1])
    assert np.corrcoef(nodule[known], truth["lesion_radius"][known])[0, 1] > 0.5


def test_pixels_beat_covariates(cohort_dir: Path) -> None:
    """A crude pixel feature (lesion brightness in the lungs) ranks risk better than age does."""
    cohort = Cohort.from_csv(cohort_dir / "cohort.csv")
    yy, xx = np.mgrid[0:48, 0:48] / 48
    lungs = np.zeros((48, 48), bool)
    for cx in LUNG_CENTERS_X:
        lungs |= ((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
    feature = np.array([np.clip(read_image(p, RAW)[0][lungs] - 0.35, 0, None).mean() for p in cohort.paths])
    t, e = cohort.table["time"], cohort.table["event"]
    c_pixels = concordance_index(t, -feature, e)
    c_age = concordance_index(t, -cohort.table["age"], e)
    assert c_pixels > c_age + 0.05, (c_pixels, c_age)


def test_external_site_is_shifted(tmp_path: Path) -> None:
    csv = make_cohort(tmp_path, n=6, seed=1, size=40, shift="external")
    cohort = Cohort.from_frame(pd.read_csv(csv), root=tmp_path)
    for path in cohort.paths:
        ds = pydicom.dcmread(path)
        assert (ds.PhotometricInterpretation, ds.BitsStored, ds.VOILUTFunction) == (
            "MONOCHROME1",
            10,
            "SIGMOID",
        )
        assert read_image(path, RAW)[1].inversion_applied


def test_external_gamma_and_noise_are_the_shift(tmp_path: Path) -> None:
    """Same patients, no noise: the image read back at gamma 1.3 is the gamma-1 image to the power 1.3."""
    base = make_cohort(
        tmp_path / "g1", n=3, seed=2, size=40, shift="external", external_gamma=1.0, external_noise=0.0
    )
    shifted = make_cohort(tmp_path / "g13", n=3, seed=2, size=40, shift="external", external_noise=0.0)
    for rel in pd.read_csv(base)["path"]:
        a, _ = read_image(base.parent / rel, RAW)
        b, _ = read_image(shifted.parent / rel, RAW)
        inside = (a > 0.05) & (a < 0.95)  # away from the sigmoid window's clipped tails
        err = np.abs(b[inside] - a[inside] ** 1.3).max()
        assert err < 0.02, err  # 10-bit sigmoid quantisation
    with pytest.raises(ValueError, match="external_gamma"):
        make_cohort(tmp_path / "bad", n=1, shift="external", external_gamma=0.0)
    with pytest.raises(ValueError, match="external_noise"):
        make_cohort(tmp_path / "bad", n=1, shift="external", external_noise=-0.1)


def test_deterministic(tmp_path: Path) -> None:
    a = pd.read_csv(make_cohort(tmp_path / "a", n=8, seed=5, size=32))
    b = pd.read_csv(make_cohort(tmp_path / "b", n=8, seed=5, size=32))
    pd.testing.assert_frame_equal(a, b)
    img_a, _ = read_image(tmp_path / "a" / a["path"][0], RAW)
    img_b, _ = read_image(tmp_path / "b" / b["path"][0], RAW)
    np.testing.assert_array_equal(img_a, img_b)


def test_arguments_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shift"):
        make_cohort(tmp_path, n=2, shift="other")
    with pytest.raises(ValueError, match="n=0"):
        make_cohort(tmp_path, n=0)


def test_png_and_tiff_copies_match_the_dicom(tmp_path: Path) -> None:
    make_cohort(tmp_path, n=2, seed=4, size=40, copies=True)
    truth = pd.read_csv(tmp_path / "truth.csv")
    row = truth[truth["variant"] == "cr_mono2_12bit_linear"].iloc[0]
    from_dicom, _ = read_image(tmp_path / row["path"], RAW)
    from_tiff, _ = read_image(tmp_path / row["tiff_copy"], RAW)
    from_png, _ = read_image(tmp_path / row["png_copy"], RAW)
    assert np.abs(from_dicom - from_tiff).max() <= 0.5 / 4095 + 0.5 / 65535 + 1e-6
    assert np.abs(from_dicom - from_png).max() <= 0.5 / 4095 + 0.5 / 255 + 1e-6
