"""The fused CPU path (``backend="torch"`` on CPU): layouts a KV cache hands it, and that it is what runs.

The whole reference matrix runs on both torch paths in ``test_op_torch.py``; this file adds what only
the fused path promises: K/V read in place through any strides (transformers' ``[B, H, S, D]`` caches),
no copy of K/V, one kernel call per group, and the lse-gradient route of its backward.
"""

from __future__ import annotations

import math

import pytest
import torch
from moba_testing import assert_close, grads, packed_inputs

from moba_attn import fused_backend, moba_attention, moba_attention_reference


def _tol(d: int) -> float:
    return 2e-5 * math.sqrt(d)


def _count_calls(monkeypatch) -> dict[str, int]:
    counts = {"fwd": 0, "bwd": 0}
    fwd, bwd = fused_backend._FWD, fused_backend._BWD

    def count_fwd(*a, **kw):
        counts["fwd"] += 1
        return fwd(*a, **kw)

    def count_bwd(*a, **kw):
        counts["bwd"] += 1
        return bwd(*a, **kw)

    monkeypatch.setattr(fused_backend, "_FWD", count_fwd)
    monkeypatch.setattr(fused_backend, "_BWD", count_bwd)
    return counts


def test_cpu_torch_backend_is_the_fused_kernel(monkeypatch) -> None:
    """One causal call for the complete own blocks, one per (kv head, block) group: no per-tile calls."""
    counts = _count_calls(monkeypatch)
    q, k, v, _ = packed_inputs([256], 4, 2, 32)
    o = moba_attention(q=q, k=k, v=v, block_size=32, topk=3)
    assert 1 < counts["fwd"] <= 1 + 2 * (256 // 32), counts
    o.sum().backward()
    assert counts["bwd"] == counts["fwd"], counts


@pytest.mark.parametrize("layout", ["bhsd", "bshd-sliced", "head-dim-strided"])
@pytest.mark.parametrize("q_len", [1, 5, 96, 200])
def test_strided_kv_views_equal_contiguous(layout: str, q_len: int) -> None:
    """K/V as the strided views a KV cache gives (``[S, H, D]`` of a ``[B, H, S, D]`` buffer, a slice
    of a longer buffer, a strided head dim): same outputs and gradients as contiguous copies."""
    s, hq, hkv, d = 200, 4, 2, 16
    g = torch.Generator().manual_seed(5)
    if layout == "bhsd":  # transformers' cache layout, batch row 1 of 2
        kb, vb = (torch.randn(2, hkv, s, d, generator=g) for _ in range(2))
        k, v = kb[1].transpose(0, 1), vb[1].transpose(0, 1)
    elif layout == "bshd-sliced":  # a preallocated cache longer than what is filled
        kb, vb = (torch.randn(s + 56, hkv, d, generator=g) for _ in range(2))
        k, v = kb[:s], vb[:s]
    else:
        kb, vb = (torch.randn(s, hkv, 2 * d, generator=g) for _ in range(2))
        k, v = kb[..., ::2], vb[..., ::2]
    assert not (k.is_contiguous() and layout != "bshd-sliced")
    k.requires_grad_(True)
    v.requires_grad_(True)
    q = torch.randn(q_len, hq, d, generator=g, requires_grad=True)
    cu_q = torch.tensor([0, q_len], dtype=torch.int32)
    cu_k = torch.tensor([0, s], dtype=torch.int32)
    kw = dict(cu_seqlens=cu_q, cu_seqlens_k=cu_k, block_size=32, topk=3, return_lse=True)
    o, lse = moba_attention(q=q, k=k, v=v, **kw, backend="torch")
    kc, vc = (x.detach().contiguous().requires_grad_(True) for x in (k, v))
    o_ref, lse_ref = moba_attention_reference(q=q, k=kc, v=vc, **kw)
    assert_close("o", o, o_ref, _tol(d))
    assert_close("lse", lse, lse_ref, _tol(d))
    for name, a, b in zip(("dq", "dk", "dv"), grads(o, lse, (q, k, v)), grads(o_ref, lse_ref, (q, kc, vc))):
        assert_close(name, a, b, 5 * _tol(d), 1e-4)


def test_kv_are_never_copied(monkeypatch) -> None:
    """Every kernel call reads K/V as views of the caller's storage (no gather of K/V rows)."""
    q, k, v, _ = packed_inputs([300], 4, 2, 16, grad=False)
    base = {k.untyped_storage().data_ptr(), v.untyped_storage().data_ptr()}
    seen: list[bool] = []
    fwd = fused_backend._FWD

    def check(qq, kk, vv, *a, **kw):
        seen.append(kk.untyped_storage().data_ptr() in base and vv.untyped_storage().data_ptr() in base)
        return fwd(qq, kk, vv, *a, **kw)

    monkeypatch.setattr(fused_backend, "_FWD", check)
    moba_attention(q=q, k=k, v=v, block_size=32, topk=3)
    assert seen and all(seen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_fused_matches_reference(dtype: torch.dtype) -> None:
    q, k, v, cu = packed_inputs([300, 77], 4, 2, 32, dtype=dtype, seed=3)
    kw = dict(cu_seqlens=cu, block_size=32, topk=3)
    o = moba_attention(q=q, k=k, v=v, **kw)
    assert o.dtype == dtype
    qf, kf, vf = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref = moba_attention_reference(q=qf, k=kf, v=vf, **kw)
    eps = torch.finfo(dtype).eps
    assert_close("o", o, ref, 8 * eps)
    for name, a, b in zip(("dq", "dk", "dv"), grads(o, None, (q, k, v)), grads(ref, None, (qf, kf, vf))):
        assert a.dtype == dtype
        assert_close(name, a, b, 64 * eps, 16 * eps)


def test_fused_equals_tiled_baseline() -> None:
    q, k, v, cu = packed_inputs([17, 200, 63, 1, 90], 8, 2, 60, seed=11)
    kw = dict(q=q, k=k, v=v, cu_seqlens=cu, block_size=32, topk=4, sink_blocks=1, return_lse=True)
    o, lse = moba_attention(**kw, backend="torch")
    o_t, lse_t = moba_attention(**kw, backend="torch_tiled")
    assert_close("o", o, o_t, _tol(60))
    assert_close("lse", lse, lse_t, _tol(60))


def test_own_spans_cover_every_query_once() -> None:
    """The own-block calls tile the queries of decode, chunked prefill and partial blocks exactly."""
    from moba_attn.inputs import validate

    lengths_k, lengths_q = [70, 120, 33, 64, 5], [1, 40, 33, 0, 5]
    q = torch.zeros(sum(lengths_q), 2, 8)
    k = torch.zeros(sum(lengths_k), 2, 8)
    cu = lambda xs: torch.tensor([0, *torch.tensor(xs).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    layout, _ = validate(q, k, k, 16, 3, cu(lengths_q), cu(lengths_k), None)
    hits = torch.zeros(q.shape[0], dtype=torch.int64)
    for sp in fused_backend.own_spans(layout, 16):
        assert sp.n_q >= 1 and sp.n_k >= 1
        if not sp.merge:
            hits[sp.q0 : sp.q0 + sp.n_blocks * sp.n_q] += 1
    assert hits.tolist() == [1] * q.shape[0]


@pytest.mark.parametrize("sink", [0, 1])
@pytest.mark.parametrize("lengths", [[1], [31], [32], [200], [200, 64, 7, 129]], ids=str)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_decode_steps_match_reference(lengths: list[int], hq: int, hkv: int, sink: int, monkeypatch) -> None:
    """The no-plan decode path (one query per sequence, no autograd): outputs and LSE equal the
    reference's last positions, with GQA, sink blocks, partial and exact-multiple block lengths."""
    calls = {"n": 0}
    steps = fused_backend.decode_steps

    def spy(*a, **kw):
        calls["n"] += 1
        return steps(*a, **kw)

    import moba_attn.op as op

    monkeypatch.setattr(op, "decode_steps", spy)
    q, k, v, cu = packed_inputs(lengths, hq, hkv, 16, grad=False, seed=len(lengths) + sink)
    last = (cu[1:] - 1).long()
    cu_q = torch.arange(len(lengths) + 1, dtype=torch.int32)
    kw = dict(cu_seqlens=cu_q, cu_seqlens_k=cu, block_size=32, topk=4, sink_blocks=sink, return_lse=True)
    o, lse = moba_attention(q=q[last], k=k, v=v, **kw)
    covered = max(-(-n // 32) for n in lengths) <= 4  # then it is plain causal attention, no gate
    assert calls["n"] == (0 if covered else 1)
    o_ref, lse_ref = moba_attention_reference(q=q[last], k=k, v=v, **kw)
    assert_close("o", o, o_ref, _tol(16))
    assert_close("lse", lse, lse_ref, _tol(16))


def test_decode_with_grad_takes_the_planned_path(monkeypatch) -> None:
    """The decode path's kernel gives no LSE gradient, so a decode call that needs gradients is planned."""
    import moba_attn.op as op

    monkeypatch.setattr(op, "decode_steps", lambda *a, **kw: pytest.fail("decode path used under autograd"))
    q, k, v, cu = packed_inputs([100], 4, 2, 16)
    kw = dict(cu_seqlens=torch.tensor([0, 1], dtype=torch.int32), cu_seqlens_k=cu, block_size=16, topk=3)
    o, lse = moba_attention(q=q[-1:], k=k, v=v, **kw, return_lse=True)
    o_ref, lse_ref = moba_attention_reference(q=q[-1:], k=k, v=v, **kw, return_lse=True)
    for name, a, b in zip(("dq", "dk", "dv"), grads(o, lse, (q, k, v)), grads(o_ref, lse_ref, (q, k, v))):
        assert_close(name, a, b, 5 * _tol(16), 1e-4)


def test_decode_step_takes_block_means_of_any_float_dtype() -> None:
    """Precomputed means in fp16 (a cache that stores them compactly) are converted for the gate."""
    from moba_attn import KeyBlockMeans

    q, k, v, cu = packed_inputs([200, 129], 4, 2, 16, grad=False, seed=9)
    last = (cu[1:] - 1).long()
    kw = dict(cu_seqlens=torch.arange(3, dtype=torch.int32), cu_seqlens_k=cu, block_size=32, topk=3)
    means = KeyBlockMeans.from_keys(k, 32, cu).means()
    want = moba_attention(q=q[last], k=k, v=v, **kw, block_means=means)
    got = moba_attention(q=q[last], k=k, v=v, **kw, block_means=means.half())
    assert_close("o", got, moba_attention_reference(q=q[last], k=k, v=v, **kw), _tol(16))
    assert_close("fp16 means vs fp32 means", got, want, _tol(16))
