"""One entry point from a file on disk to the model's input: :func:`read_image` and its config.

Output convention (every reader, every format): a ``float32`` array of shape ``(H, W)`` with values in
``[0, 1]`` where **0 is displayed black** (no attenuation: lung, air) and **1 is displayed white** (bone,
metal), i.e. the DICOM display pipeline's P-values after the modality LUT, the VOI step and the
polarity step (MONOCHROME1 and PresentationLUTShape INVERSE are already undone). PNG, JPEG and TIFF
files are taken as already display-ready (MONOCHROME2-like) unless TIFF says min-is-white.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import dicom, geometry, images
from .qc import ImageReadError, QCRecord

# Bumped whenever the pixels produced for a given config change, so stale caches are not reused.
PIPELINE_VERSION = 2

VIEW_ALIASES: dict[str, str] = {
    "PA": "PA",
    "POSTERO_ANTERIOR": "PA",
    "AP": "AP",
    "ANTERO_POSTERIOR": "AP",
    "LAT": "LATERAL",
    "LATERAL": "LATERAL",
    "LL": "LL",
    "RL": "RL",
    "LLD": "LLD",
    "RLD": "RLD",
}
LATERAL_VIEWS = frozenset({"LATERAL", "LL", "RL"})


def normalise_view(value: object) -> str | None:
    """ViewPosition (or an adapter's view column) to ``PA``/``AP``/``LATERAL``/``LL``/``RL``/... or None."""
    if value is None:
        return None
    text = str(value).strip().upper().replace("-", "_").replace(" ", "_")
    if not text or text in {"NAN", "NONE"}:
        return None
    return VIEW_ALIASES.get(text, text)


@dataclass(frozen=True)
class PreprocessConfig:
    """How a radiograph becomes a model input. Frozen and hashable; :meth:`fingerprint` is stable.

    Attributes:
        size: output (H, W) in pixels, an int for a square, or ``None`` to keep the (resampled) size.
        fit: how the image meets ``size``: ``"pad"`` (keep aspect, centre, pad with 0), ``"crop"``
            (keep aspect, fill, centre crop) or ``"stretch"``.
        mm_per_pixel: resample to this isotropic spacing first (e.g. 0.4 mm); ``None`` skips it.
            Files without a known spacing are then left as they are, with a QC warning.
        trim: remove flat borders (collimation, film edges) whose per-row/column standard deviation is
            below ``trim_threshold`` (in output units), at most ``trim_max_fraction`` of each side.
        allowed_views: keep only these views (normalised: ``PA``, ``AP``, ``LATERAL``, ``LL``, ``RL``);
            ``None`` keeps every view. Rejected files raise :class:`ViewRejectedError`.
        allow_unknown_view: keep files with no view information when ``allowed_views`` is set.
        voi: ``"auto"`` follows the file (VOI LUT Sequence, else window, else percentile window);
            ``"percentile"`` always uses the percentile window (after the modality LUT).
        voi_index: which VOI LUT / window to use when a file carries several.
        percentile_window: low and high percentiles of the robust window, in percent.
    """

    size: int | tuple[int, int] | None = 512
    fit: Literal["pad", "crop", "stretch"] = "pad"
    mm_per_pixel: float | None = None
    trim: bool = True
    trim_threshold: float = 0.01
    trim_max_fraction: float = 0.25
    allowed_views: tuple[str, ...] | None = None
    allow_unknown_view: bool = True
    voi: Literal["auto", "percentile"] = "auto"
    voi_index: int = 0
    percentile_window: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        size = self.size
        if isinstance(size, int):
            size = (size, size)
        if size is not None:
            size = tuple(int(s) for s in size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"PreprocessConfig: size={self.size!r} must be a positive int or (H, W)")
        object.__setattr__(self, "size", size)
        if self.fit not in ("pad", "crop", "stretch"):
            raise ValueError(f"PreprocessConfig: fit={self.fit!r} must be 'pad', 'crop' or 'stretch'")
        if self.mm_per_pixel is not None and not self.mm_per_pixel > 0:
            raise ValueError(f"PreprocessConfig: mm_per_pixel={self.mm_per_pixel!r} must be > 0 or None")
        if not 0 <= self.trim_threshold < 1:
            raise ValueError(f"PreprocessConfig: trim_threshold={self.trim_threshold} must be in [0, 1)")
        if not 0 <= self.trim_max_fraction < 0.5:
            raise ValueError(
                f"PreprocessConfig: trim_max_fraction={self.trim_max_fraction} must be in [0, 0.5)"
            )
        if self.allowed_views is not None:
            if isinstance(self.allowed_views, str):
                raise ValueError(
                    f"PreprocessConfig: allowed_views={self.allowed_views!r} must be a tuple such as ('PA',)"
                )
            views = tuple(normalise_view(v) or "" for v in self.allowed_views)
            if not all(views):
                raise ValueError(f"PreprocessConfig: allowed_views={self.allowed_views!r} has an empty view")
            object.__setattr__(self, "allowed_views", views)
        if self.voi not in ("auto", "percentile"):
            raise ValueError(f"PreprocessConfig: voi={self.voi!r} must be 'auto' or 'percentile'")
        if self.voi_index < 0:
            raise ValueError(f"PreprocessConfig: voi_index={self.voi_index} must be >= 0")
        lo, hi = (float(p) for p in self.percentile_window)
        if not 0 <= lo < hi <= 100:
            raise ValueError(
                f"PreprocessConfig: percentile_window={self.percentile_window!r} needs 0 <= low < high <= 100"
            )
        object.__setattr__(self, "percentile_window", (lo, hi))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (what checkpoints store); :meth:`from_dict` inverts it."""
        out = asdict(self)
        for key in ("size", "allowed_views", "percentile_window"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        data = dict(data)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"PreprocessConfig.from_dict: unknown keys {sorted(unknown)}")
        for key in ("size", "allowed_views", "percentile_window"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)

    def fingerprint(self) -> str:
        """16 hex digits identifying the pixels this config produces (includes the pipeline version)."""
        payload = json.dumps({"pipeline": PIPELINE_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def is_dicom_file(path: Path) -> bool:
    """True for a Part 10 file (``DICM`` at byte 128) or a ``.dcm``/``.dicom`` suffix."""
    if path.suffix.lower() in {".dcm", ".dicom", ".dic"}:
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def read_image(path: str | Path, config: PreprocessConfig | None = None) -> tuple[np.ndarray, QCRecord]:
    """Read one radiograph (DICOM, PNG, JPEG or TIFF) into the model's input space.

    Returns a ``float32`` ``(H, W)`` array in ``[0, 1]`` (0 = displayed black, 1 = displayed white; see the
    module docstring) and its :class:`QCRecord`. Raises :class:`ImageReadError` (or a subclass) with the
    file and the reason for anything that cannot be read, including a missing file and an I/O error.
    """
    config = config or PreprocessConfig()
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "no such file: the image is missing (moved, renamed or not copied?)")
    if not path.is_file():
        raise ImageReadError(path, "not a regular file (a directory?): give the path of an image file")
    try:
        if is_dicom_file(path):
            image, qc = dicom.read_dicom(path, config)
        else:
            image, qc = images.read_raster(path, config)
    except ImageReadError:
        raise
    except OSError as err:  # permission denied, file removed or a disk error while reading
        reason = err.strerror or str(err)
        raise ImageReadError(path, f"cannot read the file ({type(err).__name__}: {reason})") from err
    image = geometry.apply_geometry(image, qc, config)
    return image, qc


@dataclass
class BatchItem:
    """One file of :func:`read_images`: either ``image`` and ``qc``, or ``error``.

    ``line`` is the cohort-table line that named the file, when the caller passed ``lines``.
    """

    path: str
    image: np.ndarray | None
    qc: QCRecord | None
    error: ImageReadError | None
    line: int | None = None


def read_images(
    paths: Iterable[str | Path],
    config: PreprocessConfig | None = None,
    *,
    lines: Iterable[int | None] | None = None,
) -> Iterator[BatchItem]:
    """Batch mode: read every file, reporting a bad one as a :class:`BatchItem` with ``error`` set.

    A long run never stops on one unreadable file; anything that is not an :class:`ImageReadError`
    (a bug, not bad input) is still wrapped so that the file is named in the report. ``lines`` (one per
    path, e.g. the CSV line of each cohort row, header = line 1) is put on each item and into its
    error's message (:attr:`ImageReadError.line`).
    """
    paths = list(paths)
    line_of: list[int | None] = [None] * len(paths) if lines is None else list(lines)
    if len(line_of) != len(paths):
        raise ValueError(f"read_images: {len(line_of)} lines given for {len(paths)} paths")
    for p, line in zip(paths, line_of, strict=True):
        try:
            image, qc = read_image(p, config)
        except ImageReadError as err:
            yield BatchItem(str(p), None, None, err.with_line(line), line)
        except Exception as err:
            error = ImageReadError(p, f"unexpected {type(err).__name__}: {err}", line=line)
            yield BatchItem(str(p), None, None, error, line)
        else:
            yield BatchItem(str(p), image, qc, None, line)
