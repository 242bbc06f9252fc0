"""Fused CPU MoBA: PyTorch's flash-attention CPU kernel run on views of K/V (Lu et al. 2025, Sec. 2.3).

The paper's Algorithm 1 maps onto a fused attention kernel that returns the log-sum-exp and has a
backward: PyTorch ships one for CPU, ``aten::_scaled_dot_product_flash_attention_for_cpu`` (tiled,
online softmax, no score tensor in memory, GQA without repeating K/V). This module writes only the
MoBA part around it:

1. *Own blocks*: for each sequence, its complete query blocks are one causal kernel call on strided
   block views ``[n_blocks, H, block_size, D]`` of ``q, k, v`` (no copy); a block that holds only the
   last queries of a decode step or a chunk (fewer queries than keys) is a call with a bottom-right
   causal mask, and a partial last block a small causal call.
2. *Routed blocks*: the (query, head) pairs that chose a block are grouped per (kv head, block); each
   group's queries are gathered (``n x D``, the only copy) and attend the block read in place from
   ``k, v`` (any strides: a KV cache's ``[S, H, D]`` view is not copied). Only real rows are computed:
   no tile padding, and own blocks compute causal triangles, not squares.
3. Each group's result is merged straight into the running output by its log-sum-exp (the online
   softmax merge of :mod:`moba_attn.merge`, one group at a time), so working memory is one group's
   rows, not a ``[T, H, topk, D]`` stack.

The backward calls the kernel's backward per call of the forward with the *merged* output and
log-sum-exp: then ``dS = P * (dO V^T - rowsum(dO * O))`` with ``P`` normalised over all attended keys,
which is the exact gradient of the merged attention. A gradient of the returned log-sum-exp adds
``dS += P * dlse``; that is the kernel's backward once more with ``V = 0``, ``O = e_0`` and
``dO = -dlse * e_0`` (so ``dO V^T = 0`` and ``rowsum(dO * O) = -dlse``), run only when such a gradient
arrives.

CPU only (the kernel's name says so); :mod:`moba_attn.torch_backend` is the device-neutral path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .inputs import Layout
from .merge import merge_partials
from .planned import PlannedAttention
from .routing import RoutedPairs, Routing

_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Query rows per own-block call: the kernel allocates its outputs (and, backward, three gradients) per
# call, so complete blocks go in calls of at most this many rows, not one call for the whole sequence.
_SPAN_ROWS = 4096


def fused_supported(q: Tensor) -> bool:
    """Whether the fused CPU kernel takes these inputs (CPU tensors of a float dtype it implements)."""
    return q.device.type == "cpu" and q.dtype in _DTYPES


@dataclass(frozen=True)
class _Span:
    """One own-block kernel call: ``n_blocks`` blocks of ``n_q`` queries over ``n_k`` keys each.

    Queries are packed rows ``q0 : q0 + n_blocks * n_q``, keys ``k0 : k0 + n_blocks * n_k``. Several
    blocks per call only when ``n_q == n_k`` (square causal). ``merge``: the rows already hold the result
    of an earlier span (the keys before the first query of a chunk), merged by log-sum-exp.
    """

    q0: int
    k0: int
    n_blocks: int
    n_q: int
    n_k: int
    causal: bool
    merge: bool = False


@dataclass(frozen=True)
class _Group:
    """One routed kernel call: pairs ``p0 : p1`` of the plan attend keys ``k0 : k0 + n_k`` of kv head ``h``."""

    p0: int
    p1: int
    h: int
    k0: int
    n_k: int


@dataclass(frozen=True)
class FusedPlan:
    """The calls of one MoBA attention, built once in the forward and reused by the backward."""

    spans: list[_Span]
    groups: list[_Group]
    q_rows: Tensor  # [pairs] flat rows of q.view(Tq * Hq, D), grouped as in ``groups``


def own_spans(layout: Layout, block: int) -> list[_Span]:
    """The own-block calls of every sequence; ``block`` may be the whole sequence (dense causal).

    Complete blocks go ``_SPAN_ROWS // block`` to a call. A block whose first queries are not its first
    keys (decode, chunked prefill) is two calls with no mask: its keys before the first query, which
    every query sees, and the causal square after.
    """
    spans: list[_Span] = []
    cu_q, cu_k = layout.cu_q.tolist(), layout.cu_k.tolist()
    for s in range(layout.n_seq):
        lq, lk = cu_q[s + 1] - cu_q[s], cu_k[s + 1] - cu_k[s]
        first = lk - lq  # position of the first query
        pos = first
        while pos < lk:
            b0 = pos // block * block  # start of the block holding position ``pos``
            row = cu_q[s] + pos - first
            if pos == b0 and lk - pos >= block:  # complete blocks holding only queries: causal calls
                n = min((lk - pos) // block, max(1, _SPAN_ROWS // block))
                spans.append(_Span(row, cu_k[s] + b0, n, block, block, True))
                pos += n * block
                continue
            end = min(lk, b0 + block)
            n_q = end - pos
            if pos > b0:  # keys of the block before the first query: all visible
                n_k = pos - b0 + (1 if n_q == 1 else 0)
                spans.append(_Span(row, cu_k[s] + b0, 1, n_q, n_k, False))
                if n_q == 1:
                    pos = end
                    continue
            spans.append(_Span(row, cu_k[s] + pos, 1, n_q, n_q, n_q > 1, merge=pos > b0))
            pos = end
    return spans


def routed_groups(routing: Routing, hkv: int) -> tuple[list[_Group], Tensor]:
    """The (kv head, block) groups of routed pairs, and the flat query rows of all pairs in group order."""
    pairs = RoutedPairs.build(routing, hkv)
    if pairs.q_row.numel() == 0:
        return [], pairs.q_row
    nblk = routing.table.n_blocks
    starts = pairs.group_start
    nonempty = torch.nonzero(starts[1:] > starts[:-1]).squeeze(1)
    blk = nonempty % nblk
    cols = torch.stack(
        [starts[nonempty], starts[nonempty + 1], nonempty // nblk, routing.table.block_start[blk],
         routing.table.block_len[blk]]
    ).tolist()  # fmt: skip
    return [_Group(*g) for g in zip(*cols)], pairs.q_row


def _view_blocks(x: Tensor, start: int, n_blocks: int, length: int) -> Tensor:
    """``x[start : start + n_blocks * length]`` of a packed ``[T, H, ...]`` as ``[n_blocks, H, length, ...]``."""
    return x[start : start + n_blocks * length].unflatten(0, (n_blocks, length)).transpose(1, 2)


def _unview(x: Tensor) -> Tensor:
    """Inverse layout of :func:`_view_blocks`: ``[n, H, L, ...] -> [n * L, H, ...]``."""
    return x.transpose(1, 2).flatten(0, 1)


def _merge_into(o_acc: Tensor, lse_acc: Tensor, rows: Tensor, o_g: Tensor, lse_g: Tensor) -> None:
    """Online-softmax merge of one group's partial result into rows of the running output (fp32)."""
    lse_old = lse_acc[rows]
    lse_new = torch.logaddexp(lse_old, lse_g)
    o_acc[rows] = (
        o_acc[rows] * torch.exp(lse_old - lse_new)[..., None]
        + o_g.float() * torch.exp(lse_g - lse_new)[..., None]
    )
    lse_acc[rows] = lse_new


