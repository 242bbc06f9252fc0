"""Trim, resampling to mm per pixel, and fitting to a fixed output size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dicom_builders import make_ds, write

from cxr_risk import PreprocessConfig, read_image
from cxr_risk.geometry import fit, resample_to_spacing, resize, trim_box


def textured(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 0.8, (rows, cols)).astype(np.float32)


def test_trim_box_finds_flat_borders() -> None:
    img = np.zeros((40, 50), np.float32)
    img[3:35, 7:44] = textured(32, 37)
    assert trim_box(img, threshold=0.01, max_fraction=0.25) == (3, 35, 7, 44)


def test_trim_box_is_capped() -> None:
    img = np.zeros((40, 40), np.float32)
    img[18:22, 18:22] = textured(4, 4)
    assert trim_box(img, threshold=0.01, max_fraction=0.25) == (10, 30, 10, 30)


def test_trim_keeps_textured_image() -> None:
    img = textured(13, 17)
    assert trim_box(img, 0.01, 0.25) == (0, 13, 0, 17)


def test_resize_constant_is_exact_and_in_range() -> None:
    out = resize(np.full((37, 53), 0.625, np.float32), (16, 24))
    assert out.shape == (16, 24) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.625, atol=1e-6)
    noisy = resize(textured(64, 64), (17, 9))
    assert 0.2 - 1e-6 <= noisy.min() and noisy.max() <= 0.8 + 1e-6


@pytest.mark.parametrize(
    ("spacing", "target", "shape"), [((0.2, 0.2), 0.4, (50, 60)), ((0.1, 0.2), 0.2, (50, 120))]
)
def test_resample_to_spacing_shapes(
    spacing: tuple[float, float], target: float, shape: tuple[int, int]
) -> None:
    assert resample_to_spacing(textured(100, 120), spacing, target).shape == shape


def test_fit_pad_letterboxes_with_zeros() -> None:
    out = fit(np.full((20, 40), 0.5, np.float32), (32, 32), "pad")
    assert out.shape == (32, 32)
    np.testing.assert_array_equal(out[:8], 0.0)
    np.testing.assert_array_equal(out[24:], 0.0)
    np.testing.assert_allclose(out[8:24], 0.5, atol=1e-6)


def test_fit_crop_fills() -> None:
    out = fit(np.full((20, 40), 0.5, np.float32), (32, 32), "crop")
    assert out.shape == (32, 32)
    np.testing.assert_allclose(out, 0.5, atol=1e-6)


def test_fit_crop_keeps_centre() -> None:
    img = np.zeros((10, 30), np.float32)
    img[:, 10:20] = 1.0  # the centre third
    out = fit(img, (10, 10), "crop")
    np.testing.assert_allclose(out, 1.0, atol=1e-6)


@pytest.mark.parametrize("mode", ["pad", "crop", "stretch"])
@pytest.mark.parametrize("size", [(31, 47), (64, 64)], ids=["31x47", "64x64"])
def test_fit_shapes(mode: str, size: tuple[int, int]) -> None:
    out = fit(textured(45, 29), size, mode)
    assert out.shape == size and out.dtype == np.float32


def test_read_image_geometry_end_to_end(tmp_path: Path) -> None:
    stored = np.zeros((60, 80), np.uint16)
    stored[5:55, 10:70] = np.random.default_rng(1).integers(500, 3500, (50, 60))
    ds = make_ds(stored, PixelSpacing=[0.2, 0.2], WindowCenter=2048, WindowWidth=4096)
    path = write(ds, tmp_path / "g.dcm")
    image, qc = read_image(path, PreprocessConfig(size=32, mm_per_pixel=0.4))
    assert image.shape == (32, 32) and qc.output_shape == (32, 32)
    assert qc.trim_box == (5, 55, 10, 70)
    # 50x60 px at 0.2 mm -> 25x30 at 0.4 mm -> scaled by 32/30 to 27x32 -> rows 2..28 of 32.
    assert (image[:2] == 0).all() and (image[29:] == 0).all() and (image[2:29] > 0).all()
    image2, qc2 = read_image(path, PreprocessConfig(size=None, trim=False))
    assert image2.shape == (60, 80) and qc2.trim_box is None


def test_mm_per_pixel_without_spacing_warns(tmp_path: Path) -> None:
    path = write(make_ds(np.arange(64, dtype=np.uint16).reshape(8, 8)), tmp_path / "n.dcm")
    image, qc = read_image(path, PreprocessConfig(size=None, trim=False, mm_per_pixel=0.5))
    assert image.shape == (8, 8) and any("spacing is unknown" in w for w in qc.warnings)
