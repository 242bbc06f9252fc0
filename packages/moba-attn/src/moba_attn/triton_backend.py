"""MoBA on Triton: fused gate + top-k, block-sparse attention with online softmax, and its backward.

The tile layout is the torch backend's (:class:`moba_attn.tiles.TilePlan`): own blocks are
causal tiles (rows = offsets in the block, one query head per tile), routed blocks are tiles of gathered
(query, head) rows that chose the same (kv head, block). Each tile attends one contiguous key range of
one kv head, so K/V are read in place (no GQA copies). Partial outputs are merged by LSE
(:mod:`moba_attn.merge`), and the backward recomputes probabilities from the merged LSE.

The backward accumulates dQ/dK/dV with fp32 atomics by default (fast, not bitwise reproducible); with
``deterministic=True`` it uses one owner per key chunk and per-slot dQ partials instead (see
:mod:`moba_attn.triton_kernels`).

Triton is imported when this module is imported, which happens only on the first ``backend="triton"``
call. On CPU it runs only under ``TRITON_INTERPRET=1`` (tests); autotuning is used only on a GPU.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from . import triton_kernels as kern
from .inputs import Layout
from .merge import merge_partials
from .routing import BlockTable, QueryInfo, Routing
from .tiles import TilePlan

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Rows of gathered queries per routed tile.
_ROWS = 64
_GATE_BM = 16
_GATE_BN = 16
# Shared memory a block may use, in bytes: the smallest opt-in per-block limit of sm80+ GPUs (99 KiB on
# sm86/sm89; A100 allows 163 KiB, H100 227 KiB). Triton opts in past the 48 KiB default by itself, so
# configs under this budget launch on every Ampere-or-newer GPU.
SMEM_BUDGET = 99 * 1024
# fp32 values a thread can keep live without heavy spilling (of its 255 registers); past it, 8 warps.
_LIVE_PER_THREAD = 128


class TileConfig(NamedTuple):
    """A launch config of the attention kernels: row tile ``bm``, key tile ``bn``, warps, pipeline stages."""

    bm: int
    bn: int
    num_warps: int
    num_stages: int


# Largest first: the backward takes the first that fits, the forward autotunes over all that fit.
_CANDIDATES = ((128, 128, 2), (128, 64, 2), (64, 64, 3), (64, 64, 2), (32, 64, 2), (64, 32, 3),
               (32, 32, 2), (16, 32, 2), (32, 16, 2), (16, 16, 2), (16, 16, 1))  # fmt: skip
# The interpreter (CPU tests) runs the smallest valid tiles: fastest there, and every dot dim is >= 16.
_INTERPRET_CONFIG = TileConfig(16, 16, 4, 1)


def smem_bytes(bm: int, bn: int, stages: int, bd: int, itemsize: int, backward: bool = False) -> int:
    """Estimated shared memory of one program, in bytes (Triton stages ``tl.dot`` operands there).

    Forward: the Q tile ``bm x bd`` once, K and V tiles ``bn x bd`` each per pipeline stage, in the input
    dtype, plus the ``bm x bn`` probabilities in fp32 on their way into the second dot. Backward (dK/dV
    kernel; the dQ kernel is the same with ``bm`` and ``bn`` swapped, and the larger counts): K and V
    ``bn x bd`` once, Q and dO ``bm x bd`` per stage, P and dS ``bm x bn`` in fp32 for the transposed dots.
    The fp32 accumulators (O; dK, dV; dQ) live in registers and are bounded by the warp count instead.
    """
    tile = bm * bn * 4
    if not backward:
        return itemsize * bd * (bm + 2 * stages * bn) + tile
    dkdv = itemsize * bd * (2 * bn + 2 * stages * bm)
    dq = itemsize * bd * (2 * bm + 2 * stages * bn)
    return max(dkdv, dq) + 2 * tile


def tile_configs(
    bd: int, itemsize: int, backward: bool = False, budget: int = SMEM_BUDGET
) -> list[TileConfig]:
    """Launch configs for head dim ``bd`` (padded to a power of two >= 16) at ``itemsize`` bytes per element.

    Keeps the candidates whose :func:`smem_bytes` fit ``budget`` (bytes), largest first, and gives each 4
    warps, or 8 when its fp32 accumulators and score tiles exceed :data:`_LIVE_PER_THREAD` values per
    thread at 4 warps. Backward row tiles are at most a routed tile's ``_ROWS`` rows (taller ones would
    be half padding; the forward's autotuner, keyed on the tile height, decides for itself). Every
    config has ``bm, bn >= 16`` (the ``tl.dot`` minimum); the list is never empty for ``bd <= 256`` and
    2- or 4-byte elements.
    """
    out = []
    for bm, bn, stages in _CANDIDATES:
        if smem_bytes(bm, bn, stages, bd, itemsize, backward) > budget or (backward and bm > _ROWS):
            continue
        live = bm * bd + bm * bn if not backward else max(2 * bn * bd, bm * bd) + 2 * bm * bn
        warps = 4 if live <= _LIVE_PER_THREAD * 4 * 32 else 8
        out.append(TileConfig(bm, bn, warps, stages))
    if not out:
        raise ValueError(
            f"moba: no triton tile config fits {budget} bytes of shared memory at head dim {bd} and "
            f"{itemsize}-byte elements; use backend='torch' or a smaller head dim"
        )
    return out


def _bd(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


@functools.cache
def _fwd_kernel(bd: int, itemsize: int):
    """The forward kernel autotuned over :func:`tile_configs` (GPU only: the interpreter cannot autotune)."""
    configs = [
        triton.Config({"BM": c.bm, "BN": c.bn}, num_warps=c.num_warps, num_stages=c.num_stages)
        for c in tile_configs(bd, itemsize)
    ]
    return triton.autotune(configs=configs, key=["D", "R", "CAUSAL", "IEEE"])(kern.attn_fwd_kernel)


def _bwd_config(bd: int, itemsize: int) -> TileConfig:
    """The backward's tiles: fixed, not autotuned (a re-run would add its atomics twice)."""
    return _INTERPRET_CONFIG if _INTERPRET else tile_configs(bd, itemsize, backward=True)[0]


