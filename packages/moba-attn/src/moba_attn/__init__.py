"""moba_attn: Mixture of Block Attention (Lu et al. 2025, arXiv:2502.13189) for long-context models.

One op, :func:`moba_attention`, with identical semantics on four backends (torch, Triton, flash-attn,
FlexAttention), GQA/MQA, packed varlen batches and sparse decoding; :mod:`moba_attn.reference` is the
readable oracle. ``MoBAAttention``, ``MoBAConfig`` and ``register_moba`` (the transformers drop-in) are
loaded on first use so that importing this package never imports transformers.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import Any

from .block_means import KeyBlockMeans
from .op import available_backends, moba_attention
from .reference import moba_attention_reference

try:
    __version__: str = _version("moba-attn")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# transformers integration, resolved on first access (module name -> exported names)
_LAZY = {
    "hf": ("MoBAAttention", "MoBAConfig", "register_moba", "set_moba_config", "get_moba_config", "use_moba"),
    "hf_cache": ("MoBACache",),
}


def __getattr__(name: str) -> Any:
    for module, names in _LAZY.items():
        if name in names:
            from importlib import import_module

            return getattr(import_module(f".{module}", __name__), name)
    raise AttributeError(f"module 'moba_attn' has no attribute {name!r}")


__all__ = [
    "KeyBlockMeans",
    "MoBAAttention",
    "MoBACache",
    "MoBAConfig",
    "__version__",
    "available_backends",
    "get_moba_config",
    "moba_attention",
    "moba_attention_reference",
    "register_moba",
    "set_moba_config",
    "use_moba",
]
