"""The transformers attention call as one ``torch.library`` custom op, so ``torch.compile`` sees no host syncs.

MoBA's planning is data-dependent: unpadding reads the padding mask, the varlen layout reads
``cu_seqlens``, the gate's top-k and the block table are sized by the sequence lengths. In eager mode
that costs a few host syncs per layer; under ``torch.compile`` every ``int()``/``.tolist()``/``bool()``
on a tensor is a graph break. :func:`hf_attention` wraps the whole call of
:class:`moba_attn.hf.MoBAAttention` (unpadding, varlen layout, routing, the op, re-padding) in an
opaque custom op with a shape-only fake implementation, so a compiled model traces it as one node and
``torch.compile(model, fullgraph=True)`` works. Only the compiled path uses it; eager calls run the
same code directly (and keep the op's own fused backward).

Autograd: the backward is a second custom op, :func:`hf_attention_backward`, that *recomputes* the
forward with autograd on and differentiates it (``torch.autograd.grad``), i.e. activation
checkpointing of the attention. Compiled training therefore runs the attention forward twice per
step; eager training does not. Block means kept by a :class:`~moba_attn.MoBACache` are not used
here (a tensor attribute cannot cross an op boundary): the op recomputes them from the keys, which
gives the same result and only costs decode speed.

PyTorch's on-disk compile cache (``TORCHINDUCTOR_CACHE_DIR``) may replay a compiled backward made
with an older version of this module; if a compiled backward fails with a schema mismatch for
``moba_attn::hf_attention_backward`` after an upgrade, clear that cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

__all__ = ["hf_attention", "hf_attention_backward"]


def _run(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    position_ids: Tensor | None,
    cu_seq_lens_q: Tensor | None,
    cu_seq_lens_k: Tensor | None,
    block_size: int,
    topk: int,
    sink_blocks: int,
    scale: float,
    full_layer: bool,
    backend: str,
    sliding_window: int,
    name: str,
) -> Tensor:
    from .hf import _attend, _check_sliding_window  # late: hf imports this module

    window = None if sliding_window < 0 else sliding_window
    mask = _check_sliding_window(name, window, key.shape[2], attention_mask, position_ids)
    if mask is not None and bool(mask.all()):
        mask = None  # the compiled mask builder cannot test for "no padding" without a sync; do it here
    return _attend(
        query,
        key,
        value,
        mask,
        position_ids=position_ids,
        cu_seq_lens_q=cu_seq_lens_q,
        cu_seq_lens_k=cu_seq_lens_k,
        block_size=block_size,
        topk=topk,
        sink_blocks=sink_blocks,
        scale=scale,
        full_layer=full_layer,
        backend=backend,
    )


@torch.library.custom_op("moba_attn::hf_attention", mutates_args=())
def hf_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    position_ids: Tensor | None,
    cu_seq_lens_q: Tensor | None,
    cu_seq_lens_k: Tensor | None,
    block_size: int,
    topk: int,
    sink_blocks: int,
    scale: float,
    full_layer: bool,
    backend: str,
    sliding_window: int,
    name: str,
) -> Tensor:
    """MoBA (or, with ``full_layer``, full causal) attention of one transformers attention call.

    ``query [B, Hq, S_q, D]``, ``key/value [B, Hkv, S_k, D]``; ``attention_mask`` the ``[B, S]`` bool
    padding mask from :func:`moba_attn.hf.moba_attention_mask` (an all-true mask means no padding);
    ``position_ids``/``cu_seq_lens_*`` as transformers passes them. ``sliding_window < 0`` means the
    layer has none; ``name`` names the layer in errors. Returns ``[B, S_q, Hq, D]``.
    """
    return _run(
        query, key, value, attention_mask, position_ids, cu_seq_lens_q, cu_seq_lens_k,
        block_size, topk, sink_blocks, scale, full_layer, backend, sliding_window, name,
    )  # fmt: skip


@hf_attention.register_fake
def _hf_attention_fake(query: Tensor, key: Tensor, value: Tensor, *args: Any) -> Tensor:
    batch, h_q, s_q, dim = query.shape
    return query.new_empty(batch, s_q, h_q, dim)


@contextmanager
def _autograd_inside_op() -> Iterator[None]:
    """Re-enable autograd inside a custom op's kernel.

    The dispatcher runs custom-op kernels with the autograd dispatch keys excluded, so ops called
    there record no graph even under ``torch.enable_grad()``. The backward recomputes the forward and
    needs that graph. ``torch._C._ForceDispatchKeyGuard`` is private API, but it is what PyTorch's own
    higher-order ops (``torch._higher_order_ops``) use to run autograd inside a kernel.
    """
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    exclude = exclude - torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradFunctionality)
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


@torch.library.custom_op("moba_attn::hf_attention_backward", mutates_args=())
def hf_attention_backward(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    position_ids: Tensor | None,
    cu_seq_lens_q: Tensor | None,
    cu_seq_lens_k: Tensor | None,
    block_size: int,
    topk: int,
    sink_blocks: int,
    scale: float,
    full_layer: bool,
    backend: str,
    sliding_window: int,
    name: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`hf_attention` w.r.t. query, key and value, by recomputing its forward."""
    with _autograd_inside_op():
        q, k, v = (t.detach().requires_grad_(True) for t in (query, key, value))
        out = _run(
            q, k, v, attention_mask, position_ids, cu_seq_lens_q, cu_seq_lens_k,
            block_size, topk, sink_blocks, scale, full_layer, backend, sliding_window, name,
        )  # fmt: skip
        grads = torch.autograd.grad(out, (q, k, v), grad_out, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for t, g in zip((q, k, v), grads))


@hf_attention_backward.register_fake
def _hf_attention_backward_fake(
    grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, *args: Any
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


_TENSOR_INPUTS = 7  # query, key, value, attention_mask, position_ids, cu_seq_lens_q, cu_seq_lens_k


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.save_for_backward(*inputs[:_TENSOR_INPUTS])
    ctx.settings = inputs[_TENSOR_INPUTS:]  # block_size .. name: the recompute plans exactly as forward did


def _backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    dq, dk, dv = hf_attention_backward(grad_out, *ctx.saved_tensors, *ctx.settings)
    return (dq, dk, dv) + (None,) * (_TENSOR_INPUTS - 3 + len(ctx.settings))


hf_attention.register_autograd(_backward, setup_context=_setup_context)
