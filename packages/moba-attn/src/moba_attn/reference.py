"""Readable, mask-based fp32 MoBA: the specification and the test oracle for every backend.

Mixture of Block Attention (Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs",
arXiv:2502.13189, Sec. 2.2-2.3): each query attends its own key block (causally) plus the ``topk - 1``
earlier blocks whose mean key scores highest against it. This module builds the dense ``[Hq, Lq, Lk]``
mask per sequence and runs ordinary softmax attention, so it costs ``O(T^2)``: use it on small inputs.
It shares no code with the fast paths except argument checking.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .inputs import validate


def moba_mask_reference(q: Tensor, k: Tensor, block_size: int, topk: int, sink_blocks: int = 0) -> Tensor:
    """Boolean ``[Hq, Lq, Lk]`` MoBA mask of one sequence whose queries are the last ``Lq`` of ``Lk`` keys.

    ``sink_blocks = n``: the first ``n`` blocks win the gate for every later query (score ``+inf``), so
    they fill ``n`` of the ``topk - 1`` earlier-block slots (see :mod:`moba_attn.routing`).
    """
    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    group = hq // hkv
    q_pos = torch.arange(lk - lq, lk, device=q.device)
    k_pos = torch.arange(lk, device=q.device)
    n_blocks = -(-lk // block_size)
    # gate: dot product of each query with each block's mean key, fp32, per head
    means = torch.stack([k[j * block_size : (j + 1) * block_size].float().mean(0) for j in range(n_blocks)])
    means = means.repeat_interleave(group, dim=1)  # [nb, Hq, D]
    scores = torch.einsum("thd,nhd->htn", q.float(), means)  # [Hq, Lq, nb]
    own = q_pos // block_size  # [Lq]
    blocks = torch.arange(n_blocks, device=q.device)
    earlier = blocks[None, :] < own[:, None]  # [Lq, nb]
    scores = scores.masked_fill(~earlier, float("-inf"))
    scores = scores.masked_fill(earlier & (blocks[None, :] < sink_blocks), float("inf"))
    # stable descending sort: among equal scores the earlier block comes first (the documented tie-break)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n_blocks, device=q.device).expand_as(order))
    chosen = earlier[None] & (rank < topk - 1)
    chosen = chosen | (blocks[None, None, :] == own[None, :, None])  # the own block is always attended
    block_of_key = k_pos // block_size
    mask = chosen[:, :, block_of_key]  # [Hq, Lq, Lk]
    return mask & (k_pos[None, None, :] <= q_pos[None, :, None])


def moba_attention_reference(
    *,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_size: int,
    topk: int,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    sink_blocks: int = 0,
) -> Tensor | tuple[Tensor, Tensor]:
    """MoBA attention by an explicit mask; same arguments and results as :func:`moba_attn.moba_attention`.

    Computes in fp32 and returns ``o [Tq, Hq, D]`` in ``q``'s dtype (and ``lse [Tq, Hq]`` fp32, natural
    log of the sum of ``exp(scale * q . k)`` over attended keys, if ``return_lse``). Differentiable by
    autograd with respect to ``q``, ``k`` and ``v`` (the selection itself carries no gradient).
    """
    layout, scale = validate(q, k, v, block_size, topk, cu_seqlens, cu_seqlens_k, scale, sink_blocks)
    cu_q, cu_k = layout.cu_q.tolist(), layout.cu_k.tolist()
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for s in range(layout.n_seq):
        qs = q[cu_q[s] : cu_q[s + 1]].float()
        ks = k[cu_k[s] : cu_k[s + 1]].float()
        vs = v[cu_k[s] : cu_k[s + 1]].float()
        if qs.shape[0] == 0:
            continue
        mask = moba_mask_reference(qs.detach(), ks.detach(), block_size, topk, sink_blocks)
        kh = ks.repeat_interleave(group, dim=1)  # readable GQA: one copy of K/V per query head
        vh = vs.repeat_interleave(group, dim=1)
        logits = torch.einsum("qhd,khd->hqk", qs, kh) * scale
        logits = logits.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)  # [Hq, Lq]
        p = torch.exp(logits - lse[..., None])
        outs.append(torch.einsum("hqk,khd->qhd", p, vh))
        lses.append(lse.transpose(0, 1))
    if outs:
        o = torch.cat(outs).to(q.dtype)
        lse = torch.cat(lses)
    else:
        o = q.new_zeros(q.shape)
        lse = torch.zeros(q.shape[:2], dtype=torch.float32, device=q.device)
    return (o, lse) if return_lse else o
