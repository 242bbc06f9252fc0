"""The DICOM pipeline, one branch at a time, with exact expected values on tiny synthetic files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_builders import FIXTURES, FIXTURES_MISSING, make_ds, write
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import JPEG2000Lossless, RLELossless

from cxr_risk import (
    ImageReadError,
    MissingDecoderError,
    PreprocessConfig,
    UnsupportedImageError,
    ViewRejectedError,
    read_image,
)
from cxr_risk import dicom as dcm
from cxr_risk.qc import QCRecord

RAW = PreprocessConfig(size=None, trim=False)  # intensity pipeline only


def assert_close(actual: np.ndarray, expected: np.ndarray, tol: float) -> None:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    err = np.abs(actual - expected)
    rel = err / np.maximum(np.abs(expected), 1e-12)
    assert err.max() <= tol, (
        f"max abs err {err.max():.3g} (rel {rel.max():.3g}) > {tol:.3g}\n{actual}\n{expected}"
    )


F32 = float(np.finfo(np.float32).eps)


# --------------------------------------------------------------------------------------- decode
def test_decode_masks_unused_high_bits_unsigned(tmp_path: Path) -> None:
    stored = np.array([[0, 1, 2047], [2048, 4095, 7]], dtype=np.uint16)
    dirty = stored | np.uint16(0xF000)  # garbage above BitsStored=12
    path = write(make_ds(stored, raw=dirty), tmp_path / "a.dcm")
    np.testing.assert_array_equal(dcm.decode(pydicom.dcmread(path)), stored)


def test_decode_sign_extends_two_complement(tmp_path: Path) -> None:
    raw = np.array([[0x0FFF, 0x0801], [0x07FF, 0x1005]], dtype=np.uint16)
    ds = make_ds(np.zeros((2, 2)), signed=True, raw=raw)
    path = write(ds, tmp_path / "s.dcm")
    np.testing.assert_array_equal(dcm.decode(pydicom.dcmread(path)), [[-1, -2047], [2047, 5]])


def test_decode_8bit(tmp_path: Path) -> None:
    stored = np.array([[0, 128, 255]], dtype=np.uint8)
    path = write(make_ds(stored, bits_allocated=8, bits_stored=8), tmp_path / "b.dcm")
    np.testing.assert_array_equal(dcm.decode(pydicom.dcmread(path)), stored)


# ---------------------------------------------------------------------------------- modality LUT
def test_modality_rescale_exact() -> None:
    ds = make_ds(np.zeros((1, 3)), RescaleSlope=2, RescaleIntercept=-1000)
    out, source = dcm.modality_lut(np.array([[0, 500, 4095]]), ds)
    assert source == "rescale"
    np.testing.assert_array_equal(out, [[-1000.0, 0.0, 7190.0]])


def test_modality_lut_sequence_exact() -> None:
    item = Dataset()
    item.LUTDescriptor = [4, 2, 16]  # 4 entries, first input value 2
    item.add_new(0x00283006, "US", [10, 20, 30, 40])
    item.ModalityLUTType = "US"
    ds = make_ds(np.zeros((1, 6)), ModalityLUTSequence=DicomSequence([item]))
    out, source = dcm.modality_lut(np.array([[0, 2, 3, 4, 5, 9]], dtype=np.uint16), ds)
    assert source == "sequence"
    np.testing.assert_array_equal(out, [[10, 10, 20, 30, 40, 40]])


def test_modality_identity_without_attributes() -> None:
    out, source = dcm.modality_lut(np.array([[3, 4]], dtype=np.uint16), make_ds(np.zeros((1, 2))))
    assert source == "none" and out.dtype == np.float64
    np.testing.assert_array_equal(out, [[3.0, 4.0]])


# --------------------------------------------------------------------------------------------- VOI
def test_window_linear_formula_values() -> None:
    # PS3.3 C.11.2.1.2.1 with c=100, w=11: below 94.5 -> 0, above 104.5 -> 1, else ((x-99.5)/10 + 0.5).
    x = np.array([94.0, 94.5, 95.0, 100.0, 104.0, 104.5, 105.0])
    np.testing.assert_allclose(dcm.window_linear(x, 100, 11), [0, 0, 0.05, 0.55, 0.95, 1.0, 1.0], atol=1e-15)


def test_window_linear_full_range_is_x_over_max() -> None:
    x = np.arange(4096, dtype=np.float64)
    np.testing.assert_allclose(dcm.window_linear(x, 2048, 4096), x / 4095, atol=1e-15)


def test_window_linear_exact_values() -> None:
    x = np.array([95.0, 96.0, 100.0, 105.0, 106.0])
    np.testing.assert_allclose(dcm.window_linear_exact(x, 100, 10), [0, 0.1, 0.5, 1.0, 1.0], atol=1e-15)


def test_window_sigmoid_values() -> None:
    x = np.array([100.0, 102.0, 98.0])
    expected = [0.5, 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))]
    np.testing.assert_allclose(dcm.window_sigmoid(x, 100, 8), expected, rtol=1e-15)


def _voi(x: np.ndarray, ds: Dataset, config: PreprocessConfig = RAW) -> tuple[np.ndarray, QCRecord]:
    qc = QCRecord(path="x", kind="dicom")
    return dcm.voi(np.asarray(x, np.float64), ds, config, qc), qc


def test_voi_uses_window_and_function_from_header() -> None:
    ds = make_ds(np.zeros((1, 1)), WindowCenter=100, WindowWidth=10, VOILUTFunction="LINEAR_EXACT")
    y, qc = _voi([[96.0, 100.0]], ds)
    np.testing.assert_allclose(y, [[0.1, 0.5]], atol=1e-15)
    assert (qc.voi_source, qc.voi_function, qc.window) == ("window", "LINEAR_EXACT", (100.0, 10.0))


def test_voi_multi_valued_window_picks_voi_index() -> None:
    ds = make_ds(
        np.zeros((1, 1)), WindowCenter=[100, 50], WindowWidth=[10, 20], VOILUTFunction="LINEAR_EXACT"
    )
    y, qc = _voi([[50.0]], ds, PreprocessConfig(size=None, voi_index=1))
    np.testing.assert_allclose(y, [[0.5]])
    assert qc.window == (50.0, 20.0)


def test_voi_lut_sequence_scaled_by_lut_range() -> None:
    item = Dataset()
    item.LUTDescriptor = [4, 10, 8]
    item.add_new(0x00283006, "US", [0, 50, 100, 200])
    ds = make_ds(np.zeros((1, 1)), VOILUTSequence=DicomSequence([item]), WindowCenter=0, WindowWidth=1)
    y, qc = _voi([[9.0, 10.0, 11.0, 12.0, 13.0, 14.0]], ds)
    np.testing.assert_allclose(y, [[0, 0, 0.25, 0.5, 1.0, 1.0]], atol=1e-15)
    assert qc.voi_source == "voi_lut_sequence"  # the LUT wins over the window


def test_voi_percentile_window_when_no_voi_attributes() -> None:
    x = np.arange(1001, dtype=np.float64)[None]  # 0.5th and 99.5th percentiles are 5 and 995
    y, qc = _voi(x, make_ds(np.zeros((1, 1))))
    assert qc.voi_source == "percentile" and qc.window == (5.0, 995.0)
    np.testing.assert_allclose(y[0, [0, 5, 500, 995, 1000]], [0, 0, 0.5, 1, 1], atol=1e-15)


def test_voi_percentile_mode_ignores_header_window() -> None:
    ds = make_ds(np.zeros((1, 1)), WindowCenter=100, WindowWidth=10)
    _, qc = _voi(np.arange(1001.0)[None], ds, PreprocessConfig(size=None, voi="percentile"))
    assert qc.voi_source == "percentile"


def test_voi_invalid_width_falls_back_with_warning() -> None:
    ds = make_ds(np.zeros((1, 1)), WindowCenter=100, WindowWidth=0)
    _, qc = _voi(np.arange(1001.0)[None], ds)
    assert qc.voi_source == "percentile" and any("WindowWidth" in w for w in qc.warnings)


# ---------------------------------------------------------------------------------------- polarity
@pytest.mark.parametrize(
    ("photometric", "shape", "inverted", "warns"),
    [
        ("MONOCHROME2", None, False, False),
        ("MONOCHROME1", None, True, False),
        ("MONOCHROME1", "INVERSE", True, False),
        ("MONOCHROME2", "INVERSE", True, True),
        ("MONOCHROME1", "IDENTITY", True, True),
        ("MONOCHROME2", "IDENTITY", False, False),
    ],
)
def test_polarity(photometric: str, shape: str | None, inverted: bool, warns: bool) -> None:
    attrs = {"PresentationLUTShape": shape} if shape else {}
    ds = make_ds(np.zeros((1, 1)), photometric=photometric, **attrs)
    qc = QCRecord(path="x", kind="dicom")
    y = np.array([[0.0, 0.25, 1.0]])
    out = dcm.polarity(y, ds, qc)
    np.testing.assert_array_equal(out, 1 - y if inverted else y)
    assert qc.inversion_applied is inverted and bool(qc.warnings) is warns


# ------------------------------------------------------------------------------------ end to end
def test_end_to_end_rescale_window_monochrome1(tmp_path: Path) -> None:
    stored = np.array([[500, 1000], [15500, 30500]], dtype=np.uint16)
    ds = make_ds(
        stored,
        bits_stored=16,
        photometric="MONOCHROME1",
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=30000,
        WindowWidth=60000,
        VOILUTFunction="LINEAR_EXACT",
    )
    image, qc = read_image(write(ds, tmp_path / "e.dcm"), RAW)
    m = stored * 2.0 - 1000  # modality values 0, 1000, 30000, 60000
    expected = 1 - ((m - 30000) / 60000 + 0.5)
    assert image.dtype == np.float32 and image.shape == (2, 2)
    assert_close(image, expected, tol=F32)
    assert qc.modality_lut == "rescale" and qc.inversion_applied and qc.voi_source == "window"


def test_end_to_end_signed_with_voi_lut(tmp_path: Path) -> None:
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "US", (np.arange(4096) * 16).tolist())
    stored = np.array([[-2048, -1], [0, 2047]], dtype=np.int16)
    ds = make_ds(
        stored, signed=True, RescaleSlope=1, RescaleIntercept=2048, VOILUTSequence=DicomSequence([item])
    )
    image, qc = read_image(write(ds, tmp_path / "l.dcm"), RAW)
    assert_close(image, (stored + 2048) / 4095.0, tol=F32)
    assert qc.voi_source == "voi_lut_sequence" and qc.pixel_representation == 1


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k"])
def test_compressed_lossless_matches_uncompressed(tmp_path: Path, syntax: str) -> None:
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 4096, (37, 45)).astype(np.uint16)  # J2K needs >= 32 px for 6 levels
    plain = make_ds(stored, WindowCenter=2048, WindowWidth=4096)
    packed = make_ds(stored, WindowCenter=2048, WindowWidth=4096)
    packed.compress(syntax, generate_instance_uid=False)
    a, _ = read_image(write(plain, tmp_path / "p.dcm"), RAW)
    b, qc = read_image(write(packed, tmp_path / "c.dcm"), RAW)
    np.testing.assert_array_equal(a, b)
    assert_close(b, stored / 4095.0, tol=F32)
    assert qc.transfer_syntax_uid == str(syntax)


def test_missing_decoder_names_syntax_and_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = make_ds(np.zeros((32, 32), np.uint16))
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    path = write(ds, tmp_path / "j.dcm")
    monkeypatch.setattr(dcm, "_decoder_available", lambda uid: False)
    with pytest.raises(MissingDecoderError) as info:
        read_image(path, RAW)
    msg = str(info.value)
    assert "JPEG 2000" in msg and "1.2.840.10008.1.2.4.90" in msg and "pylibjpeg-openjpeg" in msg
    assert "cxr-risk[jpeg]" in msg


def test_unknown_compressed_syntax_is_a_clear_error(tmp_path: Path) -> None:
    from pydicom.encaps import encapsulate

    ds = make_ds(np.zeros((4, 4), np.uint16))
    ds.PixelData = encapsulate([b"\x00" * 16])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.9999.1"  # a private compressed syntax
    path = tmp_path / "x.dcm"
    pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=True, enforce_file_format=True)
    with pytest.raises(MissingDecoderError, match=r"no decoder in cxr-risk\[jpeg\] covers it"):
        read_image(path, RAW)


# ----------------------------------------------------------------------------------- bad input
def test_non_image_dicom(tmp_path: Path) -> None:
    ds = make_ds(np.zeros((2, 2)))
    del ds.PixelData
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    with pytest.raises(UnsupportedImageError, match="non-image DICOM"):
        read_image(write(ds, tmp_path / "sr.dcm"), RAW)


def test_ct_slice_rejected(tmp_path: Path) -> None:
    ds = make_ds(np.zeros((4, 4)), modality="CT", RescaleIntercept=-1024, RescaleSlope=1)
    with pytest.raises(UnsupportedImageError, match="CT slice"):
        read_image(write(ds, tmp_path / "ct.dcm"), RAW)


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_colour_rejected(tmp_path: Path, photometric: str) -> None:
    ds = make_ds(np.zeros((2, 2)), bits_allocated=8, bits_stored=8, photometric=photometric)
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.PixelData = bytes(2 * 2 * 3)
    with pytest.raises(UnsupportedImageError, match="colour image"):
        read_image(write(ds, tmp_path / "rgb.dcm"), RAW)


def test_truncated_file(tmp_path: Path) -> None:
    path = write(make_ds(np.arange(64 * 64).reshape(64, 64) % 4096), tmp_path / "t.dcm")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 3000])
    with pytest.raises(ImageReadError, match=r"t\.dcm"):
        read_image(path, RAW)


def test_not_a_dicom_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("this is not a DICOM file\n" * 20)
    with pytest.raises(ImageReadError, match=r"notes\.dcm"):
        read_image(path, RAW)


def test_view_filter(tmp_path: Path) -> None:
    path = write(make_ds(np.zeros((4, 4)), ViewPosition="LL"), tmp_path / "lat.dcm")
    with pytest.raises(ViewRejectedError, match="LL"):
        read_image(path, PreprocessConfig(size=None, allowed_views=("PA", "AP")))
    _, qc = read_image(path, PreprocessConfig(size=None, allowed_views=("LL",)))
    assert qc.view == "LL"
    _, qc = read_image(path, PreprocessConfig(size=None, allowed_views=("PA", "lateral")))
    assert qc.view == "LL"
    unknown = write(make_ds(np.zeros((4, 4))), tmp_path / "unknown.dcm")
    with pytest.raises(ViewRejectedError):
        read_image(unknown, PreprocessConfig(size=None, allowed_views=("PA",), allow_unknown_view=False))


# ---------------------------------------------------------------------------------- spacing, QC
def test_spacing_pixel_spacing_wins(tmp_path: Path) -> None:
    ds = make_ds(np.zeros((4, 4)), PixelSpacing=[0.2, 0.25], ImagerPixelSpacing=[0.3, 0.3])
    _, qc = read_image(write(ds, tmp_path / "s.dcm"), RAW)
    assert qc.pixel_spacing_mm == (0.2, 0.25) and qc.spacing_source == "PixelSpacing"


def test_spacing_imager_with_magnification(tmp_path: Path) -> None:
    ds = make_ds(
        np.zeros((4, 4)), ImagerPixelSpacing=[0.22, 0.22], EstimatedRadiographicMagnificationFactor=1.1
    )
    _, qc = read_image(write(ds, tmp_path / "s.dcm"), RAW)
    assert qc.spacing_source == "ImagerPixelSpacing/ERMF"
    np.testing.assert_allclose(qc.pixel_spacing_mm, (0.2, 0.2), rtol=1e-12)
    ds2 = make_ds(np.zeros((4, 4)), ImagerPixelSpacing=[0.22, 0.22])
    _, qc2 = read_image(write(ds2, tmp_path / "s2.dcm"), RAW)
    assert qc2.pixel_spacing_mm == (0.22, 0.22) and any("detector" in w for w in qc2.warnings)


def test_qc_record_has_no_identifiers(tmp_path: Path) -> None:
    ds = make_ds(np.zeros((4, 4)), BurnedInAnnotation="YES", ViewPosition="PA")
    _, qc = read_image(write(ds, tmp_path / "q.dcm"), RAW)
    text = json.dumps(qc.to_dict())
    assert "PID-SECRET-123" not in text and "DOE" not in text
    assert ds.SOPInstanceUID not in text and len(qc.image_key) == 32
    assert qc.burned_in_annotation is True and any("BurnedInAnnotation" in w for w in qc.warnings)
    assert (qc.modality, qc.view, qc.bits_stored) == ("DX", "PA", 12)


# ----------------------------------------------------------------------------- real fixtures
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=FIXTURES_MISSING)


@needs_fixtures
def test_fixture_monochrome1_is_exact_inverse_after_voi() -> None:
    m2, qc2 = read_image(FIXTURES / "chest_cr_pa_monochrome2_jpeg.dcm", RAW)
    m1, qc1 = read_image(FIXTURES / "chest_cr_pa_tagged_monochrome1.dcm", RAW)
    assert not qc2.inversion_applied and qc1.inversion_applied
    # Final float32 outputs: inverse up to the one rounding of the float32 cast.
    assert_close(m1, 1.0 - m2.astype(np.float64), tol=F32 / 2)
    assert m2.shape == (1024, 1024) and 0.0 <= m2.min() and m2.max() <= 1.0
    # Stage by stage in float64: identical after VOI, exactly 1 - y after polarity.
    stages = []
    for name in ("chest_cr_pa_monochrome2_jpeg.dcm", "chest_cr_pa_tagged_monochrome1.dcm"):
        ds = pydicom.dcmread(FIXTURES / name)
        qc = QCRecord(path=name, kind="dicom")
        y = dcm.voi(dcm.modality_lut(dcm.decode(ds), ds)[0], ds, RAW, qc)
        stages.append((y, dcm.polarity(y, ds, qc)))
    np.testing.assert_array_equal(stages[0][0], stages[1][0])
    np.testing.assert_array_equal(stages[1][1], 1.0 - stages[0][1])


@needs_fixtures
def test_fixture_header_fields() -> None:
    _, qc = read_image(FIXTURES / "chest_cr_pa_monochrome2_jpeg.dcm", RAW)
    assert qc.view == "PA" and qc.modality == "CR"
    assert qc.pixel_spacing_mm == (0.168, 0.168) and qc.spacing_source == "PixelSpacing"
    assert qc.transfer_syntax_uid == "1.2.840.10008.1.2.4.50" and qc.bits_stored == 8
    assert qc.voi_source == "percentile"  # the fixture carries no window
    assert any("Secondary Capture" in w for w in qc.warnings)


@needs_fixtures
def test_fixture_polarity_on_anatomy() -> None:
    """Lungs (lateral thirds, mid height) are darker than the spine in the MONOCHROME2 original; the
    tagged copy's pixels are unchanged, so honouring its MONOCHROME1 tag makes the lungs the brighter."""

    def lungs_minus_spine(img: np.ndarray) -> float:
        h, w = img.shape
        rows = slice(h // 3, h // 2)
        lungs = np.concatenate([img[rows, w // 5 : w // 3], img[rows, 2 * w // 3 : 4 * w // 5]], axis=1)
        return float(lungs.mean() - img[rows, 15 * w // 32 : 17 * w // 32].mean())

    original, _ = read_image(FIXTURES / "chest_cr_pa_monochrome2_jpeg.dcm", RAW)
    tagged, _ = read_image(FIXTURES / "chest_cr_pa_tagged_monochrome1.dcm", RAW)
    assert lungs_minus_spine(original) < -0.05
    assert lungs_minus_spine(tagged) > 0.05


# ------------------------------------------------------- pydicom's own test files (in its wheel)
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


@pytest.mark.parametrize(
    "name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"]
)
def test_lossless_decoders_match_uncompressed_reference(name: str) -> None:
    """JPEG-LS, JPEG 2000 and RLE decoders of the jpeg extra reproduce the uncompressed pixels exactly."""
    reference = dcm.decode(pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm"))
    ds = pydicom.dcmread(PYDICOM_FILES / name)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(dcm.decode(ds), reference)


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        ("CT_small.dcm", UnsupportedImageError, "CT slice"),
        ("reportsi.dcm", UnsupportedImageError, "non-image DICOM"),
        ("SC_ybr_full_422_uncompressed.dcm", UnsupportedImageError, "colour image"),
        ("MR_small.dcm", UnsupportedImageError, "Modality=MR"),
        ("MR_truncated.dcm", ImageReadError, "MR_truncated"),
    ],
)
def test_real_bad_inputs(name: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        read_image(PYDICOM_FILES / name, RAW)


# ------------------------------------------------------------------- pixel padding (C.7.5.1.1.2)
EXACT = PreprocessConfig(size=None, trim=False, percentile_window=(0.0, 100.0))


def _padded() -> np.ndarray:
    """12-bit stored values: anatomy 1000..3000 in the middle, padding 0 and 4095 around it."""
    stored = np.array(
        [[0, 0, 0, 4095], [0, 1000, 1500, 4095], [0, 2000, 3000, 4095], [4000, 4050, 4095, 4095]],
        dtype=np.uint16,
    )
    return stored


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_padding_value_left_out_of_window_and_black(tmp_path: Path, photometric: str) -> None:
    stored = _padded()
    ds = make_ds(stored, photometric=photometric, PixelPaddingValue=0)
    image, qc = read_image(write(ds, tmp_path / "p.dcm"), EXACT)
    pad = stored == 0
    y = (stored - 1000.0) / (4095.0 - 1000.0)  # window over the 10 non-padding values: 1000..4095
    expected = np.where(pad, 0.0, 1.0 - y if photometric == "MONOCHROME1" else y)
    assert_close(image, expected, tol=F32)
    assert qc.window == (1000.0, 4095.0) and qc.padding_fraction == pad.mean()
    assert qc.inversion_applied is (photometric == "MONOCHROME1")


@pytest.mark.parametrize(
    ("photometric", "value", "limit"),
    [("MONOCHROME1", 4095, 4000), ("MONOCHROME2", 4000, 4095), ("MONOCHROME1", 4000, 4095)],
)
def test_padding_range_is_inclusive_either_order(
    tmp_path: Path, photometric: str, value: int, limit: int
) -> None:
    stored = _padded()
    ds = make_ds(stored, photometric=photometric, PixelPaddingValue=value, PixelPaddingRangeLimit=limit)
    image, qc = read_image(write(ds, tmp_path / "r.dcm"), EXACT)
    pad = stored >= 4000  # 4000, 4050 and 4095: both ends and the value between
    y = stored / 3000.0  # window over 0..3000
    expected = np.where(pad, 0.0, 1.0 - y if photometric == "MONOCHROME1" else y)
    assert_close(image, expected, tol=F32)
    assert qc.window == (0.0, 3000.0) and qc.padding_fraction == pad.mean()


def test_padding_compared_before_modality_lut_and_with_header_window(tmp_path: Path) -> None:
    stored = np.array([[0, 100], [200, 300]], dtype=np.uint16)
    ds = make_ds(
        stored,
        photometric="MONOCHROME1",
        RescaleSlope=2,
        RescaleIntercept=-100,  # modality values -100, 100, 300, 500: padding is stored 0, not -100
        WindowCenter=200,
        WindowWidth=400,
        VOILUTFunction="LINEAR_EXACT",
        PixelPaddingValue=0,
    )
    image, qc = read_image(write(ds, tmp_path / "w.dcm"), EXACT)
    m = stored * 2.0 - 100
    expected = np.where(stored == 0, 0.0, 1.0 - np.clip((m - 200) / 400 + 0.5, 0, 1))
    assert_close(image, expected, tol=F32)
    assert qc.voi_source == "window" and qc.padding_fraction == 0.25


@pytest.mark.parametrize("vr", ["SS", "US"])
def test_padding_signed_respects_pixel_representation(tmp_path: Path, vr: str) -> None:
    """-2000 on 12-bit signed data, written as SS -2000 or (a common vendor slip) as US 0xF830."""
    stored = np.array([[-2000, -2000], [-1000, 1000]], dtype=np.int16)
    ds = make_ds(stored, signed=True)
    ds.add_new(0x00280120, vr, -2000 if vr == "SS" else 0xF830)
    image, qc = read_image(write(ds, tmp_path / "s.dcm"), EXACT)
    expected = np.where(stored == -2000, 0.0, (stored + 1000.0) / 2000.0)
    assert_close(image, expected, tol=F32)
    assert qc.window == (-1000.0, 1000.0) and qc.padding_fraction == 0.5
    assert any("read as stored value -2000" in w for w in qc.warnings) is (vr == "US")


def test_padding_high_bits_masked_like_the_pixels(tmp_path: Path) -> None:
    """A padding value 0xFFFF with BitsStored=12 matches pixels written as 0xFFFF, which read as 4095."""
    stored = np.array([[4095, 4095], [1000, 3000]], dtype=np.uint16)
    raw = np.where(stored == 4095, 0xFFFF, stored).astype(np.uint16)
    ds = make_ds(stored, raw=raw, PixelPaddingValue=0xFFFF)
    image, qc = read_image(write(ds, tmp_path / "h.dcm"), EXACT)
    assert_close(image, np.where(stored == 4095, 0.0, (stored - 1000.0) / 2000.0), tol=F32)
    assert any("PixelPaddingValue=65535 read as stored value 4095" in w for w in qc.warnings)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_without_padding_tags_output_unchanged(tmp_path: Path, photometric: str) -> None:
    """No PixelPaddingValue: the window spans every pixel (0..4095) as before; a lone range limit is
    ignored with a warning and changes nothing either."""
    stored = _padded()
    y = stored / 4095.0
    expected = 1.0 - y if photometric == "MONOCHROME1" else y
    plain, qc = read_image(write(make_ds(stored, photometric=photometric), tmp_path / "n.dcm"), EXACT)
    assert_close(plain, expected, tol=F32)
    assert qc.window == (0.0, 4095.0) and qc.padding_fraction is None
    lone = make_ds(stored, photometric=photometric, PixelPaddingRangeLimit=4095)
    limit_only, qc2 = read_image(write(lone, tmp_path / "l.dcm"), EXACT)
    np.testing.assert_array_equal(limit_only, plain)
    assert any("PixelPaddingRangeLimit without PixelPaddingValue" in w for w in qc2.warnings)


def test_padding_everywhere_is_blank_with_warning(tmp_path: Path) -> None:
    ds = make_ds(np.zeros((3, 3), np.uint16), photometric="MONOCHROME1", PixelPaddingValue=0)
    image, qc = read_image(write(ds, tmp_path / "z.dcm"), EXACT)
    assert (image == 0).all() and qc.padding_fraction == 1.0
    assert [w for w in qc.warnings if "padding" in w] == [
        "every pixel is padding (stored values 0..0): output is blank"
    ]


def test_padding_changes_the_content_digest(tmp_path: Path) -> None:
    stored = _padded()
    ds = make_ds(stored)
    before = dcm.content_digest(ds)
    ds.PixelPaddingValue = 0
    assert dcm.content_digest(ds) != before


@needs_fixtures
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_fixture_with_padding_border_reads_like_the_unpadded_image(tmp_path: Path, photometric: str) -> None:
    """The real chest CR as 12-bit stored values (8-bit * 15 + 64: anatomy in 64..3889) inside a
    padding border of 0 covering ~44 % of the frame: with PixelPaddingValue=0 the anatomy reads exactly
    as the unpadded image does, under the default (0.5, 99.5) percentile window, and the border is black.
    """
    chest = dcm.decode(pydicom.dcmread(FIXTURES / "chest_cr_pa_monochrome2_jpeg.dcm")).astype(np.uint16)
    chest = chest * 15 + 64
    if photometric == "MONOCHROME1":
        chest = 4095 - chest  # same display as the MONOCHROME2 original once inverted
    canvas = np.zeros((1360, 1376), np.uint16)
    canvas[200:1224, 180:1204] = chest
    config = PreprocessConfig(size=None, trim=False)
    alone, qa = read_image(write(make_ds(chest, photometric=photometric), tmp_path / "a.dcm"), config)
    padded, qp = read_image(
        write(make_ds(canvas, photometric=photometric, PixelPaddingValue=0), tmp_path / "p.dcm"), config
    )
    np.testing.assert_array_equal(padded[200:1224, 180:1204], alone)
    inside = np.zeros(canvas.shape, bool)
    inside[200:1224, 180:1204] = True
    assert (padded[~inside] == 0).all() and qp.window == qa.window
    assert qp.padding_fraction == pytest.approx(1 - 1024 * 1024 / canvas.size)


RG1 = Path(__file__).resolve().parent / "fixtures" / "pydicom-data" / "RG1_J2KI.dcm"


@pytest.mark.skipif(not RG1.is_file(), reason=f"{RG1} missing (part of the package's tests)")
def test_real_monochrome1_cr_matches_pydicoms_own_pipeline() -> None:
    """pydicom-data's real chest CR RG1 (16-bit allocated, 15 stored, MONOCHROME1, JPEG 2000): our decode is
    pydicom's pixel array, and our display value is pydicom's modality LUT + VOI window, rescaled from its
    output range to [0, 1] and inverted for MONOCHROME1."""
    pixels = pytest.importorskip("pydicom.pixels")
    ds = pydicom.dcmread(RG1)
    try:
        stored = ds.pixel_array
    except Exception as err:  # no JPEG 2000 decoder: the jpeg extra is missing
        pytest.skip(f"no JPEG 2000 decoder ({err})")
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 15
    np.testing.assert_array_equal(dcm.decode(ds), stored)
    ours, qc = read_image(RG1, RAW)
    assert qc.inversion_applied and ours.shape == stored.shape
    voi = pixels.apply_voi_lut(pixels.apply_modality_lut(stored, ds), ds).astype(np.float64)
    # pydicom's LINEAR window maps to [0, 2**BitsStored - 1] here (unsigned, no rescale)
    want = 1.0 - voi / (2**ds.BitsStored - 1)
    assert_close(ours, want, tol=4 * F32)
