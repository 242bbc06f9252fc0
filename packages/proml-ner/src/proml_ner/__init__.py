"""proml_ner: few-shot NER with prompt-based metric learning (ProML; Chen, Zheng, Yang, Findings of ACL 2023).

Heavy modules (torch, transformers) load on first use of the names below, so ``import proml_ner`` stays
cheap and never touches a GPU.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import Any

try:
    __version__: str = _version("proml-ner")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+unknown"

_EXPORTS = {
    "ProML": "model",
    "ProMLConfig": "model",
    "ProMLNer": "pipeline",
    "SupportIndex": "pipeline",
    "PrototypeNer": "baselines",
    "BaselineConfig": "baselines",
    "TrainConfig": "train",
    "RunConfig": "experiment",
    "load_run_config": "experiment",
    "evaluate": "train",
    "Episode": "formats",
    "Sentence": "formats",
    "Verbalizer": "verbalizer",
    "sample_episodes": "sampler",
    "synthetic_episodes": "synthetic",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'proml_ner' has no attribute {name!r}")
