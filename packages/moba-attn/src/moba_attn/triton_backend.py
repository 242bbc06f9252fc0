"""MoBA on Triton: fused gate + top-k, block-sparse attention with online softmax, and its backward.

The tile layout is the torch backend's (:class:`moba_attn.torch_backend.TorchPlan`): own blocks are
causal tiles (rows = offsets in the block, one query head per tile), routed blocks are tiles of gathered
(query, head) rows that chose the same (kv head, block). Each tile attends one contiguous key range of
one kv head, so K/V are read in place (no GQA copies). Partial outputs are merged by LSE
(:mod:`moba_attn.merge`), and the backward recomputes probabilities from the merged LSE.

Triton is imported when this module is imported, which happens only on the first ``backend="triton"``
call. On CPU it runs only under ``TRITON_INTERPRET=1`` (tests); autotuning is used only on a GPU.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
from torch import Tensor

from . import triton_kernels as kern
from .inputs import Layout
from .merge import merge_partials
from .routing import BlockTable, QueryInfo, Routing, gate_means
from .torch_backend import TorchPlan

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Rows of gathered queries per routed tile; also the tile height of the fixed (non-autotuned) launch.
_ROWS = 64
_GATE_BM = 16
_GATE_BN = 16
_FIXED = {"BM": 16, "BN": 16} if _INTERPRET else {"BM": 64, "BN": 64}


@functools.cache
def _fwd_kernel():
    """The forward kernel, autotuned over tile shapes on a GPU only (the interpreter cannot autotune)."""
    if _INTERPRET or not torch.cuda.is_available():
        return None
    configs = [
        triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in ((64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 128, 8, 2))
    ]
    return triton.autotune(configs=configs, key=["D", "R", "CAUSAL", "IEEE"])(kern.attn_fwd_kernel)


def _bd(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def gate_topk_triton(
    q: Tensor,
    means: Tensor,
    layout: Layout,
    table: BlockTable,
    info: QueryInfo,
    topk: int,
    sink_blocks: int = 0,
) -> Tensor:
    """Fused gate + top-k: ``[Tq, Hq, topk - 1]`` global block ids (``-1`` = none), same rule as torch's."""
    tq, hq, d = q.shape
    dev = q.device
    n_sel = topk - 1
    sel = torch.full((tq, hq, n_sel), -1, dtype=torch.int32, device=dev)
    n_tiles = (layout.len_q + _GATE_BM - 1) // _GATE_BM
    total = int(n_tiles.sum())
    if total == 0 or n_sel == 0:
        return sel.long()
    seq = torch.repeat_interleave(torch.arange(layout.n_seq, device=dev), n_tiles, output_size=total)
    local = torch.arange(total, device=dev) - (torch.cumsum(n_tiles, 0) - n_tiles)[seq]
    r0 = layout.cu_q[seq] + local * _GATE_BM
    r1 = torch.minimum(r0 + _GATE_BM, layout.cu_q[seq + 1])
    boff = table.block_offset[seq]
    own = (info.own_block - table.block_offset[info.seq]).to(torch.int32)
    kern.gate_topk_kernel[(total, hq)](
        q.contiguous(), means.contiguous(), own, r0.to(torch.int32), r1.to(torch.int32), boff.to(torch.int32), sel,
        HQ=hq, HKV=means.shape[1], D=d, NSEL=n_sel, SINK=sink_blocks, BM=_GATE_BM, BN=_GATE_BN, BD=_bd(d),
    )  # fmt: skip
    return sel.long()


class _Tiles:
    """One launch's worth of tiles: ``rows_q/rows_o [n, R]`` (flat rows, -1 = pad), one key range each."""

    def __init__(
        self, rows_q: Tensor, rows_o: Tensor, kstart: Tensor, klen: Tensor, kvh: Tensor, causal: bool
    ):
        self.rows_q = rows_q.to(torch.int32).contiguous()
        self.rows_o = rows_o.to(torch.int32).contiguous()
        self.kstart = kstart.to(torch.int32).contiguous()
        self.klen = klen.to(torch.int32).contiguous()
        self.kvh = kvh.to(torch.int32).contiguous()
        self.causal = causal

    @property
    def n(self) -> int:
        return self.rows_q.shape[0]

    @property
    def r(self) -> int:
        return self.rows_q.shape[1]


def _plan(routing: Routing, hq: int, hkv: int) -> tuple[_Tiles, _Tiles | None]:
    grp = hq // hkv
    tp = TorchPlan.build(routing, hkv, tile_rows=_ROWS)
    sb = tp.self_blocks
    dev = sb.q_index.device
    heads = torch.arange(hq, device=dev)
    qi = sb.q_index[:, None, :]  # [nbq, 1, B]
    rows = torch.where(qi >= 0, qi * hq + heads[None, :, None], -1).reshape(-1, sb.q_index.shape[1])
    blocks = sb.blocks.repeat_interleave(hq)
    self_tiles = _Tiles(
        rows, rows, routing.table.block_start[blocks], routing.table.block_len[blocks],
        heads.repeat(sb.blocks.numel()) // grp, causal=True,
    )  # fmt: skip
    if tp.n_selected == 0 or tp.tile_pairs.shape[0] == 0:
        return self_tiles, None
    ok = tp.tile_pairs >= 0
    pr = tp.tile_pairs.clamp(min=0)
    first = tp.tile_keys[:, 0]
    routed = _Tiles(
        torch.where(ok, tp.pairs.q_row[pr], -1), torch.where(ok, tp.pairs.slot[pr], -1),
        first // hkv, torch.full_like(first, routing.layout.block_size), first % hkv, causal=False,
    )  # fmt: skip
    return self_tiles, routed


