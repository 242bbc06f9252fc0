"""MoBA on flash-attn varlen: the paper's own algorithm (Lu et al. 2025, Sec. 2.3, Algorithm 1).

1. Own blocks: one varlen call with every query-holding key block as a "sequence", ``causal=True``
   (flash-attn aligns causal masks bottom-right, which is exactly "queries are the last positions").
2. Routed blocks: (query, head) pairs gathered per (kv head, block) as varlen sequences of one head
   against that block's keys, ``causal=False``.
3. LSE merge (:mod:`moba_attn.merge`). The backward calls flash-attn's varlen backward on both parts
   with the *merged* output and LSE, which gives each part's exact share of dQ, dK, dV.

flash-attn is imported lazily through :class:`FlashOps`, a shim over its private
``_flash_attn_varlen_forward/_backward`` whose signatures changed in 2.7 (``window_size`` became
``window_size_left/right``; the forward stopped returning padded copies). The segment bookkeeping is
plain PyTorch and is tested on CPU with a dense stand-in for the two kernels.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .merge import merge_partials
from .routing import RoutedPairs, Routing
from .tiles import SelfBlocks


@dataclass(frozen=True)
class FlashOps:
    """``forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal) -> (out, lse [H, T])`` and
    ``backward(do, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, scale, causal)`` (fills dq/dk/dv)."""

    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., None]


def _call(fn: Callable, params: set[str], **kw):
    # keep only the keyword arguments this flash-attn version knows (2.6: window_size, 2.7+: _left/_right)
    return fn(**{k: v for k, v in kw.items() if k in params})


@functools.cache
def flash_ops() -> FlashOps:
    """The installed flash-attn's varlen kernels behind one signature (2.6.x and >= 2.7)."""
    try:
        from flash_attn import flash_attn_interface as fa
    except ImportError as e:
        raise RuntimeError(
            "moba: backend='flash' needs flash-attn (pip install 'moba-attn[flash]' on a CUDA machine)"
        ) from e
    fwd, bwd = fa._flash_attn_varlen_forward, fa._flash_attn_varlen_backward
    fwd_params = set(inspect.signature(fwd).parameters)
    bwd_params = set(inspect.signature(bwd).parameters)
    window = dict(window_size=(-1, -1), window_size_left=-1, window_size_right=-1)

    def forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
        out = _call(
            fwd, fwd_params, q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
            max_seqlen_k=max_k, dropout_p=0.0, softmax_scale=scale, causal=causal, softcap=0.0,
            alibi_slopes=None, return_softmax=False, **window,
        )  # fmt: skip
        # 2.6: (out, q, k, v, out_padded, lse, S_dmask, rng_state); >= 2.7: (out, lse, S_dmask, rng_state)
        return (out[0], out[5]) if len(out) == 8 else (out[0], out[1])

    def backward(do, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, scale, causal):
        _call(
            bwd, bwd_params, dout=do, q=q, k=k, v=v, out=out, softmax_lse=lse, dq=dq, dk=dk, dv=dv,
            cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, dropout_p=0.0,
            softmax_scale=scale, causal=causal, softcap=0.0, alibi_slopes=None, deterministic=False,
            rng_state=None, **window,
        )  # fmt: skip

    return FlashOps(forward, backward)


def _cu(counts: Tensor) -> Tensor:
    out = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    out[1:] = torch.cumsum(counts, 0)
    return out


@dataclass(frozen=True)
class FlashPlan:
    """Varlen segments for the two flash-attn calls."""

    self_cu_q: Tensor
    self_cu_k: Tensor
    self_keys: Tensor | None  # packed key rows to gather, None = use k as is (prefill)
    self_max_q: int
    self_max_k: int
    pairs: RoutedPairs
    routed_cu_q: Tensor
    routed_cu_k: Tensor
    routed_keys: Tensor  # [G * B] rows of k.view(Tk * Hkv, D) for the non-empty groups
    routed_max_q: int
    routed_max_k: int
    n_selected: int

    @staticmethod
    def build(routing: Routing, hkv: int) -> FlashPlan:
        bs = routing.layout.block_size
        table = routing.table
        sb = SelfBlocks.build(routing)
        q_counts = (sb.q_index >= 0).sum(1)
        k_counts = table.block_len[sb.blocks]
        self_keys = None if sb.blocks.numel() == table.n_blocks else sb.k_index[sb.k_index >= 0]
        pairs = RoutedPairs.build(routing, hkv)
        counts = pairs.group_start[1:] - pairs.group_start[:-1]
        groups = torch.nonzero(counts).squeeze(1)
        nblk = max(table.n_blocks, 1)
        head, blk = groups // nblk, groups % nblk
        keys = (table.block_start[blk, None] + torch.arange(bs, device=groups.device)) * hkv + head[:, None]
        g_counts = counts[groups]
        return FlashPlan(
            _cu(q_counts), _cu(k_counts), self_keys, int(q_counts.max()) if q_counts.numel() else 0,
            int(k_counts.max()) if k_counts.numel() else 0, pairs, _cu(g_counts),
            _cu(torch.full_like(g_counts, bs)), keys.reshape(-1),
            int(g_counts.max()) if g_counts.numel() else 0, bs, routing.n_selected,
        )  # fmt: skip


