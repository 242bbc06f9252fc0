"""DICOM CR/DX radiographs to display-space floats, step by step as the standard orders it.

DICOM PS3.4 N.2 (the grayscale pipeline) and PS3.3 C.11: stored values -> Modality LUT (rescale or
Modality LUT Sequence) -> VOI LUT (VOI LUT Sequence, else Window Center/Width with VOILUTFunction) ->
Presentation LUT (polarity). Each step is a separate public function so tests can pin its values:

* :func:`decode` - stored pixel values honouring BitsAllocated/BitsStored/PixelRepresentation
  (pydicom masks the unused high bits and sign-extends two's complement values).
* :func:`padding_mask` - the pixels marked as padding by PixelPaddingValue (and PixelPaddingRangeLimit),
  compared against the stored values before the modality LUT (PS3.3 C.7.5.1.1.2). Padding is left out
  of the percentile window and set to 0 (displayed black) after the polarity step.
* :func:`modality_lut` - pydicom's ``apply_modality_lut`` (PS3.3 C.11.1), returned as float64.
* :func:`voi` - the VOI step mapped straight to ``[0, 1]`` (``ymin = 0``, ``ymax = 1`` in the formulas
  of PS3.3 C.11.2.1.2); VOI LUT Sequence data are scaled by their own min and max; without any VOI
  attribute, a robust percentile window (``PreprocessConfig.percentile_window``). The window functions
  themselves live in :mod:`cxr_risk.windowing`, which the PNG/TIFF reader shares.
* :func:`polarity` - ``1 - y`` for MONOCHROME1 or PresentationLUTShape INVERSE. Because the VOI
  output is exactly ``[0, 1]``, this is inversion over the actual output range.
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi

from .config import PreprocessConfig
from .qc import (
    ImageReadError,
    MissingDecoderError,
    QCRecord,
    UnsupportedImageError,
    ViewRejectedError,
    image_key,
)
from .views import LATERAL_VIEWS, normalise_view
from .windowing import WINDOW_FUNCTIONS, percentile_window

# The VOI functions moved to ``windowing`` (shared with the PNG/TIFF reader); still importable from here.
from .windowing import window_linear as window_linear
from .windowing import window_linear_exact as window_linear_exact
from .windowing import window_sigmoid as window_sigmoid

# Modalities read as projection chest radiographs. OT (other) is allowed because secondary captures of
# digitised films are common; it gets a QC warning.
ACCEPTED_MODALITIES = frozenset({"CR", "DX", "RG", "OT"})
# Secondary Capture Image Storage and its multi-frame variants (PS3.4 B.5).
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"

# Which pip package provides a decoder, per family of transfer syntaxes.
_DECODER_PACKAGES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg",  # JPEG Extended
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle",  # RLE Lossless (pydicom also decodes it natively)
}


def _decoder_available(uid: str) -> bool:
    """Whether pydicom has a working decoder for ``uid`` (False also for syntaxes it does not know)."""
    from pydicom.pixels import get_decoder

    try:
        return bool(get_decoder(uid).is_available)
    except NotImplementedError:
        return False


def _check_decoder(path: Path, ds: Dataset) -> None:
    uid = ds.file_meta.TransferSyntaxUID
    # A UID pydicom does not know as a transfer syntax (private or newer than pydicom) needs a decoder.
    if uid.is_transfer_syntax and not uid.is_compressed:
        return
    if not _decoder_available(str(uid)):
        package = _DECODER_PACKAGES.get(str(uid))
        hint = (
            f'install it with `pip install "cxr-risk[jpeg]"` (provides {package})'
            if package
            else "no decoder in cxr-risk[jpeg] covers it; convert the file (e.g. `gdcmconv --raw`)"
        )
        raise MissingDecoderError(path, f"no decoder for transfer syntax {uid.name} ({uid}): {hint}")


def load(path: str | Path) -> Dataset:
    """Read and sanity-check a DICOM file; raises :class:`ImageReadError` for anything unusable."""
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as no_preamble:
        try:  # files without the 128-byte preamble are common in old archives
            ds = pydicom.dcmread(path, force=True)
        except Exception as err:
            raise ImageReadError(path, f"not a readable DICOM file ({err})") from err
        if "SOPClassUID" not in ds and "PixelData" not in ds:
            raise ImageReadError(
                path, "not a DICOM file (no DICM preamble and no DICOM elements)"
            ) from no_preamble
    except (EOFError, OSError, ValueError, KeyError, TypeError) as err:
        raise ImageReadError(path, f"truncated or corrupt DICOM file ({type(err).__name__}: {err})") from err
    if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    return ds


def check_radiograph(path: Path, ds: Dataset, qc: QCRecord) -> None:
    """Reject non-image objects, other modalities and colour images with a reason a person can act on."""
    if "PixelData" not in ds:
        sop = getattr(ds.get("SOPClassUID"), "name", ds.get("SOPClassUID", "unknown"))
        raise UnsupportedImageError(path, f"non-image DICOM object (SOP Class {sop}): it has no Pixel Data")
    modality = str(ds.get("Modality", "") or "").upper()
    if not modality:
        qc.warn("no Modality attribute: assumed to be a projection radiograph")
    elif modality not in ACCEPTED_MODALITIES:
        what = "a CT slice" if modality == "CT" else f"a {modality} image"
        raise UnsupportedImageError(
            path, f"Modality={modality}: {what} is not a projection radiograph; only CR and DX are read"
        )
    elif modality == "OT":
        qc.warn("Modality=OT (secondary capture): check that this is a chest radiograph")
    samples = int(ds.get("SamplesPerPixel", 1))
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedImageError(
            path,
            f"colour image (PhotometricInterpretation={photometric}, SamplesPerPixel={samples}): "
            "chest radiographs must be single-sample MONOCHROME1/MONOCHROME2",
        )


def decode(ds: Dataset) -> np.ndarray:
    """Stored pixel values of the first frame as an integer array ``(rows, columns)``."""
    arr = ds.pixel_array
    if arr.ndim == 3:
        arr = arr[0]
    return arr


def _as_stored_value(value: Any, bits_stored: int, signed: bool) -> int:
    """A padding attribute read the way pydicom reads a stored pixel: its low ``bits_stored`` bits, as
    two's complement when ``signed``. This undoes the common mismatch of a US element on signed pixel
    data (0xF830 for -2000) and of a value written with dirty high bits."""
    raw = int(value)
    v = raw & ((1 << bits_stored) - 1)
    if signed and v >= 1 << (bits_stored - 1):
        v -= 1 << bits_stored
    return v


def padding_mask(stored: np.ndarray, ds: Dataset, qc: QCRecord | None = None) -> np.ndarray | None:
    """Boolean ``(rows, columns)`` mask of padding pixels, or ``None`` when the file declares none.

    PS3.3 C.7.5.1.1.2: Pixel Padding Value alone marks the pixels equal to it; with Pixel Padding Range
    Limit, every stored value between the two, inclusive, is padding (the standard orders the pair by
    the photometric interpretation; either order is accepted here). Both are stored pixel values: they
    are compared before the modality LUT, with BitsStored and PixelRepresentation applied to them as to
    the pixels (see :func:`_as_stored_value`).
    """
    if "PixelPaddingRangeLimit" in ds and "PixelPaddingValue" not in ds:
        if qc is not None:
            qc.warn("PixelPaddingRangeLimit without PixelPaddingValue: ignored")
        return None
    if ds.get("PixelPaddingValue") is None:  # absent, or present with an empty value
        return None
    bits = int(ds.get("BitsStored") or stored.dtype.itemsize * 8)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    ends: list[int] = []
    for name in ("PixelPaddingValue", "PixelPaddingRangeLimit"):
        raw = ds.get(name)
        if raw is None:
            continue
        if isinstance(raw, (list, tuple, pydicom.multival.MultiValue, bytes)):
            # VM is 1; several values (or an undecoded ambiguous US/SS) are a malformed header.
            if qc is not None:
                qc.warn(f"{name}={raw!r} is not a single value: padding ignored")
            return None
        value = _as_stored_value(raw, bits, signed)
        if value != int(raw) and qc is not None:
            qc.warn(
                f"{name}={int(raw)} read as stored value {value} "
                f"(BitsStored={bits}, PixelRepresentation={int(signed)})"
            )
        ends.append(value)
    lo, hi = min(ends), max(ends)
    mask = (stored >= lo) & (stored <= hi)
    if qc is not None:
        qc.padding_fraction = float(mask.mean())
        if mask.all():
            qc.warn(f"every pixel is padding (stored values {lo}..{hi}): output is blank")
    return mask


def modality_lut(stored: np.ndarray, ds: Dataset) -> tuple[np.ndarray, str]:
    """Modality LUT (PS3.3 C.11.1): Modality LUT Sequence, else RescaleSlope/Intercept, else identity."""
    if "ModalityLUTSequence" in ds:
        source = "sequence"
    elif "RescaleSlope" in ds or "RescaleIntercept" in ds:
        source = "rescale"
    else:
        return stored.astype(np.float64), "none"
    return np.asarray(apply_modality_lut(stored, ds), dtype=np.float64), source


def _nth(value: Any, index: int) -> float:
    """The ``index``-th value of a possibly multi-valued DS element."""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return float(value[min(index, len(value) - 1)])
    return float(value)


def voi(
    x: np.ndarray, ds: Dataset, config: PreprocessConfig, qc: QCRecord, *, padding: np.ndarray | None = None
) -> np.ndarray:
    """The VOI step onto ``[0, 1]``; records the source, function and window in ``qc``.

    ``padding`` (see :func:`padding_mask`) is left out of the percentile window's statistics; a window
    or VOI LUT from the header uses no statistics of the image, so it maps every pixel as it is.
    """
    index = int(config.voi_index)
    if config.voi == "auto" and "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        index = min(index, len(ds.VOILUTSequence) - 1)
        item = ds.VOILUTSequence[index]
        n_entries, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
        lut_values = np.asarray(apply_voi(np.arange(first, first + n_entries), ds, index), dtype=np.float64)
        lo, hi = float(lut_values.min()), float(lut_values.max())
        qc.voi_source, qc.window = "voi_lut_sequence", None
        # LUT entries are indexed by integer input values; a non-integer rescale is rounded first.
        mapped = np.asarray(apply_voi(np.rint(x).astype(np.int64), ds, index), dtype=np.float64)
        if hi <= lo:
            qc.warn("VOI LUT Sequence is constant: image is blank")
            return np.zeros_like(mapped)
        return (mapped - lo) / (hi - lo)
    if config.voi == "auto" and "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _nth(ds.WindowCenter, index), _nth(ds.WindowWidth, index)
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        if function not in WINDOW_FUNCTIONS:
            qc.warn(f"unknown VOILUTFunction={function}: LINEAR used")
            function = "LINEAR"
        minimum = 1.0 if function == "LINEAR" else 0.0
        if width > minimum or (function == "LINEAR" and width == 1):
            qc.voi_source, qc.voi_function, qc.window = "window", function, (center, width)
            return WINDOW_FUNCTIONS[function](x, center, width)
        qc.warn(f"invalid WindowWidth={width} for {function}: percentile window used")
    y, bounds = percentile_window(x, *config.percentile_window, exclude=padding)
    qc.voi_source, qc.window = "percentile", bounds
    if bounds[1] <= bounds[0] and not (padding is not None and padding.all()):
        qc.warn("image is constant: output is blank")
    return y


def polarity(y: np.ndarray, ds: Dataset, qc: QCRecord) -> np.ndarray:
    """Invert for MONOCHROME1 or PresentationLUTShape INVERSE so that 1 is always displayed white."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    shape = str(ds.get("PresentationLUTShape", "") or "").upper()
    invert = photometric == "MONOCHROME1" or shape == "INVERSE"
    if photometric == "MONOCHROME1" and shape == "IDENTITY":
        qc.warn("MONOCHROME1 with PresentationLUTShape IDENTITY (non-conformant): inverted per MONOCHROME1")
    if photometric == "MONOCHROME2" and shape == "INVERSE":
        qc.warn("MONOCHROME2 with PresentationLUTShape INVERSE: inverted per the Presentation LUT")
    qc.inversion_applied = invert
    return 1.0 - y if invert else y


