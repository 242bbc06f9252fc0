"""Argument checking and the varlen layout shared by every backend.

Shapes, once for the whole package (flash-attn's packed varlen convention):

* ``q``: ``[Tq, Hq, D]``, ``k`` and ``v``: ``[Tk, Hkv, D]``, ``Hq % Hkv == 0``; query head ``h`` reads
  key/value head ``h // (Hq // Hkv)``.
* ``cu_seqlens``: int32 ``[N + 1]`` cumulative lengths of the ``N`` packed query sequences (``0`` first,
  ``Tq`` last); ``None`` means one sequence.
* ``cu_seqlens_k``: the same for the keys. ``None`` means prefill (keys are packed like the queries).
  When given, the queries of sequence ``s`` are the *last* ``len_q[s]`` positions of its ``len_k[s]`` keys
  (decode steps and chunked prefill with a KV cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Layout:
    """Where every packed sequence starts, for queries and keys (int64, on the tensors' device)."""

    cu_q: Tensor
    cu_k: Tensor
    len_q: Tensor
    len_k: Tensor
    n_seq: int
    max_len_k: int
    block_size: int

    @property
    def q_offset(self) -> Tensor:
        """Position (within its sequence) of each sequence's first query: ``len_k - len_q``."""
        return self.len_k - self.len_q


def _check_cu(name: str, cu: Tensor, total: int, what: str) -> Tensor:
    if not isinstance(cu, Tensor):
        raise TypeError(f"moba: {name} must be a torch.Tensor of int32 offsets, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(
            f"moba: {name} must be a 1-D int32 tensor [N + 1] of cumulative {what} lengths "
            f"(as flash-attn's cu_seqlens); got dtype={cu.dtype}, shape={tuple(cu.shape)}"
        )
    c = cu.to(torch.int64)
    if int(c[0]) != 0:
        raise ValueError(f"moba: {name}[0] must be 0, got {int(c[0])}")
    if bool((c[1:] < c[:-1]).any()):
        raise ValueError(f"moba: {name} must be non-decreasing (cumulative lengths); got {cu.tolist()}")
    if int(c[-1]) != total:
        raise ValueError(
            f"moba: {name}[-1]={int(c[-1])} must equal the number of packed {what} tokens ({total}); "
            f"pass cumulative lengths ending at the total"
        )
    return c


def validate(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_size: int,
    topk: int,
    cu_seqlens: Tensor | None,
    cu_seqlens_k: Tensor | None,
    scale: float | None,
    sink_blocks: int = 0,
) -> tuple[Layout, float]:
    """Check every argument of :func:`moba_attn.moba_attention`; return the layout and the softmax scale."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"moba: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(
                f"moba: {name} must be 3-D packed [T, H, D] (flatten the batch and pass cu_seqlens); "
                f"got shape {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise ValueError(f"moba: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"moba: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"moba: q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(
            f"moba: k and v must have the same shape [Tk, Hkv, D]; got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"moba: q and k must have the same head dim D; got {q.shape[2]} and {k.shape[2]}")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(
            f"moba: the number of query heads ({hq}) must be a multiple of the number of key/value heads "
            f"({hkv}) for GQA/MQA; reshape or repeat heads so that Hq % Hkv == 0"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(
            f"moba: block_size must be a positive int (tokens per key block), got {block_size!r}"
        )
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(
            f"moba: topk must be an int >= 1 (the number of key blocks each query attends, own block "
            f"included), got {topk!r}"
        )
    if isinstance(sink_blocks, bool) or not isinstance(sink_blocks, int) or sink_blocks < 0:
        raise ValueError(
            f"moba: sink_blocks must be an int >= 0 (leading key blocks every query always attends), "
            f"got {sink_blocks!r}"
        )
    if sink_blocks > topk - 1:
        raise ValueError(
            f"moba: sink_blocks={sink_blocks} needs topk >= {sink_blocks + 1}: sink blocks take slots of the "
            f"topk - 1 earlier blocks (the own block is the remaining one); got topk={topk}"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[2])
    else:
        scale = float(scale)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(
                f"moba: scale must be a finite positive float (None means 1/sqrt(D)), got {scale}"
            )

    tq, tk = q.shape[0], k.shape[0]
    dev = q.device
    if cu_seqlens is None:
        cu_q = torch.tensor([0, tq], dtype=torch.int64, device=dev)
    else:
        cu_q = _check_cu("cu_seqlens", cu_seqlens, tq, "query").to(dev)
    if cu_seqlens_k is None:
        if tq != tk:
            raise ValueError(
                f"moba: q has {tq} tokens but k has {tk}; for prefill they must match, for decode or chunked "
                f"prefill pass cu_seqlens_k (the queries are the last positions of each key sequence)"
            )
        cu_k = cu_q
    else:
        cu_k = _check_cu("cu_seqlens_k", cu_seqlens_k, tk, "key").to(dev)
        if cu_k.numel() != cu_q.numel():
            raise ValueError(
                f"moba: cu_seqlens_k describes {cu_k.numel() - 1} sequences but cu_seqlens (queries) "
                f"{cu_q.numel() - 1}; pass one entry per sequence in both"
            )
    len_q = cu_q[1:] - cu_q[:-1]
    len_k = cu_k[1:] - cu_k[:-1]
    if bool((len_q > len_k).any()):
        raise ValueError(
            "moba: every query sequence must be no longer than its key sequence (queries are the last "
            f"len_q of len_k positions); got len_q={len_q.tolist()} len_k={len_k.tolist()}"
        )
    layout = Layout(
        cu_q=cu_q,
        cu_k=cu_k,
        len_q=len_q,
        len_k=len_k,
        n_seq=cu_q.numel() - 1,
        max_len_k=int(len_k.max()) if len_k.numel() else 0,
        block_size=block_size,
    )
    return layout, scale
