"""Tiled pure-PyTorch MoBA (``backend="torch_tiled"``): the readable baseline, and ``"torch"`` off CPU.

Lu et al. 2025, Sec. 2.3 / Algorithm 1, as batched matmuls on the tiles of :mod:`moba_attn.tiles`,
without a ``[T, T]`` anything (on CPU, ``"torch"`` runs :mod:`moba_attn.fused_backend` instead):

1. *Self blocks*: every key block that holds queries attends to itself causally, all blocks at once as one
   batched matmul ``[blocks, Hkv, group * block, block]`` (query heads of a GQA group are stacked as rows,
   so K/V are never repeated).
2. *Routed blocks*: the (query, head) pairs that chose a block are gathered per (kv head, block) into
   tiles of ``tile_rows`` rows and attend the whole block (earlier blocks are complete and fully visible).
3. The partial results are merged with their log-sum-exp (:mod:`moba_attn.merge`).

Work and memory grow as ``T * topk * block_size``; scratch is bounded by processing blocks and tiles in
chunks of ``_SCRATCH_ELEMS`` score elements. The backward pass is flash-style: it recomputes the
probabilities from the saved final LSE, so nothing of size ``T * block_size`` is kept between passes.
Matmuls run in fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .merge import merge_partials
from .planned import PlannedAttention
from .routing import Routing
from .tiles import TilePlan

# Score elements per chunk (64 MiB of fp32); a few such buffers live at once in the backward pass.
_SCRATCH_ELEMS = 1 << 24


def _pad_rows(x: Tensor, fill: float = 0.0) -> Tensor:
    """Append one row of ``fill`` so that index ``len(x)`` means 'padding'."""
    return torch.cat([x, x.new_full((1, *x.shape[1:]), fill)])


def _self_layout(idx: Tensor, n: int) -> Tensor:
    return torch.where(idx < 0, n, idx)


def _stack_heads(x: Tensor, hkv: int) -> Tensor:
    """``[nb, B, Hq, D] -> [nb, Hkv, group * B, D]``: a GQA group's query heads become rows."""
    nb, bs, hq, d = x.shape
    return x.view(nb, bs, hkv, hq // hkv, d).permute(0, 2, 3, 1, 4).reshape(nb, hkv, hq // hkv * bs, d)


def _unstack_heads(x: Tensor, hq: int) -> Tensor:
    """Inverse of :func:`_stack_heads` for ``[nb, Hkv, group * B, ...]`` -> ``[nb * B, Hq, ...]``."""
    nb, hkv, rows = x.shape[:3]
    grp = hq // hkv
    bs = rows // grp
    rest = x.shape[3:]
    y = x.reshape(nb, hkv, grp, bs, *rest).movedim(3, 1)
    return y.reshape(nb * bs, hq, *rest)


def _causal(bs: int, grp: int, device: torch.device, first_row: int = 0) -> Tensor:
    """Causal mask of query offsets ``[first_row, bs)`` over key offsets ``[0, bs)``, tiled per GQA head."""
    return torch.ones(bs, bs, dtype=torch.bool, device=device).tril()[first_row:].repeat(grp, 1)


def _forward(q: Tensor, k: Tensor, v: Tensor, plan: TilePlan, scale: float) -> tuple[Tensor, Tensor]:
    tq, hq, d = q.shape
    hkv = k.shape[1]
    grp = hq // hkv
    dev = q.device
    sb = plan.self_blocks
    bs = sb.q_index.shape[1]

    # 1. own blocks, causal
    o_self = torch.zeros(tq, hq, d, dtype=torch.float32, device=dev)
    lse_self = torch.full((tq, hq), float("-inf"), dtype=torch.float32, device=dev)
    step = max(1, _SCRATCH_ELEMS // (hq * bs * bs))
    for b0 in range(0, sb.blocks.numel(), step):
        qi = sb.q_index[b0 : b0 + step]
        # Only the offsets [r0, r1) that hold a query in this chunk, and the keys they can see (< r1):
        # a decode step or a short chunked prefill is one or a few rows, not a block_size x block_size tile.
        used = (qi >= 0).any(0).nonzero()
        r0, r1 = int(used[0]), int(used[-1]) + 1
        qi = qi[:, r0:r1]
        mask = _causal(r1, grp, dev, r0)
        # padding slots read row 0: padded keys sit after every real query (masked causally) and padded
        # query rows are dropped below, so no padded copy of q, k, v is needed
        ki = sb.k_index[b0 : b0 + step, :r1].clamp(min=0)
        qb = _stack_heads(q[qi.clamp(min=0)].float(), hkv)
        kb = k[ki].float().transpose(1, 2)  # [nb, Hkv, B, D]
        vb = v[ki].float().transpose(1, 2)
        s = torch.matmul(qb, kb.transpose(-1, -2)).mul_(scale).masked_fill_(~mask, float("-inf"))
        m = s.amax(-1, keepdim=True)
        p = torch.exp_(s.sub_(m))
        den = p.sum(-1, keepdim=True)
        ob = torch.matmul(p, vb).div_(den)
        lb = (m + torch.log(den)).squeeze(-1)
        flat = qi.reshape(-1)
        ok = flat >= 0
        o_self[flat[ok]] = _unstack_heads(ob, hq)[ok]
        lse_self[flat[ok]] = _unstack_heads(lb, hq)[ok]
    if plan.n_selected == 0:
        return o_self, lse_self

    # 2. routed blocks: gathered queries per (kv head, block)
    ns = plan.n_selected
    o_r = torch.zeros(tq * hq * ns, d, dtype=torch.float32, device=dev)
    lse_r = torch.full((tq * hq * ns,), float("-inf"), dtype=torch.float32, device=dev)
    q_flat = q.reshape(tq * hq, d)
    _routed_tiles(q_flat, k, v, o_r, lse_r, plan, scale)

    # 3. merge
    o_parts = torch.cat([o_self[:, :, None], o_r.view(tq, hq, ns, d)], dim=2)
    lse_parts = torch.cat([lse_self[:, :, None], lse_r.view(tq, hq, ns)], dim=2)
    return merge_partials(o_parts, lse_parts)


def _routed_tiles(
    q_flat: Tensor, k: Tensor, v: Tensor, o_r: Tensor, lse_r: Tensor, plan: TilePlan, scale: float
):
    """Routed blocks as padded tiles of ``tile_rows`` gathered rows, many tiles per batched matmul."""
    d = q_flat.shape[1]
    bs = plan.tile_keys.shape[1]
    k_flat, v_flat = k.reshape(-1, d), v.reshape(-1, d)
    rows = plan.tile_pairs.shape[1]
    step = max(1, _SCRATCH_ELEMS // (rows * bs))
    for t0 in range(0, plan.tile_pairs.shape[0], step):
        tp = plan.tile_pairs[t0 : t0 + step]
        ok = tp >= 0
        pr = tp.clamp(min=0)
        qt = q_flat[plan.pairs.q_row[pr]].float()
        kt = k_flat[plan.tile_keys[t0 : t0 + step]].float()
        vt = v_flat[plan.tile_keys[t0 : t0 + step]].float()
        s = torch.matmul(qt, kt.transpose(-1, -2)).mul_(scale)
        m = s.amax(-1, keepdim=True)
        p = torch.exp_(s.sub_(m))
        den = p.sum(-1, keepdim=True)
        ot = torch.matmul(p, vt).div_(den)
        slots = plan.pairs.slot[pr[ok]]
        o_r[slots] = ot[ok]
        lse_r[slots] = (m + torch.log(den)).squeeze(-1)[ok]


def _backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    do: Tensor,
    dlse: Tensor | None,
    plan: TilePlan,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    grp = hq // hkv
    dev = q.device
    do = do.float()
    # dL/dS = P * (dP - delta) with delta = rowsum(dO * O) - dL/dlse (the lse gradient enters here)
    delta = (do * o.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    dq = torch.zeros(tq + 1, hq, d, dtype=torch.float32, device=dev)
    dk = torch.zeros(tk + 1, hkv, d, dtype=torch.float32, device=dev)
    dv = torch.zeros(tk + 1, hkv, d, dtype=torch.float32, device=dev)

    sb = plan.self_blocks
    bs = sb.q_index.shape[1]
    q_pad, k_pad, v_pad, do_pad = _pad_rows(q), _pad_rows(k), _pad_rows(v), _pad_rows(do)
    lse_pad = _pad_rows(lse, float("inf"))
    delta_pad = _pad_rows(delta)
    mask = _causal(bs, grp, dev)
    step = max(1, _SCRATCH_ELEMS // (hq * bs * bs))
    for b0 in range(0, sb.blocks.numel(), step):
        qi = _self_layout(sb.q_index[b0 : b0 + step], tq)
        ki = _self_layout(sb.k_index[b0 : b0 + step], tk)
        qb = _stack_heads(q_pad[qi].float(), hkv)
        dob = _stack_heads(do_pad[qi], hkv)
        lb = _stack_heads(lse_pad[qi][..., None], hkv)  # [nb, Hkv, rows, 1]
        db = _stack_heads(delta_pad[qi][..., None], hkv)
        kb = k_pad[ki].float().transpose(1, 2)
        vb = v_pad[ki].float().transpose(1, 2)
        s = torch.matmul(qb, kb.transpose(-1, -2)).mul_(scale).masked_fill_(~mask, float("-inf"))
        p = torch.exp_(s.sub_(lb))
        dvb = torch.matmul(p.transpose(-1, -2), dob)  # [nb, Hkv, B, D]
        ds = torch.matmul(dob, vb.transpose(-1, -2)).sub_(db).mul_(p).mul_(scale)
        dqb = torch.matmul(ds, kb)
        dkb = torch.matmul(ds.transpose(-1, -2), qb)
        dq.index_add_(0, qi.reshape(-1), _unstack_heads(dqb, hq))
        dk.index_add_(0, ki.reshape(-1), dkb.transpose(1, 2).reshape(-1, hkv, d))
        dv.index_add_(0, ki.reshape(-1), dvb.transpose(1, 2).reshape(-1, hkv, d))

    if plan.n_selected > 0:
        q_flat = q.reshape(tq * hq, d)
        k_flat, v_flat = k.reshape(tk * hkv, d), v.reshape(tk * hkv, d)
        do_flat, lse_flat, delta_flat = do.reshape(tq * hq, d), lse.reshape(-1), delta.reshape(-1)
        dq_flat = dq[:tq].view(tq * hq, d)
        dk_flat, dv_flat = dk[:tk].view(tk * hkv, d), dv[:tk].view(tk * hkv, d)
        rows = plan.tile_pairs.shape[1]
        step = max(1, _SCRATCH_ELEMS // (rows * bs))
        for t0 in range(0, plan.tile_pairs.shape[0], step):
            tp = plan.tile_pairs[t0 : t0 + step]
            ok = (tp >= 0)[..., None]
            qr = plan.pairs.q_row[tp.clamp(min=0)]
            keys = plan.tile_keys[t0 : t0 + step]
            qt = q_flat[qr].float()
            dot = do_flat[qr] * ok
            dlt = (delta_flat[qr][..., None] * ok).float()
            kt, vt = k_flat[keys].float(), v_flat[keys].float()
            s = torch.matmul(qt, kt.transpose(-1, -2)).mul_(scale)
            p = torch.exp_(s.sub_(lse_flat[qr][..., None]))
            dvt = torch.matmul(p.transpose(-1, -2), dot)
            ds = torch.matmul(dot, vt.transpose(-1, -2)).sub_(dlt).mul_(p).mul_(scale)
            sel = qr[ok.squeeze(-1)]
            dq_flat.index_add_(0, sel, torch.matmul(ds, kt)[ok.squeeze(-1)])
            dk_flat.index_add_(0, keys.reshape(-1), torch.matmul(ds.transpose(-1, -2), qt).reshape(-1, d))
            dv_flat.index_add_(0, keys.reshape(-1), dvt.reshape(-1, d))
    return dq[:tq].to(q.dtype), dk[:tk].to(k.dtype), dv[:tk].to(v.dtype)


def moba_attention_torch(
    q: Tensor, k: Tensor, v: Tensor, routing: Routing, scale: float
) -> tuple[Tensor, Tensor]:
    """Torch backend on a precomputed routing: ``o [Tq, Hq, D]`` (q's dtype), ``lse [Tq, Hq]`` fp32."""
    plan = TilePlan.build(routing, k.shape[1])
    return PlannedAttention.apply(q, k, v, plan, scale, _forward, _backward)
