"""Low-precision checks for CUDA tests (flash-attention's rule: a kernel's error against the fp32
reference may be at most twice that of a plain same-dtype PyTorch implementation, plus a tiny floor)."""

from __future__ import annotations

import torch
from moba_testing import grads, packed_inputs

from moba_attn import moba_attention, moba_attention_reference
from moba_attn.reference import moba_mask_reference


def naive_same_dtype(q, k, v, block_size: int, topk: int, scale: float | None = None):
    """Mask-based MoBA computed entirely in ``q``'s dtype (one sequence): the error yardstick."""
    mask = moba_mask_reference(q.detach(), k.detach(), block_size, topk)
    grp = q.shape[1] // k.shape[1]
    scale = scale or q.shape[-1] ** -0.5
    s = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(grp, 1)) * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    return torch.einsum("hqk,khd->qhd", p, v.repeat_interleave(grp, 1))


def check_low_precision(backend: str, device, dtype, t: int = 1000, hq: int = 4, hkv: int = 2, d: int = 64):
    bs, topk = 64, 3
    q, k, v, _ = packed_inputs([t], hq, hkv, d, dtype=dtype, device=device, seed=11)
    q32, k32, v32 = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref = moba_attention_reference(q=q32, k=k32, v=v32, block_size=bs, topk=topk)
    out = moba_attention(q=q, k=k, v=v, block_size=bs, topk=topk, backend=backend)
    base = naive_same_dtype(q, k, v, bs, topk)
    assert out.dtype == dtype
    names = ("o", "dq", "dk", "dv")
    got = (out, *grads(out, None, (q, k, v)))
    want = (ref, *grads(ref, None, (q32, k32, v32)))
    yard = (base, *grads(base, None, (q, k, v)))
    for name, a, b, c in zip(names, got, want, yard):
        err = (a.float() - b).abs().max().item()
        err_base = (c.float() - b).abs().max().item()
        assert err <= 2 * err_base + 1e-5, (
            f"{backend} {dtype} {name}: err {err:.3e} > 2 x same-dtype {err_base:.3e}"
        )
