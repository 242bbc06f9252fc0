"""MoBA on PyTorch FlexAttention, with a BlockMask built straight from the routing.

The routing is per query and head, FlexAttention's sparsity is per ``(q tile, kv tile)``: the BlockMask
marks a tile pair active when any query of the q tile routes to any key of the kv tile (own block up to
the query, or a selected block), via :meth:`BlockMask.from_kv_blocks` (no dense ``create_block_mask``
over ``T x T``). Inside active tiles the ``mask_mod`` applies the exact per-query rule, so results equal
the reference. Varlen needs no document mask: the routing only ever names blocks of the query's own
sequence.

On CUDA the FlexAttention call is compiled (``torch.compile``) once per process; on CPU it runs eagerly,
which materialises scores and is only meant for testing. FlexAttention has no CPU backward.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .routing import Routing

_Q_TILE = 128
_KV_TILE = 128


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _tile_ranges(lo_key: Tensor, hi_key: Tensor, span: int):
    """Yield ``(tile, valid)`` for every kv tile between two inclusive key indices (at most ``span``)."""
    lo, hi = lo_key // _KV_TILE, hi_key // _KV_TILE
    for o in range(span):
        tile = lo + o
        yield tile, tile <= hi


def build_block_mask(routing: Routing, hq: int, tk: int):
    """The routing as a FlexAttention ``BlockMask`` over ``[1, Hq, Tq, Tk]``."""
    from torch.nn.attention.flex_attention import BlockMask

    bs = routing.layout.block_size
    info, table, sel = routing.info, routing.table, routing.selected
    tq = info.pos.numel()
    dev = sel.device
    n_qt, n_kt = -(-tq // _Q_TILE), -(-tk // _KV_TILE)
    span = -(-bs // _KV_TILE) + 1
    active = torch.zeros(hq, n_qt, n_kt, dtype=torch.bool, device=dev)
    q_tile = torch.arange(tq, device=dev) // _Q_TILE
    heads = torch.arange(hq, device=dev)
    # own block: keys from the block start up to the query itself, every head
    for tile, ok in _tile_ranges(table.block_start[info.own_block], info.key_index, span):
        t = ok.nonzero().squeeze(1)
        hh = heads.repeat(t.numel())
        active[hh, q_tile[t].repeat_interleave(hq), tile[t].repeat_interleave(hq)] = True
    # selected earlier blocks: the whole block
    tt, hh, jj = (sel >= 0).nonzero(as_tuple=True)
    blk = sel[tt, hh, jj]
    start = table.block_start[blk]
    for tile, ok in _tile_ranges(start, start + table.block_len[blk] - 1, span):
        active[hh[ok], q_tile[tt[ok]], tile[ok]] = True

    own, qpos = info.own_block, info.pos
    key_block = torch.repeat_interleave(
        torch.arange(table.n_blocks, device=dev), table.block_len, output_size=tk
    )
    key_pos = (
        torch.arange(tk, device=dev)
        - table.block_start[key_block]
        + (key_block - table.block_offset[table.block_seq[key_block]]) * bs
    )
    n_sel = sel.shape[2]

    def mask_mod(b, h, q_idx, kv_idx):
        kb = key_block[kv_idx]
        allowed = (kb == own[q_idx]) & (key_pos[kv_idx] <= qpos[q_idx])
        for j in range(n_sel):
            allowed = allowed | (sel[q_idx, h, j] == kb)
        return allowed

    counts = active.sum(-1).to(torch.int32)[None]
    order = torch.argsort((~active).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None]
    return BlockMask.from_kv_blocks(
        counts, order, BLOCK_SIZE=(_Q_TILE, _KV_TILE), mask_mod=mask_mod, seq_lengths=(tq, tk)
    )


def moba_attention_flex(
    q: Tensor, k: Tensor, v: Tensor, routing: Routing, scale: float
) -> tuple[Tensor, Tensor]:
    """FlexAttention backend: ``o [Tq, Hq, D]`` (q's dtype), ``lse [Tq, Hq]`` fp32 (natural log)."""
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = build_block_mask(routing, q.shape[1], k.shape[0])
    fn = _compiled_flex() if q.is_cuda else flex_attention
    qs, ks, vs = (x.transpose(0, 1)[None] for x in (q, k, v))
    o, lse = fn(
        qs, ks, vs, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1], return_lse=True
    )
    return o[0].transpose(0, 1), lse[0].transpose(0, 1).float()