def read_spacing(ds: Dataset, qc: QCRecord) -> None:
    """Pixel spacing at the patient in mm: PixelSpacing, else ImagerPixelSpacing (/ magnification).

    PixelSpacing is calibrated to the patient plane; ImagerPixelSpacing is at the detector, larger than
    the anatomy by the geometric magnification, which EstimatedRadiographicMagnificationFactor undoes.
    """
    try:
        if "PixelSpacing" in ds and ds.PixelSpacing:
            qc.pixel_spacing_mm = (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]))
            qc.spacing_source = "PixelSpacing"
        elif "ImagerPixelSpacing" in ds and ds.ImagerPixelSpacing:
            row, col = float(ds.ImagerPixelSpacing[0]), float(ds.ImagerPixelSpacing[1])
            factor = ds.get("EstimatedRadiographicMagnificationFactor")
            if factor:
                qc.pixel_spacing_mm = (row / float(factor), col / float(factor))
                qc.spacing_source = "ImagerPixelSpacing/ERMF"
            else:
                qc.pixel_spacing_mm = (row, col)
                qc.spacing_source = "ImagerPixelSpacing"
                qc.warn("spacing from ImagerPixelSpacing (detector plane, no magnification correction)")
    except (TypeError, ValueError, IndexError) as err:
        qc.warn(f"unreadable pixel spacing ({err})")
        qc.pixel_spacing_mm = None
    if qc.pixel_spacing_mm is not None and min(qc.pixel_spacing_mm) <= 0:
        qc.warn(f"non-positive pixel spacing {qc.pixel_spacing_mm}: ignored")
        qc.pixel_spacing_mm, qc.spacing_source = None, None