def _index_dtype(bound: int) -> torch.dtype:
    """int32 for indices known to be below ``bound``, when ``bound <= 2**31``; else int64.

    The kernels widen every loaded index to int64 before multiplying (:func:`triton_kernels._row_offset`),
    so an index table only has to hold the index itself. Flat query rows ``q_index * Hq + h`` stay below
    ``Tq * Hq`` and routed output slots below ``Tq * Hq * (topk - 1)``: int32 up to 2**31 of them (half
    the memory of int64 for the ``[n_tiles, rows]`` tables), int64 past that.
    """
    return torch.int32 if bound <= 2**31 else torch.int64


def _idx(x: Tensor, bound: int) -> Tensor:
    return x.to(_index_dtype(bound)).contiguous()


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
    sel = torch.full((tq, hq, n_sel), -1, dtype=torch.int64, device=dev)
    n_tiles = (layout.len_q + _GATE_BM - 1) // _GATE_BM
    total = int(n_tiles.sum())
    if total == 0 or n_sel == 0:
        return sel
    seq = torch.repeat_interleave(torch.arange(layout.n_seq, device=dev), n_tiles, output_size=total)
    local = torch.arange(total, device=dev) - (torch.cumsum(n_tiles, 0) - n_tiles)[seq]
    r0 = layout.cu_q[seq] + local * _GATE_BM
    r1 = torch.minimum(r0 + _GATE_BM, layout.cu_q[seq + 1])
    boff = table.block_offset[seq]
    own = (info.own_block - table.block_offset[info.seq]).to(torch.int32)
    kern.gate_topk_kernel[(total, hq)](
        q.contiguous(), means.contiguous(), own, _idx(r0, tq + 1), _idx(r1, tq + 1),
        _idx(boff, table.n_blocks + 1), sel,
        HQ=hq, HKV=means.shape[1], D=d, NSEL=n_sel, SINK=sink_blocks, BM=_GATE_BM, BN=_GATE_BN, BD=_bd(d),
    )  # fmt: skip
    return sel


