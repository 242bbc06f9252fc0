"""The public op: :func:`moba_attention` with backend dispatch, and :func:`available_backends`."""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from .block_means import KeyBlockMeans
from .fused_backend import (
    decode_applies,
    decode_steps,
    dense_causal_fused,
    fused_supported,
    moba_attention_fused,
)
from .inputs import validate
from .routing import BlockTable, check_block_means, covers_context, gate_means, route

BACKENDS = ("triton", "flash", "flex", "torch", "torch_tiled")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _triton_runs_here() -> bool:
    return _has("triton") and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def _flex_exists() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends() -> list[str]:
    """Backends that can run on this machine, in auto-dispatch order (``"torch"`` always).

    ``triton`` needs the ``triton`` package and a CUDA GPU (or ``TRITON_INTERPRET=1``); ``flash`` needs
    ``flash-attn`` and a CUDA GPU; ``flex`` needs PyTorch's FlexAttention (forward on CPU, backward only on
    GPU); ``torch_tiled`` (the readable batched-matmul path, any device) always. Nothing is imported to
    answer, so this is cheap and initialises no CUDA context.
    """
    names = []
    if _triton_runs_here():
        names.append("triton")
    if _has("flash_attn") and torch.cuda.is_available():
        names.append("flash")
    if _flex_exists():
        names.append("flex")
    names += ["torch", "torch_tiled"]
    return names


def _auto(q: Tensor) -> str:
    """Fastest applicable backend: triton > flash > flex > torch on CUDA; torch elsewhere."""
    if q.device.type != "cuda":
        return "torch"
    if _has("triton"):
        return "triton"
    if _has("flash_attn") and q.dtype in (torch.float16, torch.bfloat16):
        return "flash"
    if _flex_exists():
        return "flex"
    return "torch"


def moba_attention(
    *,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_size: int,
    topk: int,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    block_means: Tensor | KeyBlockMeans | None = None,
    sink_blocks: int = 0,
    deterministic: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mixture of Block Attention (Lu et al. 2025, arXiv:2502.13189, Sec. 2.2).

    Each query attends its own key block causally plus the ``topk - 1`` earlier blocks whose mean key
    scores highest against it (fp32 gate, per head; ties go to the earlier block). With
    ``topk * block_size >= T`` this is exactly causal softmax attention.

    Args:
        q: ``[Tq, Hq, D]`` packed queries.
        k, v: ``[Tk, Hkv, D]`` packed keys and values; ``Hq % Hkv == 0`` (GQA/MQA: query head ``h``
            reads kv head ``h // (Hq // Hkv)``; K/V are never repeated).
        block_size: tokens per key block (any positive int; the last block of a sequence may be partial).
        topk: key blocks per query, the own block included (``1`` = block-local causal attention).
        cu_seqlens: int32 ``[N + 1]`` cumulative query lengths (flash-attn varlen); ``None`` = one sequence.
        cu_seqlens_k: int32 ``[N + 1]`` cumulative key lengths. ``None`` = prefill (keys packed like the
            queries). When given, each sequence's queries are the *last* ``len_q`` of its ``len_k``
            positions (decode, chunked prefill): the result equals full-sequence MoBA at those positions.
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: ``"auto"`` (triton > flash > flex > torch where available and applicable; always
            ``"torch"`` on CPU) or one of :func:`available_backends`. ``"torch"`` runs PyTorch's fused
            CPU flash-attention kernel on views of K/V (:mod:`moba_attn.fused_backend`) on CPU, and the
            batched-matmul ``"torch_tiled"`` path (:mod:`moba_attn.torch_backend`) on other devices.
        return_lse: also return the log-sum-exp.
        block_means: optional precomputed mean key per block, ``[NBLK, Hkv, D]`` fp32 in packed block
            order (every sequence's ``ceil(len_k / block_size)`` blocks in turn), or a
            :class:`~moba_attn.KeyBlockMeans` kept by a KV cache. Only complete earlier blocks are read.
        sink_blocks: the first ``sink_blocks`` key blocks of every sequence are always attended by the
            queries after them, in place of routed blocks (they take ``sink_blocks`` of the ``topk - 1``
            slots, so the key budget is unchanged). ``0`` (default) is the paper's MoBA. Pretrained
            models lean on their first tokens as an attention sink; switching one to MoBA without
            training, ``sink_blocks=1`` recovers most of the quality lost (see the README).
        deterministic: make the triton backward bitwise reproducible run to run: gradients are summed in
            a fixed order instead of with fp32 atomics (slower where many queries share a block; dQ
            takes an extra ``[Tq * Hq * (topk - 1), D]`` fp32 buffer). The torch backend ignores it: it is
            deterministic on CPU, and on CUDA under ``torch.use_deterministic_algorithms(True)`` (its
            ``index_add_``). flash and flex ignore it too.

    Returns:
        ``o [Tq, Hq, D]`` in ``q``'s dtype; with ``return_lse`` also ``lse [Tq, Hq]`` fp32, the natural
        log of ``sum exp(scale * q . k)`` over the attended keys (differentiable).
    """
    layout, scale = validate(q, k, v, block_size, topk, cu_seqlens, cu_seqlens_k, scale, sink_blocks)
    # a topk above the longest sequence's block count changes nothing: clamp it (and the sinks with it)
    topk = min(topk, max(1, -(-layout.max_len_k // block_size)))
    sink_blocks = min(sink_blocks, topk - 1)
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"moba: backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if isinstance(block_means, KeyBlockMeans):
        block_means = block_means.means()
    if block_means is not None:
        check_block_means(block_means, k, layout)
    name = _auto(q) if backend == "auto" else backend
    if name not in ("torch", "torch_tiled") and name not in available_backends():
        raise RuntimeError(
            f"moba: backend {name!r} is not available here (available: {available_backends()}); "
            f"install the extra (pip install 'moba-attn[{name}]'), use a CUDA device, or pass backend='auto'"
        )
    if q.shape[0] == 0:
        o = q.new_zeros(q.shape)
        lse = torch.zeros(q.shape[:2], dtype=torch.float32, device=q.device)
        return (o, lse) if return_lse else o

    select = None
    if name == "triton":
        from .triton_backend import gate_topk_triton as select
    fused = name == "torch" and fused_supported(q)
    if fused and covers_context(layout, topk):
        # every query attends every earlier block: plain causal attention, no gate
        o, lse = dense_causal_fused(q, k, v, layout, scale)
        return (o, lse) if return_lse else o
    if fused and decode_applies(q, k, v, layout):
        # one query per sequence, no autograd: a decode step needs a handful of ops, not a plan
        means = gate_means(q, k, layout, BlockTable.build(layout), block_means) if topk > 1 else None
        o, lse = decode_steps(q, k, v, layout, topk, scale, means, sink_blocks)
        return (o, lse) if return_lse else o
    routing = route(q, k, layout, topk, block_means, sink_blocks, select=select)
    if name == "triton":
        from .triton_backend import moba_attention_triton

        o, lse = moba_attention_triton(q, k, v, routing, scale, deterministic)
    elif fused:
        o, lse = moba_attention_fused(q, k, v, routing, scale)
    elif name in ("torch", "torch_tiled"):
        from .torch_backend import moba_attention_torch

        o, lse = moba_attention_torch(q, k, v, routing, scale)
    elif name == "flex":
        from .flex_backend import moba_attention_flex

        o, lse = moba_attention_flex(q, k, v, routing, scale)
    else:
        from .flash_backend import moba_attention_flash

        o, lse = moba_attention_flash(q, k, v, routing, scale)
    return (o, lse) if return_lse else o