# Attributes whose values change the pixels read_image produces (besides the pixel data itself).
_DISPLAY_ATTRIBUTES = (
    "PhotometricInterpretation",
    "PresentationLUTShape",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "EstimatedRadiographicMagnificationFactor",
    "Rows",
    "Columns",
)
# Hashed only when present, so the digests of files without padding stay what they were.
_PADDING_ATTRIBUTES = ("PixelPaddingValue", "PixelPaddingRangeLimit")


def content_digest(ds: Dataset) -> str:
    """16 hex digits over the pixel data bytes and the display attributes (see :data:`_DISPLAY_ATTRIBUTES`)."""
    digest = hashlib.sha256(str(ds.file_meta.get("TransferSyntaxUID", "")).encode())
    for name in _DISPLAY_ATTRIBUTES:
        digest.update(f"|{name}={ds.get(name, '')!s}".encode())
    for name in _PADDING_ATTRIBUTES:
        if name in ds:
            digest.update(f"|{name}={ds.get(name)!s}".encode())
    pixels = ds.get("PixelData")
    if pixels is not None:
        digest.update(b"|" + zlib.crc32(pixels).to_bytes(4, "little") + len(pixels).to_bytes(8, "little"))
    return digest.hexdigest()[:16]


def _int_attribute(path: Path, ds: Dataset, name: str, default: int | None = None) -> int | None:
    """An integer attribute (IS, US...) or ``default`` when absent or empty; a value that is not an
    integer (``NumberOfFrames='1A'``) raises :class:`ImageReadError` naming the attribute."""
    try:
        value = ds.get(name)
        if value is None or value == "":
            return default
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{value} is not a whole number")
        return int(value)
    except (TypeError, ValueError, OverflowError) as err:
        try:
            raw = ds[name].value
        except Exception:  # the element itself cannot be converted: show its bytes
            raw = ds.get_item(name).value if name in ds else None
        raise ImageReadError(path, f"malformed header: {name}={raw!r} is not an integer ({err})") from err


