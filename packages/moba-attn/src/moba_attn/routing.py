"""MoBA routing: key blocks, their means, the gate and the top-k choice (Lu et al. 2025, Sec. 2.2).

Every backend routes through this module (the Triton backend fuses the same rule into a kernel and is
tested against it), so the selection is identical everywhere:

* Keys of each sequence are cut into blocks of ``block_size`` tokens; the last may be partial.
* The gate score of block ``i`` for a query (per query head) is ``q . mean(K_i)`` in fp32, with the
  block mean taken over the key/value head that the query head reads. No softmax scale is applied (it
  would not change the ranking).
* Only blocks that end before the query's own block starts compete. The own block is always attended
  (token-level causal), so ``topk - 1`` blocks are chosen among the earlier ones (all of them if fewer).
* **Sink blocks** (``sink_blocks = n``, an extension of the paper's rule): the first ``n`` blocks of each
  sequence win the gate outright for every later query (their score counts as ``+inf``), so they take
  ``n`` of the ``topk - 1`` slots and the gate chooses the rest. Pretrained models put much of their
  attention mass on the first tokens (the "attention sink" of Xiao et al. 2024, StreamingLLM,
  arXiv:2309.17453); plain MoBA routes those tokens away and a model switched to MoBA without training
  loses that anchor. ``n = 0`` is the paper's MoBA.
* **Ties** are broken towards the *earlier* block: among equal scores the lower block index wins
  (``torch.argmax`` returns the first maximum; the reference uses a stable descending sort).
* No gradient flows through the selection.

Blocks are numbered globally over the packed batch: sequence ``s`` owns blocks
``block_offset[s] : block_offset[s + 1]`` in position order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .inputs import Layout

# Rows x blocks x heads of gate scores computed at once: bounds the gate's scratch (4 MiB of fp32
# scores, plus the sort's values and int64 indices: ~16 MiB in all).
_GATE_CHUNK_ELEMS = 1 << 20
# Up to this many sequences, block means are strided per-sequence sums (else one index_add_).
_FEW_SEQUENCES = 16


@dataclass(frozen=True)
class BlockTable:
    """Global key blocks of a packed batch (all int64, on the tensors' device)."""

    block_offset: Tensor  # [N + 1] first global block of each sequence
    block_seq: Tensor  # [NBLK] sequence of each block
    block_start: Tensor  # [NBLK] packed key index of the block's first key
    block_len: Tensor  # [NBLK] keys in the block (block_size except a sequence's last block)
    n_blocks: int

    @staticmethod
    def build(layout: Layout) -> BlockTable:
        bs = layout.block_size
        nb = (layout.len_k + bs - 1) // bs
        offset = torch.zeros(layout.n_seq + 1, dtype=torch.int64, device=nb.device)
        offset[1:] = torch.cumsum(nb, 0)
        n_blocks = int(offset[-1])
        seq = torch.repeat_interleave(torch.arange(layout.n_seq, device=nb.device), nb, output_size=n_blocks)
        local = torch.arange(n_blocks, device=nb.device) - offset[seq]
        start = layout.cu_k[seq] + local * bs
        length = torch.clamp(layout.len_k[seq] - local * bs, max=bs)
        return BlockTable(offset, seq, start, length, n_blocks)


@dataclass(frozen=True)
class QueryInfo:
    """Per packed query: its sequence, its position in that sequence and its own global block."""

    seq: Tensor  # [Tq]
    pos: Tensor  # [Tq] position within the sequence (0-based, in key coordinates)
    own_block: Tensor  # [Tq] global block id containing the query
    key_index: Tensor  # [Tq] packed key index at the query's position

    @staticmethod
    def build(layout: Layout, table: BlockTable) -> QueryInfo:
        tq = int(layout.cu_q[-1])
        dev = layout.cu_q.device
        seq = torch.repeat_interleave(torch.arange(layout.n_seq, device=dev), layout.len_q, output_size=tq)
        pos = torch.arange(tq, device=dev) - layout.cu_q[seq] + layout.q_offset[seq]
        own = table.block_offset[seq] + pos // layout.block_size
        return QueryInfo(seq, pos, own, layout.cu_k[seq] + pos)


def key_block_means(k: Tensor, layout: Layout, table: BlockTable) -> Tensor:
    """Mean key of every global block, ``[NBLK, Hkv, D]`` fp32 (partial last blocks: mean of what exists).

    Few sequences (prefill of a batch, a decode step): a strided sum over each sequence's block view,
    which reads ``k`` once in place whatever its strides (a KV cache view is not copied). Many short
    sequences: one ``index_add_`` over all keys.
    """
    dev = k.device
    bs = layout.block_size
    sums = torch.zeros(table.n_blocks, k.shape[1], k.shape[2], dtype=torch.float32, device=dev)
    if layout.n_seq <= _FEW_SEQUENCES:
        cu_k, boff = layout.cu_k.tolist(), table.block_offset.tolist()
        for s in range(layout.n_seq):
            ks = k[cu_k[s] : cu_k[s + 1]].detach()
            full = ks.shape[0] // bs
            if full:
                sums[boff[s] : boff[s] + full] = (
                    ks[: full * bs].unflatten(0, (full, bs)).sum(1, dtype=torch.float32)
                )
            if ks.shape[0] > full * bs:
                sums[boff[s] + full] = ks[full * bs :].sum(0, dtype=torch.float32)
    else:
        tk = k.shape[0]
        seq = torch.repeat_interleave(torch.arange(layout.n_seq, device=dev), layout.len_k, output_size=tk)
        pos = torch.arange(tk, device=dev) - layout.cu_k[seq]
        sums.index_add_(0, table.block_offset[seq] + pos // bs, k.detach().float())
    return sums / table.block_len.clamp(min=1).to(torch.float32)[:, None, None]


@torch.no_grad()
def select_blocks(
    q: Tensor,
    means: Tensor,
    layout: Layout,
    table: BlockTable,
    info: QueryInfo,
    topk: int,
    sink_blocks: int = 0,
) -> Tensor:
    """Top ``topk - 1`` earlier blocks per query and head: ``[Tq, Hq, topk - 1]`` global ids, ``-1`` = none.

    Chosen blocks are listed best first (sink blocks first of all); ties go to the lower block index. Sequences are processed in
    groups so that the score scratch stays below ``_GATE_CHUNK_ELEMS`` elements; each group scores its
    queries only against its own sequences' blocks, never a ``[T, T]`` or ``[T, all blocks]`` matrix.
    """
    tq, hq, d = q.shape
    hkv = means.shape[1]
    grp = hq // hkv
    n_sel = topk - 1
    sel = torch.full((tq, hq, max(n_sel, 0)), -1, dtype=torch.int64, device=q.device)
    if n_sel == 0 or tq == 0:
        return sel
    cu_q = layout.cu_q.tolist()
    boff = table.block_offset.tolist()
    s = 0
    while s < layout.n_seq:
        # grow the group while the scores fit the budget (always at least one sequence)
        e = s + 1
        while (
            e < layout.n_seq and (cu_q[e + 1] - cu_q[s]) * (boff[e + 1] - boff[s]) * hq <= _GATE_CHUNK_ELEMS
        ):
            e += 1
        q0, q1, b0, b1 = cu_q[s], cu_q[e], boff[s], boff[e]
        s = e
        if q1 == q0 or b1 == b0:
            continue
        # queries of one sequence may still be too many: chunk rows too
        rows = max(1, _GATE_CHUNK_ELEMS // max(1, (b1 - b0) * hq))
        m = means[b0:b1]  # [nb, Hkv, D]
        bseq = table.block_seq[b0:b1]
        bidx = torch.arange(b0, b1, device=q.device)
        sink = (bidx - table.block_offset[bseq]) < sink_blocks  # [nb] leading blocks of their sequence
        for r0 in range(q0, q1, rows):
            r1 = min(q1, r0 + rows)
            qq = q[r0:r1].detach().float().view(r1 - r0, hkv, grp, d)
            scores = torch.einsum("thgd,nhd->thgn", qq, m).reshape(r1 - r0, hq, b1 - b0)
            ok = (bseq[None, :] == info.seq[r0:r1, None]) & (bidx[None, :] < info.own_block[r0:r1, None])
            scores.masked_fill_(~ok[:, None, :], float("-inf"))
            if sink_blocks:
                scores.masked_fill_((ok & sink[None, :])[:, None, :], float("inf"))
            n_ok = ok.sum(-1)  # [rows] earlier blocks available
            # one stable descending sort: equal scores keep block order, so ties go to the earlier block
            take = min(n_sel, b1 - b0)
            best = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :take]
            valid = torch.arange(take, device=q.device)[None, :] < n_ok[:, None]  # [rows, take]
            sel[r0:r1, :, :take] = torch.where(valid[:, None, :], best + b0, -1)
    return sel


@dataclass(frozen=True)
class Routing:
    """Everything a backend needs to know about who attends where."""

    layout: Layout
    table: BlockTable
    info: QueryInfo
    selected: Tensor  # [Tq, Hq, topk - 1] global block ids, -1 = none

    @property
    def n_selected(self) -> int:
        return self.selected.shape[2]


def gate_means(
    q: Tensor, k: Tensor, layout: Layout, table: BlockTable, block_means: Tensor | None = None
) -> Tensor:
    """The fp32 key block means the gate scores against: given (checked by :func:`check_block_means`) or
    computed from ``k``."""
    if block_means is None:
        return key_block_means(k, layout, table)
    return block_means.to(device=q.device, dtype=torch.float32)


def check_block_means(block_means: Tensor, k: Tensor, layout: Layout) -> None:
    """Raise unless ``block_means`` is a float ``[NBLK, Hkv, D]`` tensor, one row per key block."""
    n_blocks = int(((layout.len_k + layout.block_size - 1) // layout.block_size).sum())
    if not isinstance(block_means, Tensor):
        raise TypeError(
            f"moba: block_means must be a torch.Tensor or a KeyBlockMeans, got {type(block_means).__name__}"
        )
    if not block_means.is_floating_point():
        raise ValueError(
            f"moba: block_means must be floating point (mean keys, fp32 preferred), got dtype {block_means.dtype}; "
            "an integer tensor would truncate the means and change the routing"
        )
    want = (n_blocks, k.shape[1], k.shape[2])
    if tuple(block_means.shape) != want:
        raise ValueError(
            f"moba: block_means must be [NBLK, Hkv, D] = {list(want)} (one row per key block of "
            f"every sequence, ceil(len_k / block_size) each); got {list(block_means.shape)}"
        )


def covers_context(layout: Layout, topk: int) -> bool:
    """Whether ``topk`` blocks cover every sequence, so that MoBA is exactly causal attention."""
    bs = layout.block_size
    return (layout.max_len_k + bs - 1) // bs <= topk


#: A gate + top-k implementation: ``(q, means, layout, table, info, topk, sink_blocks) -> selected``.
Selector = Callable[[Tensor, Tensor, Layout, BlockTable, QueryInfo, int, int], Tensor]


def route(
    q: Tensor,
    k: Tensor,
    layout: Layout,
    topk: int,
    block_means: Tensor | None = None,
    sink_blocks: int = 0,
    select: Selector | None = None,
) -> Routing:
    """Build the block table, the gate and the selection for one call: the one routing every backend gets.

    ``select`` replaces :func:`select_blocks` with an implementation of the same rule (the Triton
    backend's fused gate kernel, tested against it).
    """
    table = BlockTable.build(layout)
    info = QueryInfo.build(layout, table)
    if topk > 1:
        means = gate_means(q, k, layout, table, block_means)
        selected = (select or select_blocks)(q, means, layout, table, info, topk, sink_blocks)
    else:
        selected = torch.empty(q.shape[0], q.shape[1], 0, dtype=torch.int64, device=q.device)
    return Routing(layout, table, info, selected)


@dataclass(frozen=True)
class RoutedPairs:
    """The (query, head, slot) -> block assignments, sorted by (kv head, block): the paper's gather.

    ``slot`` is the flat index into a ``[Tq, Hq, topk - 1]`` array; ``q_row`` the flat index into
    ``q.view(Tq * Hq, D)``; ``group = kv_head * NBLK + block``. ``group_start`` gives the first pair of
    each group (``[Hkv * NBLK + 1]``), so the pairs of one group are contiguous.
    """

    slot: Tensor
    q_row: Tensor
    group: Tensor
    group_start: Tensor

    @staticmethod
    def build(routing: Routing, hkv: int) -> RoutedPairs:
        sel = routing.selected
        _, hq, ns = sel.shape
        grp = hq // hkv
        flat = sel.reshape(-1)
        slot = torch.nonzero(flat >= 0).squeeze(1)
        blk = flat[slot]
        q_row = slot // ns
        head = q_row % hq
        group = (head // grp) * routing.table.n_blocks + blk
        group, order = torch.sort(group, stable=True)
        slot, q_row = slot[order], q_row[order]
        counts = torch.bincount(group, minlength=hkv * routing.table.n_blocks)
        start = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=sel.device)
        start[1:] = torch.cumsum(counts, 0)
        return RoutedPairs(slot, q_row, group, start)
