"""QK-clip (MuonClip; Kimi K2, arXiv 2507.20534, Sec. 2.1): keep every head's attention logits under tau.

Muon trains large models without the attention-logit blow-up being caught by anything: when a head's
largest pre-softmax logit ``S_max^h = max_{i,j} q_i^h . k_j^h * scaling`` seen in the step's forward
passes exceed ``tau``, K2 rescales that head's query and key projections right after the optimizer step,
``W_q^h <- sqrt(gamma_h) W_q^h``, ``W_k^h <- sqrt(gamma_h) W_k^h`` with ``gamma_h = tau / S_max^h``, so the
same inputs would give that head a largest logit of exactly ``tau``. Heads under the threshold are not
touched, and the optimizer state is not either.

Grouped-query attention shares a key head among the ``n`` query heads of its group, so the key cannot be
scaled per query head. Here the key of group ``g`` is scaled by ``s_g = sqrt(min_{h in g} gamma_h)`` and
each query head by ``gamma_h / s_g``: every head's logits are scaled by exactly its own ``gamma_h`` (those
under tau by 1), and with one query head per key head this is K2's ``sqrt(gamma)`` on both. Biases of the
projections are scaled with their rows, since ``q = W x + b`` scales as a whole. Rotary embeddings are a
rotation of q and k, so the logits scale the same way after them.

:func:`qk_clip_` is the maths on plain weight tensors (any model: pass the rows of each head); :class:`QKClip`
records ``S_max^h`` in a Hugging Face transformers model (any attention module with ``q_proj`` / ``k_proj``,
e.g. Llama, Mistral, Qwen2, Mixtral, Gemma) and applies the clip after each optimizer step.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["QKClip", "max_logits", "qk_clip_"]

_PREFIX = "muon_qk_clip|"


@torch.no_grad()
def qk_clip_(
    q_weight: Tensor,
    k_weight: Tensor,
    head_max_logits: Tensor,
    tau: float,
    num_heads: int,
    num_kv_heads: int,
    *,
    q_bias: Tensor | None = None,
    k_bias: Tensor | None = None,
) -> Tensor:
    """Rescale, in place, the query / key projection rows of the heads whose largest logit exceeds ``tau``.

    Args:
        q_weight: ``[num_heads * head_dim, in]`` (a Linear's weight: each head's rows are contiguous).
        k_weight: ``[num_kv_heads * head_dim, in]``.
        head_max_logits: ``[num_heads]``, the largest pre-softmax logit of each query head (scaled by the
            attention's ``scaling``, as softmax sees it).
        tau: the threshold (K2 uses 100 for its 1T model).
        q_bias, k_bias: the projections' biases, scaled with their rows.

    Returns:
        ``gamma``, ``[num_heads]``: each head's logit factor (``min(1, tau / S_max)``; 1 = untouched).
    """
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"qk_clip_: tau={tau!r} must be a positive finite number")
    if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"qk_clip_: num_heads={num_heads} must be a positive multiple of num_kv_heads={num_kv_heads}"
        )
    if q_weight.ndim != 2 or q_weight.shape[0] % num_heads:
        raise ValueError(
            f"qk_clip_: q_weight of shape {tuple(q_weight.shape)} is not [num_heads={num_heads} * head_dim, in]"
        )
    head_dim = q_weight.shape[0] // num_heads
    if k_weight.ndim != 2 or k_weight.shape[0] != num_kv_heads * head_dim:
        raise ValueError(
            f"qk_clip_: k_weight of shape {tuple(k_weight.shape)} is not [num_kv_heads={num_kv_heads} * "
            f"head_dim={head_dim}, in]"
        )
    m = head_max_logits.detach().to(torch.float64).reshape(-1)
    if m.numel() != num_heads:
        raise ValueError(f"qk_clip_: head_max_logits has {m.numel()} entries for {num_heads} heads")
    bad = (~torch.isfinite(m)).nonzero().flatten().tolist()
    if bad:
        raise FloatingPointError(
            f"qk_clip_: the largest logit of head(s) {bad} is not finite: {m[bad].tolist()}"
        )
    for name, bias, rows in (("q_bias", q_bias, q_weight.shape[0]), ("k_bias", k_bias, k_weight.shape[0])):
        if bias is not None and tuple(bias.shape) != (rows,):
            raise ValueError(f"qk_clip_: {name} of shape {tuple(bias.shape)} should be ({rows},)")
    gamma = torch.where(m > tau, tau / m, torch.ones_like(m))
    if bool((gamma == 1).all()):
        return gamma
    group = gamma.view(num_kv_heads, num_heads // num_kv_heads)
    s_k = group.amin(dim=1).sqrt()  # [num_kv_heads]
    s_q = (group / s_k[:, None]).reshape(-1)  # [num_heads]: s_q * s_k = gamma for every head
    for t, s, heads in ((q_weight, s_q, num_heads), (k_weight, s_k, num_kv_heads)):
        t.view(heads, head_dim, -1).mul_(s.to(t.device, t.dtype).view(-1, 1, 1))
    for b, s, heads in ((q_bias, s_q, num_heads), (k_bias, s_k, num_kv_heads)):
        if b is not None:
            b.view(heads, head_dim).mul_(s.to(b.device, b.dtype).view(-1, 1))
    return gamma


@torch.no_grad()
def max_logits(
    query: Tensor,
    key: Tensor,
    scaling: float,
    attention_mask: Tensor | None = None,
    is_causal: bool = False,
) -> Tensor:
    """Per query head, the largest pre-softmax logit ``q . k * scaling`` over the positions attended.

    ``query`` ``[B, H, L, D]``, ``key`` ``[B, Hkv, S, D]`` (grouped heads share keys); ``attention_mask``
    is transformers' 4-D mask, boolean (True = attend) or additive float; with no mask, ``is_causal``
    masks the future (queries aligned to the last ``L`` keys). Computed one key head at a time.
    """
    _, H, L, _ = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    if H % Hkv:
        raise ValueError(f"max_logits: {H} query heads are not a multiple of {Hkv} key heads")
    n = H // Hkv
    causal = None
    if attention_mask is None and is_causal and L > 1:
        causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril(S - L)
    out = []
    for g in range(Hkv):
        s = torch.einsum("bhld,bsd->bhls", query[:, g * n : (g + 1) * n].float(), key[:, g].float()) * scaling
        if attention_mask is not None:
            mask = attention_mask[..., :S]
            s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.float()
        elif causal is not None:
            s = s.masked_fill(~causal, -math.inf)
        out.append(s.amax(dim=(0, 2, 3)))
    return torch.cat(out)


class QKClip:
    """Record each attention head's largest logit in a transformers model and clip after the step.

    ::

        clip = QKClip(model, tau=100.0)
        for batch in data:
            loss = model(**batch).loss; loss.backward()
            opt.step(); opt.zero_grad()
            clip.step()                     # rescales W_q / W_k of heads over tau; returns the maxima

    The maxima are recorded in training-mode forwards (``model.train()``), as a running maximum since the
    last :meth:`step`, through an attention function registered with transformers that measures and then
    calls the model's own implementation (eager or sdpa; the outputs are unchanged). With
    ``torch.distributed`` initialised the maxima are all-reduced (max) over ``process_group`` first, so
    every data-parallel replica applies the same factors. :meth:`remove` restores the model.
    """

    def __init__(self, model: nn.Module, tau: float = 100.0, *, process_group: Any = None) -> None:
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"QKClip: tau={tau!r} must be a positive finite number")
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface

        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "_attn_implementation"):
            raise ValueError(
                "QKClip: expected a transformers PreTrainedModel (with .config); use qk_clip_ otherwise"
            )
        self.tau = float(tau)
        self.process_group = process_group
        self.model = model
        self.modules: dict[str, nn.Module] = {}
        for name, m in model.named_modules():
            if not (
                isinstance(getattr(m, "q_proj", None), nn.Linear)
                and isinstance(getattr(m, "k_proj", None), nn.Linear)
            ):
                continue
            if getattr(m, "q_norm", None) is not None or getattr(m, "k_norm", None) is not None:
                raise ValueError(
                    f"QKClip: {name} normalises q and k (q_norm / k_norm), so scaling W_q / W_k does not change "
                    "its logits; QK-norm models need no QK-clip"
                )
            self.modules[name] = m
        if not self.modules:
            raise ValueError(
                f"QKClip: no attention module with q_proj / k_proj Linear layers in {type(model).__name__}; "
                "for fused projections call qk_clip_ with each head's rows"
            )
        self._original = config._attn_implementation or "eager"
        if self._original.startswith(_PREFIX):
            raise ValueError("QKClip: this model already has a QKClip attached; call .remove() on it first")
        self._maxima: dict[str, Tensor] = {}
        name = _PREFIX + self._original
        original = self._original
        modules = {id(m): n for n, m in self.modules.items()}
        recorder = self

        def attention(
            module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, **kw: Any
        ):
            if module.training and id(module) in modules:
                scaling = kw.get("scaling")
                scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
                m = max_logits(query, key, scaling, attention_mask, bool(getattr(module, "is_causal", False)))
                recorder._observe(modules[id(module)], m)
            return _implementation(original, module)(module, query, key, value, attention_mask, **kw)

        AttentionInterface.register(name, attention)
        if original in ALL_MASK_ATTENTION_FUNCTIONS:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
        config._attn_implementation = name

    def _observe(self, name: str, m: Tensor) -> None:
        prev = self._maxima.get(name)
        self._maxima[name] = m if prev is None else torch.maximum(prev, m)

    @property
    def maxima(self) -> dict[str, Tensor]:
        """The running per-head maxima recorded since the last :meth:`step` (module name -> ``[heads]``)."""
        return dict(self._maxima)

    @torch.no_grad()
    def step(self) -> dict[str, Tensor]:
        """Clip every recorded head over ``tau`` (call after ``optimizer.step()``); returns the maxima that
        were used, per module, then starts a new recording."""
        if dist.is_available() and dist.is_initialized() and self._maxima:
            names = sorted(self._maxima)
            flat = torch.cat([self._maxima[n] for n in names])
            dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=self.process_group)
            sizes = [self._maxima[n].numel() for n in names]
            self._maxima = dict(zip(names, flat.split(sizes), strict=True))
        used = self._maxima
        for name, m in used.items():
            mod = self.modules[name]
            heads, kv = _heads(mod)
            qk_clip_(
                mod.q_proj.weight, mod.k_proj.weight, m, self.tau, heads, kv,
                q_bias=mod.q_proj.bias, k_bias=mod.k_proj.bias,
            )  # fmt: skip
        self._maxima = {}
        return used

    def remove(self) -> None:
        """Restore the model's own attention implementation (recording stops)."""
        self.model.config._attn_implementation = self._original


def _heads(module: nn.Module) -> tuple[int, int]:
    cfg = module.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return heads, kv


def _implementation(name: str, module: nn.Module) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name != "eager":
        return ALL_ATTENTION_FUNCTIONS[name]
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise ValueError(f"QKClip: {type(module).__name__}'s module has no eager_attention_forward")
    return fn
