"""The quality-control record kept for every image read, and the errors a reader raises.

A :class:`QCRecord` says how a file was turned into pixels (transfer syntax, which VOI step was used,
whether the image was inverted, its spacing and view) and what looked wrong, so that a cohort of
thousands of radiographs can be audited before training. It never holds a patient identifier: the
image is named by :func:`image_key`, a salted SHA-256 of its SOP Instance UID.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# A fixed salt so that keys are stable across runs yet differ from a bare SHA-256 of the UID that a
# reader might find elsewhere.
_KEY_SALT = b"cxr-risk/v1/"


def image_key(identity: str) -> str:
    """A 32-hex-digit key for an image from its SOP Instance UID (or another stable identity).

    Caches and outputs use this key instead of anything that could name the patient.
    """
    return hashlib.sha256(_KEY_SALT + identity.encode("utf-8")).hexdigest()[:32]


class ImageReadError(ValueError):
    """An image could not be read; the message names the file (and its cohort-table line, when known)
    and what to do about it.

    Attributes:
        path: the file as the caller gave it.
        reason: what was wrong, without the path.
        line: the line of the cohort CSV (header = line 1) that named the file, or ``None``.
    """

    def __init__(self, path: object, reason: str, line: int | None = None) -> None:
        self.path = str(path)
        self.reason = reason
        self.line = line
        where = f"{self.path} (line {line})" if line is not None else self.path
        super().__init__(f"{where}: {reason}")

    def with_line(self, line: int | None) -> ImageReadError:
        """The same error (same class) with the cohort-table line added to its message."""
        if line is None or line == self.line:
            return self
        err = type(self)(self.path, self.reason, line)
        err.__cause__, err.__traceback__ = self.__cause__, self.__traceback__
        return err

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild from the fields, not from the formatted message, so errors survive pickling (e.g. from
        # DataLoader worker processes) and copying.
        return (type(self), (self.path, self.reason, self.line))

    def to_dict(self) -> dict[str, Any]:
        """One row of an exclusion report: file name, path, line, error class and reason."""
        return {
            "file": Path(self.path).name,
            "path": self.path,
            "line": self.line,
            "error": type(self).__name__,
            "reason": self.reason,
        }


class UnsupportedImageError(ImageReadError):
    """The file is readable but is not a single-channel projection radiograph (CT, RGB, no pixels...)."""


class MissingDecoderError(ImageReadError):
    """The pixel data uses a compressed transfer syntax for which no decoder is installed."""


class ViewRejectedError(ImageReadError):
    """The image's ViewPosition is not among ``PreprocessConfig.allowed_views``."""


@dataclass
class QCRecord:
    """What happened to one file on its way to a float image, without identifiers.

    Attributes:
        path: the file as given by the caller (the caller's own string; never read from the header).
        kind: ``"dicom"``, ``"png"``, ``"jpeg"`` or ``"tiff"``.
        image_key: :func:`image_key` of the SOP Instance UID (DICOM) or of the file content (others).
        content_digest: for DICOM, a digest of the pixel data and of the attributes that change how it
            is displayed, so that edited copies sharing one SOP Instance UID (a re-tagged
            MONOCHROME1 copy, say) are told apart by the cache; empty for other formats.
        modality: DICOM Modality (``CR``, ``DX``...) or ``None``.
        view: normalised ViewPosition (``PA``, ``AP``, ``LATERAL``, ``LL``, ``RL``...) or ``None``.
        photometric: PhotometricInterpretation, or the equivalent for PNG/TIFF.
        bits_allocated, bits_stored: container and significant bits per sample.
        pixel_representation: 0 unsigned, 1 two's complement.
        transfer_syntax, transfer_syntax_uid: name and UID (DICOM only).
        modality_lut: ``"rescale"``, ``"sequence"`` or ``"none"``.
        voi_source: ``"voi_lut_sequence"``, ``"window"``, ``"percentile"`` or ``"dtype_range"``.
        voi_function: VOILUTFunction applied with a window (``LINEAR``, ``LINEAR_EXACT``, ``SIGMOID``).
        window: (center, width) of the window used, or the percentile window's (low, high) bounds.
        inversion_applied: True when MONOCHROME1 / PresentationLUTShape INVERSE / TIFF min-is-white.
        padding_fraction: share of pixels marked as padding by PixelPaddingValue (and
            PixelPaddingRangeLimit), set to 0 and left out of the percentile window; ``None`` when the
            file declares no padding.
        burned_in_annotation: BurnedInAnnotation as a bool, ``None`` when absent.
        pixel_spacing_mm: (row, column) spacing in mm at the patient, or ``None`` when unknown.
        spacing_source: ``"PixelSpacing"``, ``"ImagerPixelSpacing"``, ``"ImagerPixelSpacing/ERMF"``.
        input_shape, output_shape: (rows, columns) before and after geometry.
        trim_box: (top, bottom, left, right) kept after border trimming, in input pixels.
        warnings: human-readable notes on anything unusual.
    """

    path: str
    kind: str
    image_key: str = ""
    content_digest: str = ""
    modality: str | None = None
    view: str | None = None
    photometric: str | None = None
    bits_allocated: int | None = None
    bits_stored: int | None = None
    pixel_representation: int | None = None
    transfer_syntax: str | None = None
    transfer_syntax_uid: str | None = None
    modality_lut: str = "none"
    voi_source: str = ""
    voi_function: str | None = None
    window: tuple[float, float] | None = None
    inversion_applied: bool = False
    padding_fraction: float | None = None
    burned_in_annotation: bool | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    spacing_source: str | None = None
    input_shape: tuple[int, int] | None = None
    output_shape: tuple[int, int] | None = None
    trim_box: tuple[int, int, int, int] | None = None
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    @property
    def cache_key(self) -> str:
        """Name of the cached array: the image key, plus the content digest when there is one."""
        return f"{self.image_key}-{self.content_digest}" if self.content_digest else self.image_key

    def to_dict(self, *, include_path: bool = True) -> dict[str, Any]:
        """A JSON-ready dict; ``include_path=False`` for anything written into a cache."""
        out = asdict(self)
        for key in ("window", "pixel_spacing_mm", "input_shape", "output_shape", "trim_box"):
            if out[key] is not None:
                out[key] = list(out[key])
        if not include_path:
            out.pop("path")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QCRecord:
        data = dict(data)
        data.setdefault("path", "")
        for key in ("window", "pixel_spacing_mm", "input_shape", "output_shape", "trim_box"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


# Columns shown by ``cxr-risk inspect`` in table form, in order.
TABLE_COLUMNS: tuple[str, ...] = (
    "path",
    "modality",
    "view",
    "photometric",
    "bits_stored",
    "transfer_syntax",
    "voi_source",
    "inversion_applied",
    "burned_in_annotation",
    "pixel_spacing_mm",
    "output_shape",
    "warnings",
)
