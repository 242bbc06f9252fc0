"""The tile plan shared by the tiled backends (``torch_tiled`` and Triton): who attends where, as tiles.

A :class:`~moba_attn.routing.Routing` says which blocks each (query, head) attends; this module lays
that out as fixed-shape work: own blocks as ``[block, block]`` causal tiles (:class:`SelfBlocks`) and
routed pairs gathered per (kv head, block) into tiles of ``tile_rows`` rows (:class:`TilePlan`). The
fused CPU backend does not tile (it hands whole groups to a fused kernel) and uses the routing directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .routing import RoutedPairs, Routing


@dataclass(frozen=True)
class SelfBlocks:
    """Key blocks that contain queries, with the queries laid out by their offset inside the block.

    ``q_index[b, r]`` is the packed query at offset ``r`` of block ``blocks[b]`` (``-1`` if that position is
    not a query), ``k_index[b, c]`` the packed key at offset ``c`` (``-1`` past the end). Attention inside
    such a block is causal in the offsets: query ``r`` sees keys ``c <= r``.
    """

    blocks: Tensor  # [NBQ]
    q_index: Tensor  # [NBQ, block_size]
    k_index: Tensor  # [NBQ, block_size]

    @staticmethod
    def build(routing: Routing) -> SelfBlocks:
        bs = routing.layout.block_size
        info, table = routing.info, routing.table
        dev = info.pos.device
        blocks, inverse = torch.unique(info.own_block, sorted=True, return_inverse=True)
        q_index = torch.full((blocks.numel(), bs), -1, dtype=torch.int64, device=dev)
        q_index[inverse, info.pos % bs] = torch.arange(info.pos.numel(), device=dev)
        offs = torch.arange(bs, device=dev)
        k_index = table.block_start[blocks, None] + offs[None, :]
        k_index = torch.where(offs[None, :] < table.block_len[blocks, None], k_index, -1)
        return SelfBlocks(blocks, q_index, k_index)


@dataclass(frozen=True)
class TilePlan:
    """Index tensors for one call, built once and reused by the backward pass."""

    self_blocks: SelfBlocks
    pairs: RoutedPairs
    tile_pairs: Tensor  # [n_tiles, tile_rows] index into the pairs, -1 = padding
    tile_keys: Tensor  # [n_tiles, block_size] index into k.view(Tk * Hkv, D)
    n_selected: int
    tq: int
    hq: int

    @staticmethod
    def build(routing: Routing, hkv: int, tile_rows: int | None = None) -> TilePlan:
        bs = routing.layout.block_size
        tq, hq, ns = routing.selected.shape
        pairs = RoutedPairs.build(routing, hkv)
        dev = routing.selected.device
        counts = pairs.group_start[1:] - pairs.group_start[:-1]
        if tile_rows is None:
            # Tiles as tall as the busiest (kv head, block) group needs, up to min(block, 512) rows: a
            # decode step routes one query per group, and a 512-row tile would be 511 rows of padding.
            busiest = int(counts.max()) if counts.numel() else 1
            rows = max(1, min(bs, 512, 1 << max(busiest - 1, 0).bit_length()))
        else:
            rows = tile_rows
        tiles_per_group = (counts + rows - 1) // rows
        n_tiles = int(tiles_per_group.sum())
        tile_offset = torch.cumsum(tiles_per_group, 0) - tiles_per_group
        idx = torch.arange(pairs.slot.numel(), device=dev)
        in_group = idx - pairs.group_start[pairs.group]
        tile = tile_offset[pairs.group] + in_group // rows
        tile_pairs = torch.full((n_tiles, rows), -1, dtype=torch.int64, device=dev)
        tile_pairs[tile, in_group % rows] = idx
        tile_group = torch.repeat_interleave(
            torch.arange(counts.numel(), device=dev), tiles_per_group, output_size=n_tiles
        )
        nblk = routing.table.n_blocks
        head, blk = tile_group // max(nblk, 1), tile_group % max(nblk, 1)
        keys = routing.table.block_start[blk, None] + torch.arange(bs, device=dev)[None, :]
        tile_keys = keys * hkv + head[:, None]
        return TilePlan(SelfBlocks.build(routing), pairs, tile_pairs, tile_keys, ns, tq, hq)
