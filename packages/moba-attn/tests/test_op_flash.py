"""The flash-attn backend's bookkeeping (segments, gathers, LSE merge, backward with the merged LSE).

flash-attn cannot be installed without CUDA, so on CPU its two kernels are replaced by a dense PyTorch
stand-in with flash-attn's contract (varlen, GQA, bottom-right causal, LSE ``[H, T]``, backward from the
given ``out`` and ``lse``); everything else is the real backend. The CUDA test runs the real kernels.
"""

from __future__ import annotations

import pytest
import torch
from moba_testing import assert_close, grads, packed_inputs

from moba_attn import moba_attention_reference
from moba_attn.flash_backend import FlashOps, moba_attention_flash
from moba_attn.inputs import validate
from moba_attn.routing import route


def _segments(cu_q: torch.Tensor, cu_k: torch.Tensor):
    for i in range(cu_q.numel() - 1):
        yield int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])


def _probs(q, k, scale, causal):
    lq, lk = q.shape[0], k.shape[0]
    grp = q.shape[1] // k.shape[1]
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float().repeat_interleave(grp, 1)) * scale
    if causal:  # flash-attn aligns the causal mask bottom-right
        keep = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        s = s.masked_fill(~keep, float("-inf"))
    return s


def _dense_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
    out = torch.zeros_like(q)
    lse = torch.zeros(q.shape[1], q.shape[0])
    grp = q.shape[1] // k.shape[1]
    for q0, q1, k0, k1 in _segments(cu_q, cu_k):
        if q1 == q0:
            continue
        s = _probs(q[q0:q1], k[k0:k1], scale, causal)
        lse[:, q0:q1] = torch.logsumexp(s, -1)
        p = torch.softmax(s, -1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", p, v[k0:k1].float().repeat_interleave(grp, 1)).to(q.dtype)
    return out, lse


def _dense_backward(do, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, scale, causal):
    grp = q.shape[1] // k.shape[1]
    hkv = k.shape[1]
    for q0, q1, k0, k1 in _segments(cu_q, cu_k):
        if q1 == q0:
            continue
        s = _probs(q[q0:q1], k[k0:k1], scale, causal)
        p = torch.exp(s - lse[:, q0:q1, None].float())
        dos = do[q0:q1].float()
        delta = (dos * out[q0:q1].float()).sum(-1).t()  # [H, Lq]
        vh = v[k0:k1].float().repeat_interleave(grp, 1)
        kh = k[k0:k1].float().repeat_interleave(grp, 1)
        dvh = torch.einsum("hqk,qhd->khd", p, dos)
        ds = p * (torch.einsum("qhd,khd->hqk", dos, vh) - delta[..., None]) * scale
        dq[q0:q1] += torch.einsum("hqk,khd->qhd", ds, kh).to(dq.dtype)
        dkh = torch.einsum("hqk,qhd->khd", ds, q[q0:q1].float())
        dk[k0:k1] += dkh.view(k1 - k0, hkv, grp, -1).sum(2).to(dk.dtype)
        dv[k0:k1] += dvh.view(k1 - k0, hkv, grp, -1).sum(2).to(dv.dtype)


DENSE = FlashOps(_dense_forward, _dense_backward)


def _run(q, k, v, cu, cu_k, bs, topk):
    layout, scale = validate(q, k, v, bs, topk, cu, cu_k, None)
    return moba_attention_flash(q, k, v, route(q, k, layout, topk), scale, ops=DENSE)


@pytest.mark.parametrize(
    "lengths,hq,hkv,bs,topk",
    [([63], 4, 2, 16, 3), ([100, 1, 57], 2, 1, 16, 4), ([200], 2, 2, 32, 1), ([90, 33], 4, 4, 8, 20)],
    ids=["T63-H4x2-B16-k3", "N3-H2x1-B16-k4", "T200-B32-k1", "N2-B8-k20"],
)
def test_flash_plumbing_matches_reference(lengths, hq, hkv, bs, topk) -> None:
    q, k, v, cu = packed_inputs(lengths, hq, hkv, 16, seed=5)
    o, lse = _run(q, k, v, cu, None, bs, topk)
    kw = dict(q=q, k=k, v=v, cu_seqlens=cu, block_size=bs, topk=topk, return_lse=True)
    o_ref, lse_ref = moba_attention_reference(**kw)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("lse", lse, lse_ref, 1e-5)
    for name, a, b in zip(("dq", "dk", "dv"), grads(o, None, (q, k, v)), grads(o_ref, None, (q, k, v))):
        assert_close(name, a, b, 1e-4, 1e-4)


def test_flash_plumbing_decode_gathers_self_blocks() -> None:
    q, k, v, cu = packed_inputs([70, 45], 4, 2, 16, seed=6)
    take = torch.tensor([60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 114])
    cu_q = torch.tensor([0, 10, 11], dtype=torch.int32)
    o, _ = _run(q[take], k, v, cu_q, cu, 16, 3)
    want = moba_attention_reference(q=q, k=k, v=v, cu_seqlens=cu, block_size=16, topk=3)[take]
    assert_close("decode", o, want, 1e-5)
    for name, a, b in zip(("dk", "dv"), grads(o, None, (k, v)), grads(want, None, (k, v))):
        assert_close(name, a, b, 1e-4, 1e-4)


def test_flash_needs_cuda_half_precision() -> None:
    q, k, v, _ = packed_inputs([32], 2, 2, 16, grad=False)
    layout, scale = validate(q, k, v, 16, 2, None, None, None)
    with pytest.raises(ValueError, match="needs CUDA fp16/bf16"):
        moba_attention_flash(q, k, v, route(q, k, layout, 2), scale)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_flash_kernels_on_gpu(device, dtype) -> None:
    pytest.importorskip("flash_attn")
    from moba_cuda import check_low_precision

    check_low_precision("flash", device, dtype)