@dataclass(frozen=True)
class _Tiles:
    """One launch's worth of tiles: ``rows_q/rows_o [n, R]`` (flat rows, -1 = pad), one key range each."""

    rows_q: Tensor
    rows_o: Tensor
    kstart: Tensor
    klen: Tensor
    kvh: Tensor
    causal: bool

    @property
    def n(self) -> int:
        return self.rows_q.shape[0]

    @property
    def r(self) -> int:
        return self.rows_q.shape[1]


@dataclass(frozen=True)
class _KeyGroups:
    """The deterministic backward's work list: which tiles attend each (kv head, key block).

    Group ``g = hk * NBLK + b`` (the order of :class:`moba_attn.routing.RoutedPairs`). ``self_t0`` is the
    first of its ``Hq / Hkv`` own-block tiles (-1: the block holds no query), ``routed_t0 / routed_n``
    its contiguous run of routed tiles; ``kstart, klen, kvh`` its keys.
    """

    self_t0: Tensor
    routed_t0: Tensor
    routed_n: Tensor
    kstart: Tensor
    klen: Tensor
    kvh: Tensor

    @staticmethod
    def build(tp: TilePlan, table: BlockTable, hq: int, hkv: int, tk: int) -> _KeyGroups:
        nblk = table.n_blocks
        blocks = tp.self_blocks.blocks
        dev = blocks.device
        g = torch.arange(hkv * nblk, device=dev)
        hk, b = g // nblk, g % nblk
        self_idx = torch.full((nblk,), -1, dtype=torch.int64, device=dev)
        self_idx[blocks] = torch.arange(blocks.numel(), device=dev)
        si = self_idx[b]
        self_t0 = torch.where(si >= 0, si * hq + hk * (hq // hkv), -1)
        # TilePlan numbers routed tiles group by group in this same g order, ceil(pairs / rows) each
        counts = tp.pairs.group_start[1:] - tp.pairs.group_start[:-1]
        routed_n = (counts + _ROWS - 1) // _ROWS
        routed_t0 = torch.cumsum(routed_n, 0) - routed_n
        n_tiles = max(hq * blocks.numel(), tp.tile_pairs.shape[0]) + 1  # tile ids and counts stay below
        return _KeyGroups(
            _idx(self_t0, n_tiles), _idx(routed_t0, n_tiles), _idx(routed_n, n_tiles),
            _idx(table.block_start[b], tk), _idx(table.block_len[b], tk + 1), _idx(hk, hkv),
        )  # fmt: skip

    @property
    def n(self) -> int:
        return self.kvh.shape[0]


@dataclass(frozen=True)
class _Plan:
    """Everything the kernels need for one call, built once in the forward and reused by the backward."""

    self_tiles: _Tiles
    routed: _Tiles | None
    n_sel: int
    block_size: int
    key_groups: _KeyGroups | None  # only for the deterministic backward


def _plan(routing: Routing, hq: int, hkv: int, tk: int, deterministic: bool) -> _Plan:
    grp = hq // hkv
    tq, ns, bs = routing.selected.shape[0], routing.n_selected, routing.layout.block_size
    tp = TilePlan.build(routing, hkv, tile_rows=_ROWS)
    sb = tp.self_blocks
    dev = sb.q_index.device
    heads = torch.arange(hq, device=dev)
    qi = sb.q_index[:, None, :]  # [nbq, 1, B]
    rows = _idx(
        torch.where(qi >= 0, qi * hq + heads[None, :, None], -1).reshape(-1, sb.q_index.shape[1]), tq * hq
    )
    blocks = sb.blocks.repeat_interleave(hq)
    tb = routing.table
    self_tiles = _Tiles(
        rows, rows, _idx(tb.block_start[blocks], tk), _idx(tb.block_len[blocks], tk + 1),
        _idx(heads.repeat(sb.blocks.numel()) // grp, hkv), causal=True,
    )  # fmt: skip
    groups = _KeyGroups.build(tp, tb, hq, hkv, tk) if deterministic else None
    if ns == 0 or tp.tile_pairs.shape[0] == 0:
        return _Plan(self_tiles, None, ns, bs, groups)
    ok = tp.tile_pairs >= 0
    pr = tp.tile_pairs.clamp(min=0)
    first = tp.tile_keys[:, 0]
    routed = _Tiles(
        _idx(torch.where(ok, tp.pairs.q_row[pr], -1), tq * hq),
        _idx(torch.where(ok, tp.pairs.slot[pr], -1), tq * hq * ns),
        _idx(first // hkv, tk), _idx(torch.full_like(first, bs), tk + 1), _idx(first % hkv, hkv),
        causal=False,
    )  # fmt: skip
    return _Plan(self_tiles, routed, ns, bs, groups)


def _meta(q: Tensor, k: Tensor, r: int, causal: bool) -> dict:
    d = q.shape[-1]
    return dict(HKV=k.shape[1], D=d, R=r, CAUSAL=causal, IEEE=q.dtype == torch.float32, BD=_bd(d))


def _launch_fwd(q, k, v, o, lse, tiles: _Tiles, scale: float) -> None:
    args = (q, k, v, o, lse, tiles.rows_q, tiles.rows_o, tiles.kstart, tiles.klen, tiles.kvh, scale)
    meta = _meta(q, k, tiles.r, tiles.causal)
    if _INTERPRET:
        c = _INTERPRET_CONFIG
        kern.attn_fwd_kernel[(tiles.n, triton.cdiv(tiles.r, c.bm))](*args, **meta, BM=c.bm, BN=c.bn)
    else:
        tuned = _fwd_kernel(meta["BD"], q.element_size())
        tuned[lambda m: (tiles.n, triton.cdiv(tiles.r, m["BM"]))](*args, **meta)


def _launch_dq(q, k, v, do, lse, delta, dq, tiles: _Tiles, scale: float, atomic: bool) -> None:
    c = _bwd_config(_bd(q.shape[-1]), q.element_size())
    kern.attn_bwd_dq_kernel[(tiles.n, triton.cdiv(tiles.r, c.bm))](
        q, k, v, do, lse, delta, dq, tiles.rows_q, tiles.rows_o, tiles.kstart, tiles.klen, tiles.kvh, scale,
        **_meta(q, k, tiles.r, tiles.causal), ATOMIC=atomic, BM=c.bm, BN=c.bn,
        num_warps=c.num_warps, num_stages=c.num_stages,
    )  # fmt: skip


def _launch_dkdv_atomic(q, k, v, do, lse, delta, dk, dv, tiles: _Tiles, scale: float) -> None:
    c = _bwd_config(_bd(q.shape[-1]), q.element_size())
    max_keys = int(tiles.klen.max())
    kern.attn_bwd_dkdv_kernel[(tiles.n, triton.cdiv(max_keys, c.bn))](
        q, k, v, do, lse, delta, dk, dv, tiles.rows_q, tiles.kstart, tiles.klen, tiles.kvh, scale,
        **_meta(q, k, tiles.r, tiles.causal), BM=c.bm, BN=c.bn,
        num_warps=c.num_warps, num_stages=c.num_stages,
    )  # fmt: skip


def _launch_dkdv_det(q, k, v, do, lse, delta, dk, dv, plan: _Plan, scale: float) -> None:
    d = q.shape[-1]
    c = _bwd_config(_bd(d), q.element_size())
    g, st = plan.key_groups, plan.self_tiles
    rt = plan.routed if plan.routed is not None else st  # never read then: routed_n is all 0
    kern.attn_bwd_dkdv_det_kernel[(g.n, triton.cdiv(plan.block_size, c.bn))](
        q, k, v, do, lse, delta, dk, dv, st.rows_q, rt.rows_q, g.self_t0, g.routed_t0, g.routed_n,
        g.kstart, g.klen, g.kvh, scale,
        HKV=k.shape[1], D=d, GRP=q.shape[1] // k.shape[1], R_SELF=st.r, R_ROUTED=rt.r,
        IEEE=q.dtype == torch.float32, BM=c.bm, BN=c.bn, BD=_bd(d),
        num_warps=c.num_warps, num_stages=c.num_stages,
    )  # fmt: skip


class _MobaTritonFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: _Plan, scale: float):  # type: ignore[override]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        tq, hq, d = q.shape
        n_sel = plan.n_sel
        o_self = torch.zeros(tq * hq, d, dtype=torch.float32, device=q.device)
        lse_self = torch.full((tq * hq,), float("-inf"), dtype=torch.float32, device=q.device)
        _launch_fwd(q, k, v, o_self, lse_self, plan.self_tiles, scale)
        if plan.routed is None:
            o, lse = o_self.view(tq, hq, d), lse_self.view(tq, hq)
        else:
            o_r = torch.zeros(tq * hq * n_sel, d, dtype=torch.float32, device=q.device)
            lse_r = torch.full((tq * hq * n_sel,), float("-inf"), dtype=torch.float32, device=q.device)
            _launch_fwd(q, k, v, o_r, lse_r, plan.routed, scale)
            o_parts = torch.cat([o_self.view(tq, hq, 1, d), o_r.view(tq, hq, n_sel, d)], dim=2)
            lse_parts = torch.cat([lse_self.view(tq, hq, 1), lse_r.view(tq, hq, n_sel)], dim=2)
            o, lse = merge_partials(o_parts, lse_parts)
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan, ctx.scale = plan, scale
        return o, lse

    @staticmethod
    def backward(ctx, do: Tensor, dlse: Tensor | None):  # type: ignore[override]
        q, k, v, o, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        tq, hq, d = q.shape
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1)
        if dlse is not None:
            delta = delta - dlse.float()
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        args = (q, k, v, do, lse.contiguous(), delta.contiguous())
        tiles = [t for t in (plan.self_tiles, plan.routed) if t is not None and t.n]
        if plan.key_groups is None:
            dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
            for t in tiles:
                _launch_dkdv_atomic(*args, dk, dv, t, ctx.scale)
                _launch_dq(*args, dq, t, ctx.scale, atomic=True)
        else:
            # one partial row per (query row) for the own block and per routed slot, summed in slot order
            dq = torch.zeros(tq * hq, d, dtype=torch.float32, device=q.device)
            if plan.self_tiles.n:
                _launch_dq(*args, dq, plan.self_tiles, ctx.scale, atomic=False)
            if plan.routed is not None and plan.routed.n:
                dq_r = torch.zeros(tq * hq * plan.n_sel, d, dtype=torch.float32, device=q.device)
                _launch_dq(*args, dq_r, plan.routed, ctx.scale, atomic=False)
                dq = dq + dq_r.view(tq * hq, plan.n_sel, d).sum(1)  # a plain reduction: fixed order
            if plan.key_groups.n:
                _launch_dkdv_det(*args, dk, dv, plan, ctx.scale)
        return dq.view(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def moba_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    routing: Routing,
    scale: float,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor]:
    """Triton backend on a precomputed routing: ``o [Tq, Hq, D]`` (q's dtype), ``lse [Tq, Hq]`` fp32.

    The routing comes from :func:`moba_attn.routing.route` like every backend's; on this backend the
    op passes :func:`gate_topk_triton` (the fused gate kernel) as its selector.

    ``deterministic`` makes the backward bitwise reproducible (no fp32 atomics): dK/dV are summed by one
    program per (kv head, key block, key chunk) over the tiles that attend it in a fixed order, and dQ
    partials (one per routed slot, an extra ``[Tq * Hq * (topk - 1), D]`` fp32 buffer) are summed in slot
    order. It costs parallelism where many queries share a block (sink blocks above all).
    """
    plan = _plan(routing, q.shape[1], k.shape[1], k.shape[0], deterministic)
    return _MobaTritonFn.apply(q, k, v, plan, scale)
