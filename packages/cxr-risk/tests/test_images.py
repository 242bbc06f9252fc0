"""PNG, JPEG and TIFF readers: bit depths, polarity, colour handling and bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from dicom_builders import FIXTURES, FIXTURES_MISSING
from PIL import Image

from cxr_risk import ImageReadError, PreprocessConfig, UnsupportedImageError, ViewRejectedError, read_image

RAW = PreprocessConfig(size=None, trim=False)
F32 = float(np.finfo(np.float32).eps)


def test_png_8bit_exact(tmp_path: Path) -> None:
    stored = np.array([[0, 1, 128], [200, 254, 255]], dtype=np.uint8)
    Image.fromarray(stored, mode="L").save(tmp_path / "a.png")
    image, qc = read_image(tmp_path / "a.png", RAW)
    np.testing.assert_allclose(image, stored / 255.0, atol=F32)
    assert (qc.kind, qc.bits_stored, qc.voi_source, qc.inversion_applied) == ("png", 8, "dtype_range", False)


def test_png_16bit_exact(tmp_path: Path) -> None:
    stored = np.array([[0, 1000, 30000], [40000, 65534, 65535]], dtype=np.uint16)
    Image.fromarray(stored).save(tmp_path / "b.png")
    image, qc = read_image(tmp_path / "b.png", RAW)
    np.testing.assert_allclose(image, stored / 65535.0, atol=F32)
    assert qc.bits_stored == 16


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_tiff_exact(tmp_path: Path, dtype: type) -> None:
    top = np.iinfo(dtype).max
    stored = np.array([[0, 7, top // 2], [top - 1, top, 3]], dtype=dtype)
    tifffile.imwrite(tmp_path / "c.tif", stored, photometric="minisblack")
    image, qc = read_image(tmp_path / "c.tif", RAW)
    np.testing.assert_allclose(image, stored / float(top), atol=F32)
    assert qc.kind == "tiff" and not qc.inversion_applied


def test_tiff_min_is_white_inverted(tmp_path: Path) -> None:
    stored = np.array([[0, 65535], [16383, 49151]], dtype=np.uint16)
    tifffile.imwrite(tmp_path / "w.tif", stored, photometric="miniswhite")
    image, qc = read_image(tmp_path / "w.tif", RAW)
    np.testing.assert_allclose(image, 1.0 - stored / 65535.0, atol=F32)
    assert qc.inversion_applied


def test_16bit_container_with_12bit_values_warns(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 4000]], dtype=np.uint16)).save(tmp_path / "d.png")
    _, qc = read_image(tmp_path / "d.png", RAW)
    assert any("percentile" in w for w in qc.warnings)
    image, qc = read_image(tmp_path / "d.png", PreprocessConfig(size=None, trim=False, voi="percentile"))
    assert qc.voi_source == "percentile" and image.max() == 1.0


def test_identical_rgb_channels_accepted(tmp_path: Path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(np.stack([gray] * 3, -1), mode="RGB").save(tmp_path / "e.png")
    image, qc = read_image(tmp_path / "e.png", RAW)
    np.testing.assert_allclose(image, gray / 255.0, atol=F32)
    assert any("identical channels" in w for w in qc.warnings)


def test_colour_png_rejected(tmp_path: Path) -> None:
    rgb = np.zeros((3, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "f.png")
    with pytest.raises(UnsupportedImageError, match="colour"):
        read_image(tmp_path / "f.png", RAW)


def test_jpeg_read(tmp_path: Path) -> None:
    Image.fromarray(np.full((16, 16), 100, np.uint8), mode="L").save(tmp_path / "g.jpg", quality=100)
    image, qc = read_image(tmp_path / "g.jpg", RAW)
    assert qc.kind == "jpeg"
    np.testing.assert_allclose(image, 100 / 255.0, atol=1 / 255.0)


def test_unreadable_png(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageReadError, match=r"bad\.png"):
        read_image(tmp_path / "bad.png", RAW)


def test_truncated_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8), mode="L").save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"t\.png"):
        read_image(tmp_path / "t.png", RAW)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "nope.png", RAW)


def test_png_has_unknown_view(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 4), np.uint8), mode="L").save(tmp_path / "v.png")
    _, qc = read_image(tmp_path / "v.png", PreprocessConfig(size=None, allowed_views=("PA",)))
    assert qc.view is None and any("allow_unknown_view" in w for w in qc.warnings)
    with pytest.raises(ViewRejectedError):
        read_image(
            tmp_path / "v.png", PreprocessConfig(size=None, allowed_views=("PA",), allow_unknown_view=False)
        )


def test_image_key_from_content_not_name(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 4), np.uint8), mode="L").save(tmp_path / "k1.png")
    (tmp_path / "k2.png").write_bytes((tmp_path / "k1.png").read_bytes())
    Image.fromarray(np.ones((4, 4), np.uint8), mode="L").save(tmp_path / "k3.png")
    keys = [read_image(tmp_path / f"k{i}.png", RAW)[1].image_key for i in (1, 2, 3)]
    assert keys[0] == keys[1] != keys[2]


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=FIXTURES_MISSING)
def test_nih_fixture_pngs() -> None:
    for name in ("00000001_000.png", "00027426_000.png"):
        image, qc = read_image(FIXTURES / name, RAW)
        assert qc.bits_stored == 8 and image.ndim == 2 and image.dtype == np.float32
        assert 0.0 <= image.min() < 0.2 and 0.8 < image.max() <= 1.0
