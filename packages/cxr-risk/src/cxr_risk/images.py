"""PNG, JPEG and TIFF radiographs (8- and 16-bit, e.g. scanned PLCO films) into the same ``[0, 1]`` range.

These formats carry no VOI information: by default the container's full range maps onto ``[0, 1]``
(``value / (2**bits - 1)``, bits from TIFF's BitsPerSample or the array dtype), which keeps the
intensities a public dataset was published with. ``PreprocessConfig(voi="percentile")`` applies the
robust percentile window instead. TIFF's PhotometricInterpretation MINISWHITE is inverted like DICOM's
MONOCHROME1. Colour files whose channels are identical are accepted with a warning; real colour is not.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .config import PreprocessConfig
from .qc import ImageReadError, QCRecord, UnsupportedImageError, ViewRejectedError, image_key
from .windowing import percentile_window

TIFF_SUFFIXES = frozenset({".tif", ".tiff"})


def _file_key(path: Path) -> str:
    """Image key from the file's bytes (PNG/TIFF have no SOP Instance UID)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return image_key("sha256:" + digest.hexdigest())


def _to_gray(arr: np.ndarray, path: Path, qc: QCRecord) -> np.ndarray:
    """Single channel from (H, W), (H, W, 1), gray+alpha or identical RGB channels."""
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3 and arr.shape[-1] in (1, 2):
        if arr.shape[-1] == 2:
            qc.warn("alpha channel dropped")
        return arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            qc.warn("RGB file with identical channels: read as grayscale")
            return rgb[..., 0]
        raise UnsupportedImageError(path, "colour image (channels differ): radiographs must be grayscale")
    raise UnsupportedImageError(path, f"unexpected pixel array shape {arr.shape}")


def _read_pil(path: Path, qc: QCRecord) -> tuple[np.ndarray, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P":
                im = im.convert("RGB")
            elif mode == "1":
                qc.warn("1-bit image")
                im = im.convert("L")
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(path, f"unreadable image file ({type(err).__name__}: {err})") from err
    qc.photometric = "MONOCHROME2"
    if mode in ("I;16", "I;16B", "I;16L", "I;16N") or arr.dtype == np.uint16:
        return arr.astype(np.uint16), 16
    if mode == "I":  # PIL widens 16-bit PNGs to int32
        if arr.min() < 0 or arr.max() > 65535:
            raise UnsupportedImageError(path, f"32-bit integer image with values {arr.min()}..{arr.max()}")
        return arr.astype(np.uint16), 16
    if mode == "F":
        raise UnsupportedImageError(path, "floating-point image: save radiographs as 8- or 16-bit")
    return arr, 8


def _read_tiff(path: Path, qc: QCRecord) -> tuple[np.ndarray, int]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            arr = page.asarray()
            bits = int(page.bitspersample)
            photometric = getattr(page.photometric, "name", str(page.photometric))
    except Exception as err:  # tifffile raises its own TiffFileError, ValueError, struct.error...
        raise ImageReadError(path, f"unreadable TIFF file ({type(err).__name__}: {err})") from err
    if not np.issubdtype(arr.dtype, np.integer):
        raise UnsupportedImageError(path, f"TIFF with {arr.dtype} samples: save radiographs as 8- or 16-bit")
    qc.photometric = photometric
    return arr, bits


def read_raster(path: str | Path, config: PreprocessConfig) -> tuple[np.ndarray, QCRecord]:
    """Read a PNG/JPEG/TIFF file to float32 ``[0, 1]`` (0 = displayed black); no geometry yet."""
    path = Path(path)
    suffix = path.suffix.lower()
    kind = "tiff" if suffix in TIFF_SUFFIXES else ("jpeg" if suffix in (".jpg", ".jpeg") else "png")
    qc = QCRecord(path=str(path), kind=kind)
    arr, bits = _read_tiff(path, qc) if kind == "tiff" else _read_pil(path, qc)
    arr = _to_gray(arr, path, qc)
    qc.image_key = _file_key(path)
    qc.bits_allocated = int(arr.dtype.itemsize * 8)
    qc.bits_stored = bits
    qc.input_shape = (int(arr.shape[0]), int(arr.shape[1]))
    if config.allowed_views is not None:
        if not config.allow_unknown_view:
            raise ViewRejectedError(path, f"{kind.upper()} files carry no view and allow_unknown_view=False")
        qc.warn("no view information in the file: kept because allow_unknown_view=True")
    x = arr.astype(np.float64)
    if config.voi == "percentile":
        y, qc.window = percentile_window(x, *config.percentile_window)
        qc.voi_source = "percentile"
    else:
        top = float(2**bits - 1)
        if bits >= 16 and arr.max() < 4096:
            qc.warn(f"{bits}-bit container but max value {int(arr.max())}: consider voi='percentile'")
        y = x / top
        qc.voi_source = "dtype_range"
        qc.window = (0.0, top)
    if qc.photometric == "MINISWHITE":
        y = 1.0 - y
        qc.inversion_applied = True
    return np.clip(y, 0.0, 1.0).astype(np.float32), qc
