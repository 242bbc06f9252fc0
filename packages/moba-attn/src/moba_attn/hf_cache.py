"""A transformers KV cache that keeps MoBA's key block means up to date as it grows.

MoBA's gate scores each query against the mean key of every earlier block (Lu et al. 2025, Sec. 2.2).
With transformers' default ``DynamicCache`` the attention function only sees the concatenated keys,
so every decode step recomputes all block means: a read of the whole key cache per layer and step,
which is more memory traffic than the sparse attention itself once ``T >> topk * block_size``.
:class:`MoBACache` is a ``DynamicCache`` whose layers carry a :class:`moba_attn.KeyBlockMeans`: each
step folds in only the new keys (``O(new tokens)``), and the attention function hands the running
means to the op. Results are the same either way (tested); this is purely a decode-speed path.

Usage::

    cache = MoBACache(config=model.config)
    model.generate(ids, past_key_values=cache, max_new_tokens=256)

Any cache edit that is not an append (crop for assisted decoding, beam reordering, batch selection,
reset, offloading) drops the running means; the next call rebuilds them from the cached keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer

from .block_means import KeyBlockMeans

__all__ = ["MoBACache", "MoBACacheLayer"]

# Attribute set on the key tensor a layer returns from ``update``: the attention function receives
# exactly that tensor, so this is how it finds the layer (transformers passes it no cache object).
LAYER_ATTR = "_moba_cache_layer"


class MoBACacheLayer(DynamicLayer):
    """``DynamicLayer`` plus running key block sums for MoBA's gate.

    ``block_means`` has folded in the first ``means_seen`` cache slots (padded positions, ``[B, S]``
    layout); the attention function appends the rest, unpadded with the call's padding mask.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.block_means: KeyBlockMeans | None = None
        self.means_seen = 0
        self._buffers: tuple[Tensor, Tensor] | None = None  # [B, H, capacity, D] key and value storage

    def invalidate_means(self) -> None:
        self.block_means = None
        self.means_seen = 0

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Append in place into storage that grows by half its size when full.

        ``DynamicLayer`` concatenates the whole cache with the new tokens every step: a copy of the
        cache per layer and step, which costs more than MoBA's sparse read of it. Here ``keys`` and
        ``values`` are views of the filled prefix of a larger buffer, so a step writes only the new
        tokens (growth copies amortise to O(1) per token). Any edit that replaces ``keys`` (crop,
        beam reorder, batch selection, offload) is detected and the buffer is rebuilt from it.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        buf = self._buffers
        if buf is not None and (
            self.keys.data_ptr() != buf[0].data_ptr()
            or self.values.data_ptr() != buf[1].data_ptr()
            or self.keys.shape[:2] != key_states.shape[:2]
        ):
            buf = None  # keys/values were replaced (copying crop, beam reorder, batch edit, offload)
        n_old = self.keys.shape[-2] if self.keys.numel() else 0
        n_new = n_old + key_states.shape[-2]
        if buf is None or n_new > buf[0].shape[-2]:
            capacity = max(n_new + n_new // 2, 256)
            grown = []
            for old, new in ((self.keys, key_states), (self.values, value_states)):
                b = new.new_empty(*new.shape[:2], capacity, new.shape[-1])
                if n_old:
                    b[:, :, :n_old] = old
                grown.append(b)
            buf = self._buffers = (grown[0], grown[1])
        buf[0][:, :, n_old:n_new] = key_states
        buf[1][:, :, n_old:n_new] = value_states
        self.keys, self.values = buf[0][:, :, :n_new], buf[1][:, :, :n_new]
        setattr(self.keys, LAYER_ATTR, self)
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self._buffers = None
        self.invalidate_means()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.invalidate_means()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.invalidate_means()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.invalidate_means()

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        self.invalidate_means()

    def offload(self) -> None:
        super().offload()
        self.invalidate_means()


class MoBACache(DynamicCache):
    """``DynamicCache`` whose full-attention layers are :class:`MoBACacheLayer` (sliding ones unchanged)."""

    def __init__(self, config: Any = None, **kwargs: Any) -> None:
        super().__init__(config=config, **kwargs)
        if self.layer_class_to_replicate is DynamicLayer:
            self.layer_class_to_replicate = MoBACacheLayer
        self.layers = [MoBACacheLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]


def cached_block_means(
    key: Tensor,
    k_packed: Callable[[], Tensor],
    mask_k: Tensor | None,
    cu_k: Tensor,
    block_size: int,
) -> KeyBlockMeans | None:
    """The running block means of the cache layer that produced ``key`` (``[B, Hkv, S, D]``), or None.

    Brings them up to date with the slots appended since the last call. ``k_packed``/``cu_k`` are this
    call's unpadded keys (a callable: built only when the means are rebuilt); ``mask_k`` is the ``[B, S]`` padding mask (``None``: no padding). Returns
    ``None`` when ``key`` did not come from a :class:`MoBACacheLayer`.
    """
    layer = getattr(key, LAYER_ATTR, None)
    if not isinstance(layer, MoBACacheLayer) or layer.keys is not key:
        return None
    batch, s_k = key.shape[0], key.shape[2]
    means = layer.block_means
    seen = layer.means_seen
    if means is None or means.block_size != block_size or means.n_seq != batch or seen > s_k:
        layer.block_means = KeyBlockMeans.from_keys(k_packed(), block_size, cu_k)
        layer.means_seen = s_k
        return layer.block_means
    if seen < s_k:
        new = key[:, :, seen:].transpose(1, 2)  # [B, S_new, Hkv, D]
        if mask_k is None:
            counts = torch.full((batch,), s_k - seen, dtype=torch.int64, device=key.device)
            new = new.reshape(-1, *new.shape[2:])
        else:
            m = mask_k[:, seen:]
            counts = m.sum(1)
            new = new[m]
        cu_new = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        means.append(new, cu_new)
        layer.means_seen = s_k
    return means


_GENERATE_HOOKED: list[bool] = []


def use_moba_cache_in_generate(attn_names: Callable[[], set[str]]) -> None:
    """Make ``generate()`` build a :class:`MoBACache` instead of a ``DynamicCache`` for MoBA models.

    transformers creates the default cache in ``GenerationMixin._prepare_cache_for_generation`` and
    offers no hook for a custom cache class, so this wraps that method once per process. The wrapper
    only acts when generate itself created a plain ``DynamicCache`` (no cache passed by the caller, no
    ``cache_implementation`` other than ``"dynamic"``) for a model whose attention implementation is one
    of ``attn_names()``; anything else is left untouched. Pass ``past_key_values=DynamicCache(...)`` to
    opt out. Without it every decode step would recompute all key block means: a read of the whole key
    cache per layer and step (results are the same, see the module docstring).
    """
    if _GENERATE_HOOKED:
        return
    from transformers.generation.utils import GenerationMixin

    original = getattr(GenerationMixin, "_prepare_cache_for_generation", None)
    if original is None:  # a transformers without this method: keep the default cache
        return

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        given = model_kwargs.get("past_key_values") is not None
        result = original(self, generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        impl = getattr(getattr(self, "config", None), "_attn_implementation", None)
        if (
            not given
            and type(cache) is DynamicCache
            and getattr(generation_config, "cache_implementation", None) in (None, "dynamic")
            and impl in attn_names()
        ):
            model_kwargs["past_key_values"] = MoBACache(config=self.config.get_text_config(decoder=True))
        return result

    _prepare_cache_for_generation.__wrapped__ = original  # type: ignore[attr-defined]
    GenerationMixin._prepare_cache_for_generation = _prepare_cache_for_generation
    _GENERATE_HOOKED.append(True)
