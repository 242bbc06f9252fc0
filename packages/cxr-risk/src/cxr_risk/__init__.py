"""cxr_risk: mortality-risk prediction from chest radiographs (see README.md).

Data layer: :func:`read_image` turns a DICOM/PNG/JPEG/TIFF radiograph into a float32 ``(H, W)`` image in
``[0, 1]`` (0 = displayed black, 1 = displayed white) with a :class:`QCRecord`; :class:`Cohort` holds a
validated follow-up table; :func:`patient_split`, :func:`kfold` and :func:`label_fraction_subsets` split it
by patient; :class:`CachedImageDataset` serves it to torch from a preprocessed on-disk cache;
:mod:`cxr_risk.synth` writes synthetic cohorts with a known pixel hazard.
"""

from . import adapters, synth
from ._version import __version__
from .cache import CachedImageDataset, ImageCache
from .cohort import Cohort, CohortError, kfold, label_fraction_subsets, patient_split
from .config import PreprocessConfig
from .preprocess import read_image, read_images
from .qc import (
    ImageReadError,
    MissingDecoderError,
    QCRecord,
    UnsupportedImageError,
    ViewRejectedError,
    image_key,
)

# Model-side names import timm and the training stack: resolved on first use, so that reading images
# and cohorts stays light.
_LAZY = {
    "BackboneConfig": "backbones",
    "RiskModel": "backbones",
    "SurvivalConfig": "survival",
    "TrainConfig": "trainer",
    "Trainer": "trainer",
    "load_risk_model": "predict",
    "predict_cohort": "predict",
    "predict_images": "predict",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BackboneConfig",
    "CachedImageDataset",
    "Cohort",
    "CohortError",
    "ImageCache",
    "ImageReadError",
    "MissingDecoderError",
    "PreprocessConfig",
    "QCRecord",
    "RiskModel",
    "SurvivalConfig",
    "TrainConfig",
    "Trainer",
    "UnsupportedImageError",
    "ViewRejectedError",
    "__version__",
    "adapters",
    "image_key",
    "kfold",
    "label_fraction_subsets",
    "load_risk_model",
    "patient_split",
    "predict_cohort",
    "predict_images",
    "read_image",
    "read_images",
    "synth",
]