def _launch_fwd(q, k, v, o, lse, tiles: _Tiles, scale: float) -> None:
    d = q.shape[-1]
    args = (q, k, v, o, lse, tiles.rows_q, tiles.rows_o, tiles.kstart, tiles.klen, tiles.kvh, scale)
    meta = dict(HKV=k.shape[1], D=d, R=tiles.r, CAUSAL=tiles.causal, IEEE=q.dtype == torch.float32, BD=_bd(d))
    tuned = _fwd_kernel()
    if tuned is None:
        grid = (tiles.n, triton.cdiv(tiles.r, _FIXED["BM"]))
        kern.attn_fwd_kernel[grid](*args, **meta, **_FIXED)
    else:
        tuned[lambda m: (tiles.n, triton.cdiv(tiles.r, m["BM"]))](*args, **meta)


def _launch_bwd(q, k, v, do, lse, delta, dq, dk, dv, tiles: _Tiles, scale: float) -> None:
    d = q.shape[-1]
    meta = dict(HKV=k.shape[1], D=d, R=tiles.r, CAUSAL=tiles.causal, IEEE=q.dtype == torch.float32, BD=_bd(d))
    common = (tiles.rows_q, tiles.kstart, tiles.klen, tiles.kvh, scale)
    bm, bn = _FIXED["BM"], _FIXED["BN"]
    max_keys = int(tiles.klen.max()) if tiles.n else 0
    kern.attn_bwd_dkdv_kernel[(tiles.n, triton.cdiv(max_keys, bn))](
        q, k, v, do, lse, delta, dk, dv, *common, **meta, BM=bm, BN=bn
    )
    kern.attn_bwd_dq_kernel[(tiles.n, triton.cdiv(tiles.r, bm))](
        q, k, v, do, lse, delta, dq, *common, **meta, BM=bm, BN=bn
    )


class _MobaTritonFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, tiles: tuple, n_sel: int, scale: float):  # type: ignore[override]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        tq, hq, d = q.shape
        self_tiles, routed = tiles
        o_self = torch.zeros(tq * hq, d, dtype=torch.float32, device=q.device)
        lse_self = torch.full((tq * hq,), float("-inf"), dtype=torch.float32, device=q.device)
        _launch_fwd(q, k, v, o_self, lse_self, self_tiles, scale)
        if routed is None:
            o, lse = o_self.view(tq, hq, d), lse_self.view(tq, hq)
        else:
            o_r = torch.zeros(tq * hq * n_sel, d, dtype=torch.float32, device=q.device)
            lse_r = torch.full((tq * hq * n_sel,), float("-inf"), dtype=torch.float32, device=q.device)
            _launch_fwd(q, k, v, o_r, lse_r, routed, scale)
            o_parts = torch.cat([o_self.view(tq, hq, 1, d), o_r.view(tq, hq, n_sel, d)], dim=2)
            lse_parts = torch.cat([lse_self.view(tq, hq, 1), lse_r.view(tq, hq, n_sel)], dim=2)
            o, lse = merge_partials(o_parts, lse_parts)
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.tiles, ctx.scale = tiles, scale
        return o, lse

    @staticmethod
    def backward(ctx, do: Tensor, dlse: Tensor | None):  # type: ignore[override]
        q, k, v, o, lse = ctx.saved_tensors
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1)
        if dlse is not None:
            delta = delta - dlse.float()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        lse_c, delta_c = lse.contiguous(), delta.contiguous()
        for tiles in ctx.tiles:
            if tiles is not None and tiles.n:
                _launch_bwd(q, k, v, do, lse_c, delta_c, dq, dk, dv, tiles, ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def moba_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Layout,
    topk: int,
    scale: float,
    block_means: Tensor | None,
    sink_blocks: int = 0,
) -> tuple[Tensor, Tensor]:
    """Triton backend: ``o [Tq, Hq, D]`` (q's dtype), ``lse [Tq, Hq]`` fp32."""
    table = BlockTable.build(layout)
    info = QueryInfo.build(layout, table)
    if topk > 1:
        means = gate_means(q, k, layout, table, block_means)
        sel = gate_topk_triton(q, means, layout, table, info, topk, sink_blocks)
    else:
        sel = torch.empty(q.shape[0], q.shape[1], 0, dtype=torch.int64, device=q.device)
    routing = Routing(layout, table, info, sel)
    tiles = _plan(routing, q.shape[1], k.shape[1])
    return _MobaTritonFn.apply(q, k, v, tiles, topk - 1, scale)