def _single_call(plan: FusedPlan, q: Tensor, k: Tensor) -> _Span | None:
    """The plan's only call when it covers all of ``q`` and ``k`` (dense causal attention of one
    sequence): then the kernel's own output and gradients are the result, with no accumulators."""
    if plan.groups or len(plan.spans) != 1:
        return None
    sp = plan.spans[0]
    whole = (
        sp.q0 == 0
        and sp.k0 == 0
        and sp.n_blocks * sp.n_q == q.shape[0]
        and sp.n_blocks * sp.n_k == k.shape[0]
    )
    return sp if whole else None


def fused_forward(q: Tensor, k: Tensor, v: Tensor, plan: FusedPlan, scale: float) -> tuple[Tensor, Tensor]:
    """``o [Tq, Hq, D]`` (fp32, or q's dtype for a single call) and ``lse [Tq, Hq]`` fp32 as planned."""
    tq, hq, d = q.shape
    sp = _single_call(plan, q, k)
    if sp is not None:
        views = [_view_blocks(x, 0, sp.n_blocks, n) for x, n in ((q, sp.n_q), (k, sp.n_k), (v, sp.n_k))]
        ob, lb = _FWD(*views, 0.0, sp.causal, scale=scale)
        return _unview(ob), _unview(lb)
    o = torch.empty(tq, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(tq, hq, dtype=torch.float32, device=q.device)
    for sp in plan.spans:
        args = [
            _view_blocks(x, s, sp.n_blocks, n)
            for x, s, n in ((q, sp.q0, sp.n_q), (k, sp.k0, sp.n_k), (v, sp.k0, sp.n_k))
        ]
        ob, lb = _FWD(*args, 0.0, sp.causal, scale=scale)
        rows = slice(sp.q0, sp.q0 + sp.n_blocks * sp.n_q)
        if sp.merge:
            _merge_into(o, lse, rows, _unview(ob), _unview(lb))
        else:
            o[rows] = _unview(ob)
            lse[rows] = _unview(lb)
    if plan.groups:
        o_flat, lse_flat, q_flat = o.view(tq * hq, d), lse.view(tq * hq), q.reshape(tq * hq, d)
        for g in plan.groups:
            rows = plan.q_rows[g.p0 : g.p1]
            qg = q_flat[rows][None, None]
            kg, vg = (x[g.k0 : g.k0 + g.n_k, g.h][None, None] for x in (k, v))
            og, lg = _FWD(qg, kg, vg, 0.0, False, scale=scale)
            _merge_into(o_flat, lse_flat, rows, og[0, 0], lg[0, 0])
    return o, lse


def _backward_pass(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, plan: FusedPlan, scale: float,
    dq: Tensor, dk: Tensor, dv: Tensor | None,
) -> None:  # fmt: skip
    """Add the kernel's gradients of every planned call to ``dq, dk`` (and ``dv`` unless ``None``)."""
    tq, hq, d = q.shape
    for sp in plan.spans:
        view = [
            _view_blocks(x, s, sp.n_blocks, n)
            for x, s, n in ((do, sp.q0, sp.n_q), (q, sp.q0, sp.n_q), (k, sp.k0, sp.n_k), (v, sp.k0, sp.n_k),
                            (o, sp.q0, sp.n_q), (lse, sp.q0, sp.n_q))
        ]  # fmt: skip
        gq, gk, gv = _BWD(*view, 0.0, sp.causal, scale=scale)
        dq[sp.q0 : sp.q0 + sp.n_blocks * sp.n_q] += _unview(gq)
        dk[sp.k0 : sp.k0 + sp.n_blocks * sp.n_k] += _unview(gk)
        if dv is not None:
            dv[sp.k0 : sp.k0 + sp.n_blocks * sp.n_k] += _unview(gv)
    if not plan.groups:
        return
    flat = [x.reshape(tq * hq, *x.shape[2:]) for x in (do, q, o, lse)]
    dq_flat = dq.view(tq * hq, d)
    for g in plan.groups:
        rows = plan.q_rows[g.p0 : g.p1]
        dog, qg, og, lg = (x[rows][None, None] for x in flat)
        kg, vg = (x[g.k0 : g.k0 + g.n_k, g.h][None, None] for x in (k, v))
        gq, gk, gv = _BWD(dog, qg, kg, vg, og, lg, 0.0, False, scale=scale)
        dq_flat.index_add_(0, rows, gq[0, 0].float())
        dk[g.k0 : g.k0 + g.n_k, g.h] += gk[0, 0]
        if dv is not None:
            dv[g.k0 : g.k0 + g.n_k, g.h] += gv[0, 0]


def fused_backward(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, dlse: Tensor | None,
    plan: FusedPlan, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    sp = _single_call(plan, q, k)
    if sp is not None and (dlse is None or not bool(dlse.any())):
        views = [
            _view_blocks(x, 0, sp.n_blocks, n)
            for x, n in (
                (do.to(q.dtype), sp.n_q),
                (q, sp.n_q),
                (k, sp.n_k),
                (v, sp.n_k),
                (o, sp.n_q),
                (lse, sp.n_q),
            )
        ]
        return tuple(_unview(g) for g in _BWD(*views, 0.0, sp.causal, scale=scale))  # type: ignore[return-value]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    do = do.to(q.dtype)
    _backward_pass(do, q, k, v, o, lse, plan, scale, dq, dk, dv)
    if dlse is not None and bool(dlse.any()):
        # dS += P * dlse: the kernel's backward with V = 0, O = e_0, dO = -dlse * e_0 (module docstring)
        e0 = torch.zeros_like(o)
        e0[..., 0] = 1.0
        g0 = torch.zeros_like(o)
        g0[..., 0] = -dlse.to(q.dtype)
        _backward_pass(g0, q, k, torch.zeros_like(v), e0, lse, plan, scale, dq, dk, None)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def moba_attention_fused(
    q: Tensor, k: Tensor, v: Tensor, routing: Routing, scale: float
) -> tuple[Tensor, Tensor]:
    """Fused CPU backend on a precomputed routing: ``o [Tq, Hq, D]`` (q's dtype), ``lse [Tq, Hq]`` fp32."""
    layout = routing.layout
    spans = own_spans(layout, layout.block_size)
    groups, q_rows = (
        routed_groups(routing, k.shape[1]) if routing.n_selected else ([], q.new_empty(0, dtype=torch.int64))
    )
    return PlannedAttention.apply(
        q, k, v, FusedPlan(spans, groups, q_rows), scale, fused_forward, fused_backward
    )


def dense_causal_fused(
    q: Tensor, k: Tensor, v: Tensor, layout: Layout, scale: float
) -> tuple[Tensor, Tensor]:
    """Causal attention over each whole sequence (what MoBA is when ``topk`` blocks cover the context)."""
    spans = own_spans(layout, max(1, layout.max_len_k))
    plan = FusedPlan(spans, [], q.new_empty(0, dtype=torch.int64))
    return PlannedAttention.apply(q, k, v, plan, scale, fused_forward, fused_backward)


# Up to this many sequences, a call whose every sequence has one query runs :func:`decode_steps`.
_DECODE_SEQUENCES = 16


def decode_applies(q: Tensor, k: Tensor, v: Tensor, layout: Layout) -> bool:
    """A decode step without autograd: one query per sequence, few sequences, nothing needing a gradient."""
    if layout.n_seq > _DECODE_SEQUENCES or q.shape[0] != layout.n_seq or not fused_supported(q):
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False  # the kernel's log-sum-exp output has no gradient; the planned path has one
    return bool((layout.len_q == 1).all())


def decode_steps(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Layout,
    topk: int,
    scale: float,
    means: Tensor | None,
    sink_blocks: int,
) -> tuple[Tensor, Tensor]:
    """One decode step per sequence (each sequence's single query is its last position): ``o, lse``.

    The general path plans for many queries (block tables, pair sorting, group lists: ~1000 small ops);
    a decode step needs a handful per sequence: the gate against the complete earlier blocks' means, a
    stable sort (ties to the earlier block, sinks first), one fused-kernel call for the own block (all
    heads at once) and one per (kv head, chosen block), reading K/V in place, merged by log-sum-exp.
    ``means`` is the packed ``[NBLK, Hkv, D]`` fp32 block means of all sequences.
    """
    hq, d = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    grp = hq // hkv
    bs = layout.block_size
    o = torch.empty(q.shape[0], hq, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[0], hq, dtype=torch.float32, device=q.device)
    cu_k = layout.cu_k.tolist()
    block0 = 0
    for s in range(layout.n_seq):
        k0, lk = cu_k[s], cu_k[s + 1] - cu_k[s]
        own = (lk - 1) // bs  # own block; blocks 0 .. own - 1 are complete and earlier
        qs = q[s][None, :, None]  # [1, Hq, 1, D]
        kv = [x[k0 + own * bs : k0 + lk].transpose(0, 1)[None] for x in (k, v)]  # [1, Hkv, n, D] views
        oo, lo = _FWD(qs, *kv, 0.0, False, scale=scale)
        o_own, l_own = oo[0, :, 0], lo[0, :, 0]  # [Hq, D], [Hq]
        take = min(topk - 1, own)
        if take > 0:
            gate = torch.einsum(
                "hgd,nhd->hgn", qs[0, :, 0].float().view(hkv, grp, d), means[block0 : block0 + own]
            )
            if sink_blocks:
                gate[..., :sink_blocks] = float("inf")
            chosen = torch.sort(gate, dim=-1, descending=True, stable=True).indices[
                ..., :take
            ]  # [Hkv, grp, take]
            o_r = q.new_zeros(hq, take, d, dtype=torch.float32)
            l_r = torch.full((hq, take), float("-inf"), dtype=torch.float32, device=q.device)
            for h, heads in enumerate(chosen.tolist()):
                by_block: dict[int, list[tuple[int, int]]] = {}
                for g, blocks in enumerate(heads):
                    for j, b in enumerate(blocks):
                        by_block.setdefault(b, []).append((h * grp + g, j))
                for b, users in by_block.items():
                    rows = [u[0] for u in users]
                    kb, vb = (x[k0 + b * bs : k0 + (b + 1) * bs, h][None, None] for x in (k, v))
                    og, lg = _FWD(qs[0, rows, 0][None, None], kb, vb, 0.0, False, scale=scale)
                    for i, (row, j) in enumerate(users):
                        o_r[row, j], l_r[row, j] = og[0, 0, i], lg[0, 0, i]
            o[s], lse[s] = merge_partials(
                torch.cat([o_own.float()[:, None], o_r], dim=1), torch.cat([l_own[:, None], l_r], dim=1)
            )
        else:
            o[s], lse[s] = o_own, l_own
        block0 += (lk + bs - 1) // bs
    return o.to(q.dtype), lse
