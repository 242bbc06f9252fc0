"""Hugging Face transformers drop-in: MoBA as an ``attn_implementation``.

MoBA (Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs") is designed to replace
full attention in a pretrained model without new parameters (section 2.2): the gate is parameter-free,
so the same weights can run with either attention, and the paper trains its 1M-context model with a
MoBA/full hybrid schedule and keeps the last layers on full attention (section 3.1). This module plugs
the op into transformers' two extension points instead of patching model code:

* ``AttentionInterface``: the attention function that every model's attention module calls with
  ``query/key/value`` as ``[B, H, S, D]`` (keys already concatenated with the KV cache).
* ``AttentionMaskInterface``: the mask builder. Without it, a custom attention function receives
  ``attention_mask=None`` even for padded batches; ours returns the 2D ``[B, S_k]`` padding mask (or
  ``None`` when nothing is padded), which the attention function unpads to varlen ``cu_seqlens``.

Usage::

    from moba_attn import MoBAConfig, register_moba, set_moba_config

    register_moba()                                          # once per process
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="moba")
    set_moba_config(model, MoBAConfig(block_size=512, topk=3, full_attention_layers=(-3, -2, -1)))
    ...
    use_moba(model, False)    # full attention (SDPA) for the last stretch of a hybrid schedule

The MoBA configuration lives in ``model.config.moba_config`` (a plain dict), so it survives
``save_pretrained``/``from_pretrained``. ``torch.compile(model, fullgraph=True)`` compiles without
graph breaks: under compile each attention call is one custom op (:mod:`moba_attn.hf_op`). Tested
against transformers 5.x.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .hf_op import hf_attention
from .op import BACKENDS

__all__ = [
    "MOBA_CONFIG_KEY",
    "MoBAAttention",
    "MoBAConfig",
    "get_moba_config",
    "moba_attention_mask",
    "register_moba",
    "set_moba_config",
    "use_moba",
]

#: Attribute of ``model.config`` that holds the MoBA settings (a JSON-serialisable dict).
MOBA_CONFIG_KEY = "moba_config"

_BACKENDS = ("auto", *BACKENDS)


@dataclass
class MoBAConfig:
    """MoBA settings for a transformers model.

    Args:
        block_size: tokens per key block (paper: 512 for 8K-32K training, 4096 for 1M).
        topk: blocks each query attends, counting its own block (paper: 3 and 12).
        full_attention_layers: decoder layer indices that keep full causal attention (SDPA, or
            flash-attn varlen on CUDA when installed). Negative indices count from the end, so
            ``(-3, -2, -1)`` is the paper's "last three layers full" hybrid (section 3.1).
        backend: MoBA op backend (``"auto"`` or one of :data:`moba_attn.op.BACKENDS`).
        sink_blocks: leading key blocks of every sequence that each later query always attends; they
            take slots of ``topk`` (own block + ``sink_blocks`` + ``topk - 1 - sink_blocks`` routed),
            so the number of keys attended is unchanged. ``0`` is the paper's MoBA and the default for
            training. On a pretrained checkpoint switched to MoBA without training use ``1``: such
            models park attention on their first tokens (an attention sink), and on SmolLM2-135M at 8K
            tokens plain MoBA (block 512, top-3) costs about +49 % perplexity and ``sink_blocks=1``
            about +4 % (README, "On a pretrained model").
    """

    block_size: int = 512
    topk: int = 3
    full_attention_layers: tuple[int, ...] = field(default_factory=tuple)
    backend: str = "auto"
    sink_blocks: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"MoBAConfig: block_size={self.block_size!r} must be a positive int (e.g. 512)")
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            raise ValueError(
                f"MoBAConfig: topk={self.topk!r} must be a positive int; it counts the query's own block"
            )
        if (
            isinstance(self.sink_blocks, bool)
            or not isinstance(self.sink_blocks, int)
            or self.sink_blocks < 0
        ):
            raise ValueError(f"MoBAConfig: sink_blocks={self.sink_blocks!r} must be an int >= 0 (e.g. 1)")
        if self.sink_blocks > self.topk - 1:
            raise ValueError(
                f"MoBAConfig: sink_blocks={self.sink_blocks} needs topk >= {self.sink_blocks + 1}: sink blocks "
                f"take slots of topk, which also counts the query's own block (got topk={self.topk})"
            )
        if self.backend not in _BACKENDS:
            raise ValueError(f"MoBAConfig: backend={self.backend!r} is not one of {_BACKENDS}")
        layers = self.full_attention_layers
        if isinstance(layers, int) or not isinstance(layers, Sequence):
            raise ValueError(
                f"MoBAConfig: full_attention_layers={layers!r} must be a sequence of layer indices, e.g. (-3, -2, -1)"
            )
        if any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
            raise ValueError(f"MoBAConfig: full_attention_layers={layers!r} must hold ints")
        self.full_attention_layers = tuple(layers)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["full_attention_layers"] = list(self.full_attention_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoBAConfig:
        unknown = set(d) - {"block_size", "topk", "full_attention_layers", "backend", "sink_blocks"}
        if unknown:
            raise ValueError(f"MoBAConfig.from_dict: unknown keys {sorted(unknown)}")
        d = dict(d)
        if "full_attention_layers" in d:
            d["full_attention_layers"] = tuple(d["full_attention_layers"])
        return cls(**d)

    def is_full_layer(self, layer_idx: int | None, num_layers: int | None) -> bool:
        """Whether decoder layer ``layer_idx`` keeps full attention (negative entries need ``num_layers``)."""
        if layer_idx is None or not self.full_attention_layers:
            return False
        for i in self.full_attention_layers:
            if i < 0:
                if num_layers is None:
                    raise ValueError(
                        f"MoBAConfig: full_attention_layers has negative index {i} but the model config has no "
                        "num_hidden_layers; give non-negative layer indices"
                    )
                i += num_layers
            if i == layer_idx:
                return True
        return False


def set_moba_config(model: Any, config: MoBAConfig) -> None:
    """Store ``config`` in ``model.config`` so that ``save_pretrained`` writes it to ``config.json``."""
    if not isinstance(config, MoBAConfig):
        raise TypeError(f"set_moba_config: config must be a MoBAConfig, got {type(config).__name__}")
    target = getattr(model, "config", model)
    setattr(target, MOBA_CONFIG_KEY, config.to_dict())
    text_config = getattr(target, "get_text_config", None)
    if callable(text_config):
        sub = text_config()
        if sub is not target:
            setattr(sub, MOBA_CONFIG_KEY, config.to_dict())


def get_moba_config(model_or_config: Any) -> MoBAConfig | None:
    """The ``MoBAConfig`` stored in a model (or its config), or ``None``."""
    cfg = getattr(model_or_config, "config", model_or_config)
    d = getattr(cfg, MOBA_CONFIG_KEY, None)
    if d is None:
        return None
    return d if isinstance(d, MoBAConfig) else MoBAConfig.from_dict(d)


def moba_attention_mask(
    *, kv_length: int, attention_mask: Tensor | None = None, **kwargs: Any
) -> Tensor | None:
    """Mask builder registered in ``AttentionMaskInterface`` under ``"moba"``.

    MoBA works on unpadded varlen sequences, like flash-attn: all it needs is the 2D boolean padding
    mask ``[B, S]`` (``True`` = real token), or ``None`` when nothing is padded. Causality is part of
    the op; packed sequences arrive through ``position_ids``/``cu_seq_lens_*`` instead. transformers
    calls mask builders with keywords; the rest (``batch_size``, ``q_length``, ``mask_function``, ...)
    is not needed here.

    The mask covers ``kv_offset + kv_length`` slots: for a sliding-window cache layer ``kv_offset``
    slots have already been dropped, and the attention function needs to see them to tell dropped
    padding (harmless) from dropped tokens (an error, see ``_check_sliding_window``).

    Under ``torch.compile`` the mask is returned even when nothing is padded: testing that would be a
    data-dependent branch (a graph break); the compiled op treats an all-true mask as no padding.
    """
    if attention_mask is None:
        return None
    if attention_mask.ndim != 2:  # a prepared 4D mask never reaches a mask interface
        raise ValueError(f"moba: expected a 2D padding mask, got shape {tuple(attention_mask.shape)}")
    kv_offset = kwargs.get("kv_offset")
    slots = kv_length + (kv_offset if isinstance(kv_offset, int) else 0)
    attention_mask = attention_mask[:, -slots:].to(torch.bool)
    if torch.compiler.is_compiling():
        return attention_mask
    if attention_mask.shape[1] == slots and bool(attention_mask.all()):
        return None
    return attention_mask


def _check_sliding_window(
    name: str, window: int | None, s_k: int, attention_mask: Tensor | None, position_ids: Tensor | None
) -> Tensor | None:
    """Raise unless a sliding window covers every position seen so far; return the mask cut to the keys.

    MoBA attends the whole causal context (its own block plus routed earlier blocks), so a window is
    only honoured when it is at least the context: then sliding-window and full attention agree. The
    context is read from the absolute positions (``position_ids``, which transformers derives from the
    padding mask in padded batches), not from the number of keys: transformers' sliding-window cache
    layers keep only the last ``window - 1`` keys, so in ``generate()`` the keys never outnumber the
    window while positions keep growing. A mask longer than the keys means the cache dropped slots;
    that is fine only if they were all padding.
    """
    if window is None:
        return attention_mask
    if attention_mask is not None and attention_mask.shape[1] > s_k:
        dropped = attention_mask[:, : attention_mask.shape[1] - s_k]
        if bool(dropped.any()):
            _raise_window(name, window, int(attention_mask.sum(1).max()), s_k)
        attention_mask = attention_mask[:, -s_k:]
    if position_ids is not None and position_ids.numel():
        seen = int(position_ids.max()) + 1
    elif attention_mask is not None:
        seen = int(attention_mask.sum(1).max())
    else:
        seen = s_k
    if window < seen:
        _raise_window(name, window, seen, s_k)
    return attention_mask


def _raise_window(name: str, window: int, seen: int, s_k: int) -> None:
    raise ValueError(
        f"moba: {name} has sliding_window={window} but the sequence has reached {seen} positions ({s_k} keys "
        "in this call); MoBA attends the whole causal context, so it cannot honour a window shorter than it, "
        "and transformers' sliding-window cache would already have dropped the oldest keys. Set "
        "config.sliding_window=None (Qwen2: use_sliding_window=False) or a window >= the context length, or "
        'keep these layers on dense attention: attn_implementation="sdpa" (which implements the window)'
    )


@dataclass
class _Varlen:
    """Unpadded layout of a call: which rows of the flattened ``[B*S]`` inputs are real tokens."""

    cu_q: Tensor
    cu_k: Tensor
    idx_q: Tensor | None  # None: every query row is real (no unpadding needed)
    idx_k: Tensor | None
    same_lengths: bool  # every sequence has as many queries as keys
    mask_k: Tensor | None = None  # [B, S_k] padding mask, when there is padding


def _cu(lengths: Tensor) -> Tensor:
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def _varlen_layout(
    batch: int, s_q: int, s_k: int, attention_mask: Tensor | None, kwargs: dict[str, Any]
) -> _Varlen:
    dev = kwargs["_device"]
    cu_q_kw, cu_k_kw = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if attention_mask is not None:
        if attention_mask.ndim != 2:
            raise ValueError(
                f"moba: attention_mask of shape {tuple(attention_mask.shape)} is not a 2D padding mask; "
                'register the MoBA mask builder with moba_attn.register_moba() and load the model with attn_implementation="moba"'
            )
        if attention_mask.shape != (batch, s_k):
            raise ValueError(
                f"moba: attention_mask shape {tuple(attention_mask.shape)} does not match keys [B={batch}, S_k={s_k}]; "
                "static caches are not supported, use the default DynamicCache or a MoBACache"
            )
        mask_k = attention_mask.to(torch.bool)
        # Queries are the last S_q cache slots, so each sequence's real queries are the last len_q of its real keys.
        mask_q = mask_k[:, -s_q:]
        len_q, len_k = mask_q.sum(1), mask_k.sum(1)
        return _Varlen(
            cu_q=_cu(len_q),
            cu_k=_cu(len_k),
            idx_q=mask_q.reshape(-1).nonzero().squeeze(1),
            idx_k=mask_k.reshape(-1).nonzero().squeeze(1),
            same_lengths=bool((len_q == len_k).all()),
            mask_k=mask_k,
        )
    if cu_q_kw is not None or cu_k_kw is not None:
        if batch != 1:
            raise ValueError(f"moba: cu_seq_lens_q/k need sequences packed into batch size 1, got B={batch}")
        cu_q = (cu_q_kw if cu_q_kw is not None else cu_k_kw).to(device=dev, dtype=torch.int32)
        cu_k = (cu_k_kw if cu_k_kw is not None else cu_q_kw).to(device=dev, dtype=torch.int32)
        if int(cu_q[-1]) != s_q or int(cu_k[-1]) != s_k:
            raise ValueError(
                f"moba: cu_seq_lens_q[-1]={int(cu_q[-1])} / cu_seq_lens_k[-1]={int(cu_k[-1])} must equal "
                f"S_q={s_q} / S_k={s_k}"
            )
        return _Varlen(cu_q, cu_k, None, None, bool(torch.equal(cu_q, cu_k)))
    position_ids = kwargs.get("position_ids")
    if batch == 1 and s_q == s_k and s_q > 1 and position_ids is not None:
        pos = position_ids.reshape(-1)
        if pos.numel() == s_q:
            # Packed sequences (transformers' convention): positions restart where a new sequence begins.
            starts = torch.ones_like(pos, dtype=torch.bool)
            starts[1:] = pos[1:] != pos[:-1] + 1
            if bool(starts[1:].any()):
                cu = torch.cat([starts.nonzero().squeeze(1), pos.new_tensor([s_q])]).to(dev, torch.int32)
                return _Varlen(cu, cu, None, None, True)
    arange = torch.arange(batch + 1, device=dev, dtype=torch.int32)
    return _Varlen(arange * s_q, arange * s_k, None, None, s_q == s_k)


def _full_attention(q: Tensor, k: Tensor, v: Tensor, lay: _Varlen, scale: float) -> Tensor:
    """Full causal attention on varlen ``[T, H, D]`` inputs (the hybrid's full layers).

    flash-attn varlen on CUDA in fp16/bf16 when installed; otherwise SDPA per sequence (bottom-right
    causal alignment when a sequence has fewer queries than keys, as in decoding). GQA is handled by
    SDPA's ``enable_gqa``, without copying K/V.
    """
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            flash_attn_varlen_func = None
        if flash_attn_varlen_func is not None:
            return flash_attn_varlen_func(
                q,
                k,
                v,
                lay.cu_q,
                lay.cu_k,
                int((lay.cu_q[1:] - lay.cu_q[:-1]).max()),
                int((lay.cu_k[1:] - lay.cu_k[:-1]).max()),
                softmax_scale=scale,
                causal=True,
            )
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    bounds = zip(lay.cu_q[:-1].tolist(), lay.cu_q[1:].tolist(), lay.cu_k[:-1].tolist(), lay.cu_k[1:].tolist())
    for a, b, c, d in bounds:
        lq, lk = b - a, d - c
        if lq == 0:
            continue
        qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (q[a:b], k[c:d], v[c:d]))
        mask = None
        causal = lq > 1
        if 1 < lq < lk:  # chunked prefill: query i sits at key position lk - lq + i
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
            causal = False
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
        )
        out[a:b] = o.squeeze(0).transpose(0, 1)
    return out


class MoBAAttention:
    """The attention function registered in transformers' ``AttentionInterface`` under ``"moba"``.

    Called by every attention module as ``fn(module, query, key, value, attention_mask, scaling=...,
    dropout=..., **kwargs)`` with ``query [B, Hq, S_q, D]`` and ``key/value [B, Hkv, S_k, D]`` (the KV
    cache already appended, so ``S_k >= S_q``), and returns ``([B, S_q, Hq, D], None)``.

    Padding is removed (varlen, ``cu_seqlens``), packed sequences are split by ``cu_seq_lens_*`` or by
    restarting ``position_ids``, and a call with fewer queries than keys (decode, chunked prefill)
    runs the op's sparse decode path with ``cu_seqlens_k``: each sequence's queries are its last
    ``len_q`` keys. Layers listed in ``full_attention_layers`` run full causal attention instead.

    The MoBA settings come from ``module.config.moba_config`` when the model carries one, else from
    the ``default`` given here (``register_moba(config)``).

    A sliding window (Mistral, Qwen2's ``use_sliding_window``, Gemma's local layers) is accepted only
    while it covers every position seen so far, where sliding-window attention is full attention;
    beyond that, a forward, a chunked prefill or a ``generate()`` step raises, because MoBA attends
    the whole context and transformers' sliding-window cache layers have already dropped keys.

    Under ``torch.compile`` the call is one custom op, ``moba_attn::hf_attention``
    (:mod:`moba_attn.hf_op`), so ``fullgraph=True`` works; its backward recomputes the attention
    forward, and a :class:`~moba_attn.MoBACache`'s running block means are not used (recomputed from
    the keys, same result). Eager calls run the same code directly.
    """

    def __init__(self, default: MoBAConfig | None = None) -> None:
        self.default = default if default is not None else MoBAConfig()

    def config_for(self, module: torch.nn.Module) -> MoBAConfig:
        cfg = getattr(module, "config", None)
        stored = get_moba_config(cfg) if cfg is not None else None
        return stored if stored is not None else self.default

    def __call__(
        self,
        module: torch.nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        sliding_window: int | None = None,
        softcap: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        name = type(module).__name__
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if not causal:
            raise ValueError(
                f"moba: {name} is not causal (is_causal=False); MoBA is defined for causal self-attention only. "
                'Load this model with attn_implementation="sdpa" or keep this module on full attention'
            )
        if softcap is not None:
            raise ValueError(
                f"moba: {name} uses attention logit softcapping (softcap={softcap}), which MoBA does not "
                'implement; use attn_implementation="sdpa"/"eager" for this model'
            )
        if kwargs.get("s_aux") is not None:
            raise ValueError(f"moba: {name} uses attention sinks (s_aux), which MoBA does not implement")
        if dropout and dropout > 0.0:
            raise ValueError(
                f"moba: attention dropout={dropout} is not supported; set the model's attention_dropout to 0.0"
            )
        if query.shape[-1] != value.shape[-1]:
            raise ValueError(
                f"moba: query head dim {query.shape[-1]} != value head dim {value.shape[-1]} is not supported"
            )
        if kwargs.get("output_attentions", False):
            raise ValueError("moba: output_attentions=True needs attn_implementation='eager'")
        h_q, dim, h_k = query.shape[1], query.shape[3], key.shape[1]
        if h_q % h_k:
            raise ValueError(f"moba: query heads {h_q} must be a multiple of key/value heads {h_k}")
        scale = scaling if scaling is not None else 1.0 / math.sqrt(dim)
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is not None:
            name = f"{name} (layer {layer_idx})"
        cfg = self.config_for(module)
        full_layer = cfg.is_full_layer(
            layer_idx, getattr(getattr(module, "config", None), "num_hidden_layers", None)
        )
        position_ids = kwargs.get("position_ids")
        if position_ids is None:  # transformers versions that pass cache_position instead
            position_ids = kwargs.get("cache_position")
        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        if torch.compiler.is_compiling():
            # One opaque op: the host-side planning below would break the graph (see moba_attn.hf_op).
            out = hf_attention(
                query, key, value, attention_mask, position_ids, cu_q, cu_k,
                cfg.block_size, cfg.topk, cfg.sink_blocks, float(scale), full_layer, cfg.backend,
                -1 if sliding_window is None else int(sliding_window), name,
            )  # fmt: skip
            return out, None
        attention_mask = _check_sliding_window(
            name, sliding_window, key.shape[2], attention_mask, position_ids
        )
        out = _attend(
            query,
            key,
            value,
            attention_mask,
            position_ids=position_ids,
            cu_seq_lens_q=cu_q,
            cu_seq_lens_k=cu_k,
            block_size=cfg.block_size,
            topk=cfg.topk,
            sink_blocks=cfg.sink_blocks,
            scale=scale,
            full_layer=full_layer,
            backend=cfg.backend,
            cache_keys=key,
        )
        return out, None


def _attend(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    *,
    position_ids: Tensor | None,
    cu_seq_lens_q: Tensor | None,
    cu_seq_lens_k: Tensor | None,
    block_size: int,
    topk: int,
    sink_blocks: int,
    scale: float,
    full_layer: bool,
    backend: str,
    cache_keys: Tensor | None = None,
) -> Tensor:
    """One attention call on ``[B, H, S, D]`` inputs: unpad, run MoBA (or full attention), re-pad.

    Returns ``[B, S_q, Hq, D]`` with zeros at padded query rows. ``cache_keys`` is the key tensor
    as a :class:`~moba_attn.MoBACache` layer returned it (its running block means); the compiled
    path passes ``None`` and the means are recomputed from the keys.
    """
    batch, h_q, s_q, dim = query.shape
    h_k, s_k = key.shape[1], key.shape[2]
    layout_kwargs = {
        "_device": query.device,
        "position_ids": position_ids,
        "cu_seq_lens_q": cu_seq_lens_q,
        "cu_seq_lens_k": cu_seq_lens_k,
    }
    lay = _varlen_layout(batch, s_q, s_k, attention_mask, layout_kwargs)
    rows = _row_spans(lay, batch, s_q, s_k) if s_q < s_k else None
    if rows is not None:
        return _attend_rows(
            query, key, value, rows, lay.mask_k, block_size=block_size, topk=topk, sink_blocks=sink_blocks,
            scale=scale, full_layer=full_layer, backend=backend, cache_keys=cache_keys,
        )  # fmt: skip
    q = query.transpose(1, 2).reshape(batch * s_q, h_q, dim)
    k = key.transpose(1, 2).reshape(batch * s_k, h_k, dim)
    v = value.transpose(1, 2).reshape(batch * s_k, h_k, dim)
    if lay.idx_q is not None:
        q, k, v = q[lay.idx_q], k[lay.idx_k], v[lay.idx_k]

    if full_layer:
        out = _full_attention(q, k, v, lay, scale)
    else:
        from . import moba_attention  # the op; imported late so this module loads without it

        block_means = None
        if cache_keys is not None and hasattr(cache_keys, "_moba_cache_layer"):
            # keys from a MoBACache: running block means, O(new) a step
            from .hf_cache import cached_block_means

            block_means = cached_block_means(cache_keys, lambda: k, lay.mask_k, lay.cu_k, block_size)
        out = moba_attention(
            q=q,
            k=k,
            v=v,
            block_size=block_size,
            topk=topk,
            cu_seqlens=lay.cu_q,
            cu_seqlens_k=None if lay.same_lengths else lay.cu_k,
            scale=scale,
            backend=backend,
            block_means=block_means,
            sink_blocks=sink_blocks,
        )
    if lay.idx_q is not None:
        full = out.new_zeros(batch * s_q, h_q, dim)
        full[lay.idx_q] = out
        out = full
    return out.reshape(batch, s_q, h_q, dim)


def _row_spans(lay: _Varlen, batch: int, s_q: int, s_k: int) -> list[tuple[int, int]] | None:
    """Each batch row's real key slots ``[a, e)`` when every row's are one run (left or right padding).

    A decode step or a chunk (``S_q < S_k``) is then attended row by row on views of the cache, which
    is never copied: flattening ``[B, H, S, D]`` to packed ``[B * S, H, D]`` (or unpadding it) would copy
    the whole cache every step, more memory traffic than the sparse attention itself. ``None``: the
    packed path (packed sequences in one row, or a mask with holes).
    """
    if lay.mask_k is None:
        arange = torch.arange(batch + 1, device=lay.cu_k.device, dtype=lay.cu_k.dtype)
        one_per_row = lay.cu_k.shape == arange.shape and bool((lay.cu_k == arange * s_k).all())
        return [(0, s_k)] * batch if one_per_row else None  # else: packed sequences (cu_seq_lens_*)
    m = lay.mask_k
    lens = m.sum(1)
    first = m.to(torch.int8).argmax(1)
    run = torch.arange(s_k, device=m.device)[None, :]
    contiguous = (m == ((run >= first[:, None]) & (run < (first + lens)[:, None]))).all()
    if not bool(contiguous):
        return None
    return [(int(a), int(a) + int(n)) for a, n in zip(first.tolist(), lens.tolist())]


def _attend_rows(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    rows: list[tuple[int, int]],
    mask_k: Tensor | None,
    *,
    block_size: int,
    topk: int,
    sink_blocks: int,
    scale: float,
    full_layer: bool,
    backend: str,
    cache_keys: Tensor | None,
) -> Tensor:
    """Decode / chunked prefill, one batch row at a time on ``[S, H, D]`` views of the KV cache."""
    from . import moba_attention

    batch, h_q, s_q, dim = query.shape
    s_k = key.shape[2]
    out = query.new_zeros(batch, s_q, h_q, dim)
    means = None
    if not full_layer and cache_keys is not None and hasattr(cache_keys, "_moba_cache_layer"):
        from .hf_cache import cached_block_means

        lens = torch.tensor([e - a for a, e in rows], device=query.device)
        cu_k = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
        packed = lambda: torch.cat([key[b, :, a:e].transpose(0, 1) for b, (a, e) in enumerate(rows)])  # noqa: E731
        kbm = cached_block_means(cache_keys, packed, mask_k, cu_k, block_size)
        if kbm is not None:
            n_blocks = ((lens + block_size - 1) // block_size).tolist()
            means = kbm.means().split(n_blocks)
    for b, (a, e) in enumerate(rows):
        q0 = max(a, s_k - s_q)  # real query slots: the last of the row's real keys
        if e <= q0:
            continue
        q = query[b, :, q0 - (s_k - s_q) : e - (s_k - s_q)].transpose(0, 1)
        k, v = key[b, :, a:e].transpose(0, 1), value[b, :, a:e].transpose(0, 1)
        cu_q = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=query.device)
        cu_k = torch.tensor([0, k.shape[0]], dtype=torch.int32, device=query.device)
        lay = _Varlen(cu_q, cu_k, None, None, q.shape[0] == k.shape[0])
        if full_layer:
            o = _full_attention(q, k, v, lay, scale)
        else:
            o = moba_attention(
                q=q, k=k, v=v, block_size=block_size, topk=topk, cu_seqlens=cu_q, cu_seqlens_k=cu_k, scale=scale,
                backend=backend, block_means=None if means is None else means[b], sink_blocks=sink_blocks,
            )  # fmt: skip
        out[b, q0 - (s_k - s_q) : e - (s_k - s_q)] = o
    return out


_REGISTERED: dict[str, MoBAAttention] = {}


def register_moba(config: MoBAConfig | None = None, name: str = "moba") -> MoBAAttention:
    """Register MoBA with transformers as ``attn_implementation=name`` (idempotent).

    Registers both the attention function (``AttentionInterface``) and the padding-mask builder
    (``AttentionMaskInterface``), and makes ``generate()`` on such a model use a
    :class:`~moba_attn.MoBACache` (running key block means) when the caller passes no cache
    (:func:`moba_attn.hf_cache.use_moba_cache_in_generate`). ``config`` is the default for models whose ``config`` carries no
    ``moba_config``; calling again with a new ``config`` replaces the default.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if config is not None and not isinstance(config, MoBAConfig):
        raise TypeError(f"register_moba: config must be a MoBAConfig or None, got {type(config).__name__}")
    fn = _REGISTERED.get(name)
    if fn is None:
        fn = MoBAAttention(config)
        _REGISTERED[name] = fn
    elif config is not None:
        fn.default = config
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, moba_attention_mask)
    from .hf_cache import use_moba_cache_in_generate

    use_moba_cache_in_generate(lambda: set(_REGISTERED))
    return fn


def use_moba(model: Any, enabled: bool = True, *, full: str = "sdpa", name: str = "moba") -> None:
    """Switch ``model`` between MoBA and full attention, e.g. mid-training (the paper's hybrid schedule).

    Parameters are untouched (MoBA's gate has none), so optimiser state carries over. ``full`` is the
    transformers implementation used while MoBA is off (``"sdpa"``, ``"flash_attention_2"``, ...).
    """
    if enabled:
        register_moba(name=name)
        model.set_attn_implementation(name)
    else:
        model.set_attn_implementation(full)
