"""Triton kernels for MoBA (imported only by :mod:`moba_attn.triton_backend`, never at package import).

* ``gate_topk_kernel``: gate scores and top-k in one pass over the block means, per (query tile, head);
  the ``[T, n_blocks]`` score matrix is never written. Selection runs ``topk - 1`` rounds; round ``r``
  takes the best block strictly *after* round ``r - 1``'s pick in the order (score descending, block
  index ascending), so ties go to the earlier block exactly as ``torch.argmax`` does in
  :func:`moba_attn.routing.select_blocks`. The first ``SINK`` blocks of the sequence score ``+inf``
  (sink blocks, always chosen first).
* ``attn_fwd_kernel``: block attention of a tile of gathered query rows against one key block (one kv
  head), online softmax, writes the partial output and LSE. ``CAUSAL`` tiles are own blocks whose rows
  are laid out by their offset in the block, so query row ``r`` sees keys ``c <= r``.
* ``attn_bwd_dkdv_kernel`` / ``attn_bwd_dq_kernel``: the flash-attention backward on the same tiles
  using the final (merged) LSE, accumulating into fp32 gradients with atomics (several tiles share keys
  and rows).
* ``attn_bwd_dkdv_det_kernel`` and ``attn_bwd_dq_kernel`` with ``ATOMIC=False``: the deterministic
  backward. One program per (kv head, key block, key chunk) walks every tile that attends those keys in
  a fixed order and writes dK/dV once; dQ partials go to one slot per (row, routed slot) and are summed
  in a fixed order by the caller. No fp32 atomics, so the result is bitwise reproducible.

Offsets are int64 wherever they can pass 2**31 (:func:`_row_offset`): a ``[T, H, D]`` tensor has
``T * H * D >= 2**31`` elements from T = 512K at H = 32, D = 128, and int32 products wrap silently.
Tiles are at least 16 in every ``tl.dot`` dimension so that the kernels are valid on real GPUs.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_offset(row, H, h, D):
    """Element offset of ``[row, h, 0]`` in a contiguous ``[rows, H, D]`` tensor, as int64.

    ``row`` is widened *before* the products: ``(row * H + h) * D`` in int32 wraps once it reaches 2**31
    (e.g. ``q [T, 32, 128]`` from T = 512K). ``H = 1, h = 0`` gives the offset of flat row ``row`` of
    width ``D`` (also used for ``tile * R`` into the ``[n_tiles, R]`` row tables).
    """
    return (row.to(tl.int64) * H + h) * D


@triton.jit
def gate_topk_kernel(
    Q, MEANS, OWN, TILE_R0, TILE_R1, TILE_BOFF, SEL,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, NSEL: tl.constexpr, SINK: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // (HQ // HKV)
    r0 = tl.load(TILE_R0 + tile).to(tl.int64)
    r1 = tl.load(TILE_R1 + tile).to(tl.int64)
    boff = tl.load(TILE_BOFF + tile).to(tl.int64)
    rows = r0 + tl.arange(0, BM)
    rmask = rows < r1
    dd = tl.arange(0, BD)
    dmask = dd < D
    q = tl.load(
        Q + _row_offset(rows[:, None], HQ, h, D) + dd[None, :],
        mask=rmask[:, None] & dmask[None, :],
        other=0.0,
    )
    q = q.to(tl.float32)
    own = tl.load(OWN + rows, mask=rmask, other=0)  # local index of each row's own block
    n_cand = tl.max(own, 0)
    prev_s = tl.full([BM], float("inf"), tl.float32)
    prev_i = tl.full([BM], -1, tl.int32)
    for r in tl.static_range(NSEL):
        best_s = tl.full([BM], float("-inf"), tl.float32)
        best_i = tl.full([BM], -1, tl.int32)
        for c0 in range(0, n_cand, BN):
            cols = c0 + tl.arange(0, BN)
            cmask = cols < n_cand
            m = tl.load(
                MEANS + _row_offset(boff + cols[:, None], HKV, hk, D) + dd[None, :],
                mask=cmask[:, None] & dmask[None, :],
                other=0.0,
            )
            s = tl.dot(q, tl.trans(m), input_precision="ieee")
            if SINK > 0:  # sink blocks win outright (score +inf), earlier first among them
                s = tl.where(cols[None, :] < SINK, float("inf"), s)
            after_prev = (s < prev_s[:, None]) | ((s == prev_s[:, None]) & (cols[None, :] > prev_i[:, None]))
            elig = (cols[None, :] < own[:, None]) & after_prev
            sm = tl.where(elig, s, float("-inf"))
            tmax = tl.max(sm, 1)
            tidx = tl.min(tl.where(elig & (sm == tmax[:, None]), cols[None, :], 1 << 30), 1)
            # chunks come in ascending block order, so an equal score from a later chunk never wins
            upd = (tidx < (1 << 30)) & ((best_i < 0) | (tmax > best_s))
            best_s = tl.where(upd, tmax, best_s)
            best_i = tl.where(upd, tidx, best_i)
        sel = tl.where(best_i >= 0, best_i + boff, -1)
        tl.store(SEL + _row_offset(rows, HQ, h, NSEL) + r, sel, mask=rmask)
        prev_s = best_s
        prev_i = best_i


@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE, ROWS_Q, ROWS_O, KSTART, KLEN, KVH, scale,
    HKV: tl.constexpr, D: tl.constexpr, R: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    rb = tl.program_id(1)
    ridx = rb * BM + tl.arange(0, BM)
    rmask = ridx < R
    tix = _row_offset(tile, 1, 0, R) + ridx
    qrow = tl.load(ROWS_Q + tix, mask=rmask, other=-1)
    orow = tl.load(ROWS_O + tix, mask=rmask, other=-1)
    valid = qrow >= 0
    ks = tl.load(KSTART + tile)
    kl = tl.load(KLEN + tile)
    hk = tl.load(KVH + tile)
    dd = tl.arange(0, BD)
    dmask = dd < D
    q = tl.load(
        Q + _row_offset(qrow[:, None], 1, 0, D) + dd[None, :], mask=valid[:, None] & dmask[None, :], other=0.0
    )
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    kend = kl
    if CAUSAL:
        kend = tl.minimum(kl, rb * BM + BM)
    for n0 in range(0, kend, BN):
        cols = n0 + tl.arange(0, BN)
        cmask = cols < kl
        kv_off = _row_offset(ks + cols[:, None], HKV, hk, D) + dd[None, :]
        kk = tl.load(K + kv_off, mask=cmask[:, None] & dmask[None, :], other=0.0)
        vv = tl.load(V + kv_off, mask=cmask[:, None] & dmask[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(kk), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kk))
        s = s * scale
        allowed = cmask[None, :]
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= ridx[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p, vv.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(vv.dtype), vv)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log(l_safe), float("-inf"))
    tl.store(O + _row_offset(orow[:, None], 1, 0, D) + dd[None, :], o, mask=valid[:, None] & dmask[None, :])
    tl.store(LSE + orow, lse, mask=valid)


@triton.jit
def _bwd_dkdv_tile(
    dk, dv, kk, vv, cols, cmask, cb, Q, DO, LSE, DELTA, ROWS_Q, tile, scale,
    D: tl.constexpr, R: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """Add one tile's contribution to the ``[BN, BD]`` fp32 dK/dV of key chunk ``cb``, rows in order."""
    dd = tl.arange(0, BD)
    dmask = dd < D
    start = 0
    if CAUSAL:  # rows before the chunk's first key see none of it
        start = (cb * BN // BM) * BM
    for m0 in range(start, R, BM):
        ridx = m0 + tl.arange(0, BM)
        rmask = ridx < R
        qrow = tl.load(ROWS_Q + _row_offset(tile, 1, 0, R) + ridx, mask=rmask, other=-1)
        valid = qrow >= 0
        ld = valid[:, None] & dmask[None, :]
        q_off = _row_offset(qrow[:, None], 1, 0, D) + dd[None, :]
        q = tl.load(Q + q_off, mask=ld, other=0.0)
        do = tl.load(DO + q_off, mask=ld, other=0.0)
        lse = tl.load(LSE + qrow, mask=valid, other=float("inf"))
        delta = tl.load(DELTA + qrow, mask=valid, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(kk), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kk))
        allowed = cmask[None, :] & valid[:, None]
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= ridx[:, None])
        p = tl.where(allowed, tl.exp(s * scale - lse[:, None]), 0.0)
        if IEEE:
            dv += tl.dot(tl.trans(p), do.to(tl.float32), input_precision="ieee")
            dp = tl.dot(do.to(tl.float32), tl.trans(vv.to(tl.float32)), input_precision="ieee")
        else:
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(vv))
        ds = p * (dp - delta[:, None]) * scale
        if IEEE:
            dk += tl.dot(tl.trans(ds), q.to(tl.float32), input_precision="ieee")
        else:
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, ROWS_Q, KSTART, KLEN, KVH, scale,
    HKV: tl.constexpr, D: tl.constexpr, R: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    cb = tl.program_id(1)
    ks = tl.load(KSTART + tile)
    kl = tl.load(KLEN + tile)
    hk = tl.load(KVH + tile)
    cols = cb * BN + tl.arange(0, BN)
    cmask = cols < kl
    dd = tl.arange(0, BD)
    st = cmask[:, None] & (dd < D)[None, :]
    kv_off = _row_offset(ks + cols[:, None], HKV, hk, D) + dd[None, :]
    kk = tl.load(K + kv_off, mask=st, other=0.0)
    vv = tl.load(V + kv_off, mask=st, other=0.0)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BD], tl.float32)
    dk, dv = _bwd_dkdv_tile(
        dk, dv, kk, vv, cols, cmask, cb, Q, DO, LSE, DELTA, ROWS_Q, tile, scale,
        D=D, R=R, CAUSAL=CAUSAL, IEEE=IEEE, BM=BM, BN=BN, BD=BD,
    )  # fmt: skip
    tl.atomic_add(DK + kv_off, dk, mask=st)
    tl.atomic_add(DV + kv_off, dv, mask=st)


