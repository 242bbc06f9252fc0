"""The view vocabulary: DICOM ViewPosition and dataset view columns, spelled one way.

:func:`normalise_view` maps what files and adapters carry (``postero-anterior``, ``LAT``, ``ap``) onto the
names that ``PreprocessConfig.allowed_views`` uses (``PA``, ``AP``, ``LATERAL``, ``LL``, ``RL``, ...). It
imports nothing from the package, so the config, the DICOM reader and the dataset adapters share it.
"""

from __future__ import annotations

__all__ = ["LATERAL_VIEWS", "VIEW_ALIASES", "normalise_view"]

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
