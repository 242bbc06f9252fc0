"""How a radiograph becomes a model input: :class:`PreprocessConfig`, the contract between readers and models.

Every reader (:mod:`cxr_risk.dicom`, :mod:`cxr_risk.images`), the geometry step (:mod:`cxr_risk.geometry`),
the on-disk cache and the checkpoint sidecar take this one frozen dataclass, so it sits below all of them
and imports only the view vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

from .views import normalise_view

__all__ = ["PIPELINE_VERSION", "PreprocessConfig"]

# Bumped whenever the pixels produced for a given config change, so stale caches are not reused.
PIPELINE_VERSION = 2


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