@triton.jit
def attn_bwd_dkdv_det_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, ROWS_SELF, ROWS_ROUTED, SELF_T0, ROUTED_T0, ROUTED_N,
    KSTART, KLEN, KVH, scale,
    HKV: tl.constexpr, D: tl.constexpr, GRP: tl.constexpr, R_SELF: tl.constexpr, R_ROUTED: tl.constexpr,
    IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """dK/dV without atomics: program (key group ``g`` = kv head x key block, chunk ``cb``) owns its keys.

    It sums, in this fixed order, the ``GRP`` causal own-block tiles of the group's query heads (tiles
    ``SELF_T0[g] + j``; ``SELF_T0[g] = -1`` when the block holds no query) and the ``ROUTED_N[g]`` routed
    tiles from ``ROUTED_T0[g]``, then stores once. Every key row has exactly one owner, so dK/dV are
    bitwise reproducible; the price is that a block routed to by many queries is one long program.
    """
    g = tl.program_id(0)
    cb = tl.program_id(1)
    ks = tl.load(KSTART + g)
    kl = tl.load(KLEN + g)
    hk = tl.load(KVH + g)
    cols = cb * BN + tl.arange(0, BN)
    cmask = cols < kl
    dd = tl.arange(0, BD)
    st = cmask[:, None] & (dd < D)[None, :]
    kv_off = _row_offset(ks + cols[:, None], HKV, hk, D) + dd[None, :]
    kk = tl.load(K + kv_off, mask=st, other=0.0)
    vv = tl.load(V + kv_off, mask=st, other=0.0)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BD], tl.float32)
    s0 = tl.load(SELF_T0 + g)
    if s0 >= 0:
        for j in range(GRP):
            dk, dv = _bwd_dkdv_tile(
                dk, dv, kk, vv, cols, cmask, cb, Q, DO, LSE, DELTA, ROWS_SELF, s0 + j, scale,
                D=D, R=R_SELF, CAUSAL=True, IEEE=IEEE, BM=BM, BN=BN, BD=BD,
            )  # fmt: skip
    t0 = tl.load(ROUTED_T0 + g)
    for j in range(tl.load(ROUTED_N + g)):
        dk, dv = _bwd_dkdv_tile(
            dk, dv, kk, vv, cols, cmask, cb, Q, DO, LSE, DELTA, ROWS_ROUTED, t0 + j, scale,
            D=D, R=R_ROUTED, CAUSAL=False, IEEE=IEEE, BM=BM, BN=BN, BD=BD,
        )  # fmt: skip
    tl.store(DK + kv_off, dk, mask=st)
    tl.store(DV + kv_off, dv, mask=st)


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, ROWS_Q, ROWS_O, KSTART, KLEN, KVH, scale,
    HKV: tl.constexpr, D: tl.constexpr, R: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
    ATOMIC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """dQ of one tile's rows: ``ATOMIC`` adds into ``DQ[ROWS_Q]``, else stores to ``DQ[ROWS_O]``.

    ``ROWS_O`` gives every (tile, row) its own partial row (own-block tiles: the query row; routed tiles:
    the routed slot), so the non-atomic form has one writer per output row and the caller sums the
    partials in a fixed order.
    """
    tile = tl.program_id(0)
    rb = tl.program_id(1)
    ridx = rb * BM + tl.arange(0, BM)
    rmask = ridx < R
    tix = _row_offset(tile, 1, 0, R) + ridx
    qrow = tl.load(ROWS_Q + tix, mask=rmask, other=-1)
    valid = qrow >= 0
    ks = tl.load(KSTART + tile)
    kl = tl.load(KLEN + tile)
    hk = tl.load(KVH + tile)
    dd = tl.arange(0, BD)
    dmask = dd < D
    ld = valid[:, None] & dmask[None, :]
    q_off = _row_offset(qrow[:, None], 1, 0, D) + dd[None, :]
    q = tl.load(Q + q_off, mask=ld, other=0.0)
    do = tl.load(DO + q_off, mask=ld, other=0.0)
    lse = tl.load(LSE + qrow, mask=valid, other=float("inf"))
    delta = tl.load(DELTA + qrow, mask=valid, other=0.0)
    dq = tl.zeros([BM, BD], tl.float32)
    kend = kl
    if CAUSAL:
        kend = tl.minimum(kl, rb * BM + BM)
    for n0 in range(0, kend, BN):
        cols = n0 + tl.arange(0, BN)
        cmask = cols < kl
        kv_off = _row_offset(ks + cols[:, None], HKV, hk, D) + dd[None, :]
        kk = tl.load(K + kv_off, mask=cmask[:, None] & dmask[None, :], other=0.0)
        vv = tl.load(V + kv_off, mask=cmask[:, None] & dmask[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(kk), input_precision="ieee")
            dp = tl.dot(do.to(tl.float32), tl.trans(vv.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kk))
            dp = tl.dot(do, tl.trans(vv))
        allowed = cmask[None, :] & valid[:, None]
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= ridx[:, None])
        p = tl.where(allowed, tl.exp(s * scale - lse[:, None]), 0.0)
        ds = p * (dp - delta[:, None]) * scale
        if IEEE:
            dq += tl.dot(ds, kk.to(tl.float32), input_precision="ieee")
        else:
            dq += tl.dot(ds.to(kk.dtype), kk)
    if ATOMIC:
        tl.atomic_add(DQ + q_off, dq, mask=ld)
    else:
        orow = tl.load(ROWS_O + tix, mask=rmask, other=-1)
        tl.store(DQ + _row_offset(orow[:, None], 1, 0, D) + dd[None, :], dq, mask=ld)