class _MobaFlashFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: FlashPlan, ops: FlashOps, scale: float):  # type: ignore[override]
        tq, hq, d = q.shape
        tk, hkv, _ = k.shape
        ks, vs = (k, v) if plan.self_keys is None else (k[plan.self_keys], v[plan.self_keys])
        o_self, lse_self = ops.forward(
            q, ks, vs, plan.self_cu_q, plan.self_cu_k, plan.self_max_q, plan.self_max_k, scale, True
        )
        o_parts = [o_self.float()[:, :, None]]
        lse_parts = [lse_self.float().t()[:, :, None]]
        ns = plan.n_selected
        if ns:
            o_r = torch.zeros(tq * hq * ns, d, dtype=torch.float32, device=q.device)
            lse_r = torch.full((tq * hq * ns,), float("-inf"), dtype=torch.float32, device=q.device)
            if plan.pairs.slot.numel():
                qg = q.reshape(tq * hq, 1, d)[plan.pairs.q_row]
                kg = k.reshape(tk * hkv, 1, d)[plan.routed_keys]
                vg = v.reshape(tk * hkv, 1, d)[plan.routed_keys]
                og, lg = ops.forward(
                    qg, kg, vg, plan.routed_cu_q, plan.routed_cu_k, plan.routed_max_q,
                    plan.routed_max_k, scale, False,
                )  # fmt: skip
                o_r[plan.pairs.slot] = og[:, 0].float()
                lse_r[plan.pairs.slot] = lg[0].float()
            o_parts.append(o_r.view(tq, hq, ns, d))
            lse_parts.append(lse_r.view(tq, hq, ns))
        o, lse = merge_partials(torch.cat(o_parts, 2), torch.cat(lse_parts, 2))
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan, ctx.ops, ctx.scale = plan, ops, scale
        return o, lse

    @staticmethod
    def backward(ctx, do: Tensor, dlse: Tensor | None):  # type: ignore[override]
        if dlse is not None and bool((dlse != 0).any()):
            raise NotImplementedError(
                "moba: backend='flash' does not propagate gradients through the returned LSE; use "
                "backend='triton' or 'torch' when the LSE is part of the loss"
            )
        q, k, v, o, lse = ctx.saved_tensors
        plan, ops, scale = ctx.plan, ctx.ops, ctx.scale
        tq, hq, d = q.shape
        tk, hkv, _ = k.shape
        do = do.contiguous()
        lse_h = lse.t().contiguous()  # flash-attn's [H, T] layout
        dq = torch.zeros_like(q)
        if plan.self_keys is None:
            ks, vs = k, v
        else:
            ks, vs = k[plan.self_keys], v[plan.self_keys]
        dks, dvs = torch.zeros_like(ks), torch.zeros_like(vs)
        ops.backward(
            do, q, ks, vs, o, lse_h, dq, dks, dvs, plan.self_cu_q, plan.self_cu_k, plan.self_max_q,
            plan.self_max_k, scale, True,
        )  # fmt: skip
        if plan.self_keys is None:
            dk, dv = dks.float(), dvs.float()
        else:
            dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device).index_add_(
                0, plan.self_keys, dks.float()
            )
            dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device).index_add_(
                0, plan.self_keys, dvs.float()
            )
        dq = dq.float()
        if plan.n_selected and plan.pairs.slot.numel():
            rows, keys = plan.pairs.q_row, plan.routed_keys
            qg = q.reshape(tq * hq, 1, d)[rows]
            kg, vg = k.reshape(tk * hkv, 1, d)[keys], v.reshape(tk * hkv, 1, d)[keys]
            dog, og = do.reshape(tq * hq, 1, d)[rows], o.reshape(tq * hq, 1, d)[rows]
            lg = lse.reshape(1, tq * hq)[:, rows].contiguous()
            dqg, dkg, dvg = torch.zeros_like(qg), torch.zeros_like(kg), torch.zeros_like(vg)
            ops.backward(
                dog, qg, kg, vg, og, lg, dqg, dkg, dvg, plan.routed_cu_q, plan.routed_cu_k, plan.routed_max_q,
                plan.routed_max_k, scale, False,
            )  # fmt: skip
            dq.view(tq * hq, d).index_add_(0, rows, dqg[:, 0].float())
            dk.view(tk * hkv, d).index_add_(0, keys, dkg[:, 0].float())
            dv.view(tk * hkv, d).index_add_(0, keys, dvg[:, 0].float())
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def moba_attention_flash(
    q: Tensor, k: Tensor, v: Tensor, routing: Routing, scale: float, ops: FlashOps | None = None
) -> tuple[Tensor, Tensor]:
    """flash-attn backend: ``o [Tq, Hq, D]`` (q's dtype), ``lse [Tq, Hq]`` fp32.

    ``ops`` replaces the flash-attn kernels (tests pass a dense PyTorch stand-in); by default the installed
    flash-attn is used, which needs CUDA, fp16/bf16 and ``D % 8 == 0``, ``D <= 256``.
    """
    if ops is None:
        if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"moba: backend='flash' needs CUDA fp16/bf16 tensors, got {q.dtype} on {q.device}; cast with "
                f".half()/.bfloat16() or use backend='triton' or 'torch'"
            )
        if q.shape[2] % 8 or q.shape[2] > 256:
            raise ValueError(
                f"moba: backend='flash' needs a head dim D <= 256 divisible by 8, got D={q.shape[2]}"
            )
        ops = flash_ops()
    plan = FlashPlan.build(routing, k.shape[1])
    return _MobaFlashFn.apply(q.contiguous(), k.contiguous(), v.contiguous(), plan, ops, scale)
