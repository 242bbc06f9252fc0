"""One entry point from a file on disk to the model's input: :func:`read_image` and :func:`read_images`.

Output convention (every reader, every format): a ``float32`` array of shape ``(H, W)`` with values in
``[0, 1]`` where **0 is displayed black** (no attenuation: lung, air) and **1 is displayed white** (bone,
metal), i.e. the DICOM display pipeline's P-values after the modality LUT, the VOI step and the
polarity step (MONOCHROME1 and PresentationLUTShape INVERSE are already undone). PNG, JPEG and TIFF
files are taken as already display-ready (MONOCHROME2-like) unless TIFF says min-is-white.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import dicom, geometry, images
from .config import PIPELINE_VERSION, PreprocessConfig
from .qc import ImageReadError, QCRecord
from .views import LATERAL_VIEWS, VIEW_ALIASES, normalise_view

# PreprocessConfig and the view names live in the bottom modules ``config`` and ``views`` (the readers
# need them too); they are re-exported here, where they were first published.
__all__ = [
    "LATERAL_VIEWS",
    "PIPELINE_VERSION",
    "VIEW_ALIASES",
    "BatchItem",
    "PreprocessConfig",
    "is_dicom_file",
    "normalise_view",
    "read_image",
    "read_images",
]


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