# Integer attributes the pipeline depends on, checked up front so a bad one is reported by name.
_INTEGER_ATTRIBUTES = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "NumberOfFrames",
)


def header_qc(path: Path, ds: Dataset) -> QCRecord:
    """The QC fields that come from the header alone (no pixel decoding).

    Raises :class:`ImageReadError` when an integer attribute of the image (Rows, BitsStored,
    NumberOfFrames...) is malformed.
    """
    ints = {name: _int_attribute(path, ds, name) for name in _INTEGER_ATTRIBUTES}

    uid = str(ds.get("SOPInstanceUID", "") or "")
    ts = ds.file_meta.TransferSyntaxUID
    burned = str(ds.get("BurnedInAnnotation", "") or "").upper()
    qc = QCRecord(
        path=str(path),
        kind="dicom",
        image_key=image_key(uid) if uid else image_key("file:" + str(path.resolve())),
        content_digest=content_digest(ds),
        modality=str(ds.get("Modality", "") or "") or None,
        view=normalise_view(ds.get("ViewPosition")),
        photometric=str(ds.get("PhotometricInterpretation", "") or "") or None,
        bits_allocated=ints["BitsAllocated"],
        bits_stored=ints["BitsStored"],
        pixel_representation=ints["PixelRepresentation"],
        transfer_syntax=ts.name,
        transfer_syntax_uid=str(ts),
        burned_in_annotation={"YES": True, "NO": False}.get(burned),
    )
    if not uid:
        qc.warn("no SOPInstanceUID: image key derived from the file path")
    if str(ds.get("SOPClassUID", "")).startswith(SECONDARY_CAPTURE_PREFIX):
        qc.warn("Secondary Capture object: pixels may be a rendered or digitised copy, not detector data")
    if qc.burned_in_annotation:
        qc.warn("BurnedInAnnotation=YES: text in the pixels may identify the patient")
    if (ints["NumberOfFrames"] or 1) > 1:
        qc.warn(f"{ints['NumberOfFrames']} frames: only the first is used")
    return qc


