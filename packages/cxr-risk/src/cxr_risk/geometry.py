"""Geometry after the intensity pipeline: border trim, resampling to mm per pixel, fixed output size.

Order: trim flat borders (collimator shadow, film edge, padding) -> resample to
``PreprocessConfig.mm_per_pixel`` using the spacing the reader found (PixelSpacing, else
ImagerPixelSpacing corrected by the magnification factor) -> fit to ``PreprocessConfig.size`` by
padding, cropping or stretching. Resizing uses Pillow's antialiased bilinear filter on float32 ("F")
images, so values stay inside ``[0, 1]``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .config import PreprocessConfig
from .qc import QCRecord


def resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Antialiased bilinear resize of a float32 ``(H, W)`` image to ``shape`` = (rows, columns)."""
    if tuple(image.shape) == tuple(shape):
        return image.astype(np.float32, copy=False)
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F")
    out = pil.resize((int(shape[1]), int(shape[0])), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float32)


def trim_box(image: np.ndarray, threshold: float, max_fraction: float) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) bounds, exclusive at the end, after dropping flat border lines.

    A border row or column is flat when its standard deviation is below ``threshold``; at most
    ``max_fraction`` of the rows (columns) is removed from each side, so a nearly blank image is not
    trimmed away entirely.
    """
    rows, cols = image.shape
    row_flat = image.std(axis=1) < threshold
    col_flat = image.std(axis=0) < threshold

    def run(flat: np.ndarray, limit: int) -> int:
        not_flat = np.flatnonzero(~flat[:limit])
        return int(not_flat[0]) if not_flat.size else limit

    r_lim, c_lim = int(rows * max_fraction), int(cols * max_fraction)
    top = run(row_flat, r_lim)
    bottom = rows - run(row_flat[::-1], r_lim)
    left = run(col_flat, c_lim)
    right = cols - run(col_flat[::-1], c_lim)
    return top, bottom, left, right


def resample_to_spacing(
    image: np.ndarray, spacing_mm: tuple[float, float], mm_per_pixel: float
) -> np.ndarray:
    """Resample so that one pixel is ``mm_per_pixel`` mm along both axes."""
    rows = max(1, round(image.shape[0] * spacing_mm[0] / mm_per_pixel))
    cols = max(1, round(image.shape[1] * spacing_mm[1] / mm_per_pixel))
    return resize(image, (rows, cols))


def fit(image: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """Fit to ``size`` = (H, W): ``"pad"`` (letterbox with 0), ``"crop"`` (fill, centre crop), ``"stretch"``."""
    height, width = size
    if mode == "stretch":
        return resize(image, (height, width))
    rows, cols = image.shape
    scale = min(height / rows, width / cols) if mode == "pad" else max(height / rows, width / cols)
    new = (
        min(height, max(1, round(rows * scale))) if mode == "pad" else max(height, round(rows * scale)),
        min(width, max(1, round(cols * scale))) if mode == "pad" else max(width, round(cols * scale)),
    )
    scaled = resize(image, new)
    if mode == "pad":
        out = np.zeros((height, width), dtype=np.float32)
        top, left = (height - new[0]) // 2, (width - new[1]) // 2
        out[top : top + new[0], left : left + new[1]] = scaled
        return out
    top, left = (new[0] - height) // 2, (new[1] - width) // 2
    return np.ascontiguousarray(scaled[top : top + height, left : left + width])


def apply_geometry(image: np.ndarray, qc: QCRecord, config: PreprocessConfig) -> np.ndarray:
    """Trim, resample and fit ``image`` per ``config``; records the trim box and output shape in ``qc``."""
    if config.trim:
        top, bottom, left, right = trim_box(image, config.trim_threshold, config.trim_max_fraction)
        qc.trim_box = (top, bottom, left, right)
        image = image[top:bottom, left:right]
    if config.mm_per_pixel is not None:
        if qc.pixel_spacing_mm is None:
            qc.warn("mm_per_pixel set but the pixel spacing is unknown: not resampled")
        else:
            image = resample_to_spacing(image, qc.pixel_spacing_mm, config.mm_per_pixel)
    if config.size is not None:
        image = fit(image, config.size, config.fit)
    image = np.clip(image, 0.0, 1.0).astype(np.float32, copy=False)
    qc.output_shape = (int(image.shape[0]), int(image.shape[1]))
    return image
