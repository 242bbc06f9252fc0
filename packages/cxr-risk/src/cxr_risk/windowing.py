"""Intensity windows onto ``[0, 1]``: the DICOM VOI functions and the robust percentile window.

Shared by both readers: :mod:`cxr_risk.dicom` applies the header's window (or the percentile window when
the file has none) and :mod:`cxr_risk.images` applies the percentile window to PNG/JPEG/TIFF files when
``PreprocessConfig(voi="percentile")``. Inputs are float64 values after the modality LUT; outputs are
float64 in ``[0, 1]`` (``ymin = 0``, ``ymax = 1`` in the formulas of PS3.3 C.11.2.1.2).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["WINDOW_FUNCTIONS", "percentile_window", "window_linear", "window_linear_exact", "window_sigmoid"]


def window_linear(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """VOILUTFunction LINEAR (PS3.3 C.11.2.1.2.1) onto ``[0, 1]``; needs ``width >= 1``."""
    lo = center - 0.5 - (width - 1) / 2
    hi = center - 0.5 + (width - 1) / 2
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) if width > 1 else np.zeros_like(x)
    return np.where(x <= lo, 0.0, np.where(x > hi, 1.0, y))


def window_linear_exact(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """VOILUTFunction LINEAR_EXACT (PS3.3 C.11.2.1.3.2) onto ``[0, 1]``; needs ``width > 0``."""
    y = (x - center) / width + 0.5
    return np.where(x <= center - width / 2, 0.0, np.where(x > center + width / 2, 1.0, y))


def window_sigmoid(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """VOILUTFunction SIGMOID (PS3.3 C.11.2.1.3.1) onto ``[0, 1]``; needs ``width > 0``."""
    return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))


#: VOILUTFunction (PS3.3 C.11.2.1.3) -> the window that implements it.
WINDOW_FUNCTIONS: dict[str, Callable[[np.ndarray, float, float], np.ndarray]] = {
    "LINEAR": window_linear,
    "LINEAR_EXACT": window_linear_exact,
    "SIGMOID": window_sigmoid,
}


def percentile_window(
    x: np.ndarray, low: float, high: float, *, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, tuple[float, float]]:
    """Linear map of the ``low``..``high`` percentiles of ``x`` onto ``[0, 1]``, clipped.

    ``exclude`` (a boolean mask like ``x``, e.g. :func:`cxr_risk.dicom.padding_mask`) leaves those pixels out of the
    percentiles; they are still mapped. With every pixel excluded the output is all 0.
    """
    sample = x if exclude is None else x[~exclude]
    if sample.size == 0:
        return np.zeros_like(x, dtype=np.float64), (0.0, 0.0)
    lo, hi = (float(v) for v in np.percentile(sample, [low, high]))
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float64), (lo, hi)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0), (lo, hi)