def check_view(path: Path, qc: QCRecord, config: PreprocessConfig) -> None:
    """Raise :class:`ViewRejectedError` unless the view is allowed (``LATERAL`` also admits LL and RL)."""
    if config.allowed_views is None:
        return
    if qc.view is None:
        if not config.allow_unknown_view:
            raise ViewRejectedError(path, "no ViewPosition and allow_unknown_view=False")
        qc.warn("no ViewPosition: kept because allow_unknown_view=True")
        return
    lateral_ok = qc.view in LATERAL_VIEWS and "LATERAL" in config.allowed_views
    if qc.view not in config.allowed_views and not lateral_ok:
        raise ViewRejectedError(path, f"ViewPosition={qc.view} not in allowed_views={config.allowed_views}")


def read_dicom(path: str | Path, config: PreprocessConfig) -> tuple[np.ndarray, QCRecord]:
    """Decode -> padding -> modality LUT -> VOI -> polarity for one file; geometry is left to the caller."""
    path = Path(path)
    ds = load(path)
    qc = header_qc(path, ds)
    check_radiograph(path, ds, qc)
    check_view(path, qc, config)
    _check_decoder(path, ds)
    try:
        stored = decode(ds)
    except Exception as err:  # pydicom raises many types for short or corrupt pixel data
        raise ImageReadError(
            path,
            f"pixel data could not be decoded ({ds.file_meta.TransferSyntaxUID.name}; truncated file?): "
            f"{type(err).__name__}: {err}",
        ) from err
    if stored.ndim != 2:
        raise UnsupportedImageError(path, f"pixel array has shape {stored.shape}, expected (rows, columns)")
    qc.input_shape = (int(stored.shape[0]), int(stored.shape[1]))
    try:
        padding = padding_mask(stored, ds, qc)
        values, qc.modality_lut = modality_lut(stored, ds)
        y = voi(values, ds, config, qc, padding=padding)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as err:
        if isinstance(err, ImageReadError):
            raise
        # e.g. RescaleSlope='x', a VOI LUT Sequence item without LUTData, PixelPaddingValue='1A'
        raise ImageReadError(
            path, f"malformed header: display attributes unusable ({type(err).__name__}: {err})"
        ) from err
    y = polarity(y, ds, qc)
    if padding is not None:
        y = np.where(padding, 0.0, y)  # background: displayed black whatever the polarity
    read_spacing(ds, qc)
    return np.clip(y, 0.0, 1.0).astype(np.float32), qc
