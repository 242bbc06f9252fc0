"""The Triton backend against the reference, on CPU under ``TRITON_INTERPRET=1`` (tiny fp32/fp16 shapes).

The interpreter must be switched on before the kernels are defined, i.e. before
``moba_attn.triton_backend`` is imported; this module sets it at import. On a GPU machine
(``--device cuda``) the same kernels run compiled and the CUDA-marked tests check fp16/bf16 there.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import triton
import triton.language as tl
from moba_testing import assert_close, grads, packed_inputs

from moba_attn import moba_attention, moba_attention_reference
from moba_attn import triton_kernels as kern
from moba_attn.inputs import validate
from moba_attn.routing import BlockTable, QueryInfo, key_block_means, select_blocks
from moba_attn.triton_backend import SMEM_BUDGET, _bd, _index_dtype, smem_bytes, tile_configs
from moba_attn.triton_kernels import _row_offset

CASES = [
    ([40], 2, 1, 16, 16, 3, torch.float32),
    ([30, 1, 20], 2, 2, 20, 8, 2, torch.float32),
    ([37], 4, 2, 16, 16, 1, torch.float32),
    ([40], 2, 1, 16, 16, 3, torch.float16),
]


def _id(c):
    lengths, hq, hkv, d, bs, topk, dt = c
    return f"N{len(lengths)}-T{sum(lengths)}-H{hq}x{hkv}-D{d}-B{bs}-k{topk}-{str(dt)[6:]}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_triton_matches_reference(case, device) -> None:
    lengths, hq, hkv, d, bs, topk, dtype = case
    q, k, v, cu = packed_inputs(lengths, hq, hkv, d, dtype=dtype, device=device, seed=sum(lengths))
    kw = dict(q=q, k=k, v=v, cu_seqlens=cu, block_size=bs, topk=topk, return_lse=True)
    o, lse = moba_attention(**kw, backend="triton")
    q32, k32, v32 = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    o_ref, lse_ref = moba_attention_reference(**{**kw, "q": q32, "k": k32, "v": v32})
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert o.dtype == dtype
    assert_close("o", o, o_ref, tol)
    assert_close("lse", lse, lse_ref, tol)
    got = grads(o, lse, (q, k, v))
    want = grads(o_ref, lse_ref, (q32, k32, v32))
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert_close(name, a, b, 10 * tol, 1e-3)


def test_fused_gate_topk_equals_torch_selection_with_ties(device) -> None:
    """Same picks as routing.select_blocks, including equal scores (identical blocks: earlier wins)."""
    from moba_attn.triton_backend import gate_topk_triton

    bs = 8
    g = torch.Generator().manual_seed(2)
    blk = torch.randn(bs, 1, 16, generator=g)
    k = torch.cat(
        [blk, torch.randn(bs, 1, 16, generator=g), blk, blk, torch.randn(4 * bs, 1, 16, generator=g)]
    )
    k = k.expand(-1, 2, -1).contiguous().to(device)
    q = torch.randn(k.shape[0], 2, 16, generator=g).to(device)
    layout, _ = validate(q, k, k, bs, 4, None, None, None)
    table = BlockTable.build(layout)
    info = QueryInfo.build(layout, table)
    means = key_block_means(k, layout, table)
    want = select_blocks(q, means, layout, table, info, 4)
    got = gate_topk_triton(q, means, layout, table, info, 4)
    assert torch.equal(got, want)
    # with identical blocks 0, 2, 3 one of them is always picked first among ties -> block 0 before 2, 3
    row = got[-1, 0].tolist()
    assert not (2 in row and 0 not in row)


@pytest.mark.parametrize("sink", [1, 2])
def test_triton_sink_blocks_match_reference_and_torch_selection(sink, device) -> None:
    """Sink blocks in the fused gate: same picks as routing.select_blocks, same output as the reference."""
    from moba_attn.triton_backend import gate_topk_triton

    q, k, v, cu = packed_inputs([50, 1, 30], 2, 1, 16, device=device, seed=9)
    layout, _ = validate(q, k, v, 8, 4, cu, None, None, sink)
    table = BlockTable.build(layout)
    info = QueryInfo.build(layout, table)
    means = key_block_means(k, layout, table)
    want = select_blocks(q.detach(), means, layout, table, info, 4, sink)
    assert torch.equal(gate_topk_triton(q.detach(), means, layout, table, info, 4, sink), want)
    kw = dict(q=q, k=k, v=v, cu_seqlens=cu, block_size=8, topk=4, sink_blocks=sink, return_lse=True)
    o, lse = moba_attention(**kw, backend="triton")
    o_ref, lse_ref = moba_attention_reference(**kw)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("lse", lse, lse_ref, 1e-5)
    for name, a, b in zip(("dq", "dk", "dv"), grads(o, lse, (q, k, v)), grads(o_ref, lse_ref, (q, k, v))):
        assert_close(name, a, b, 1e-4, 1e-3)


def test_triton_decode_matches_prefill(device) -> None:
    q, k, v, cu = packed_inputs([45, 30], 2, 1, 16, device=device, grad=False)
    take = torch.tensor([40, 41, 42, 43, 44, 74], device=device)
    cu_q = torch.tensor([0, 5, 6], dtype=torch.int32, device=device)
    o = moba_attention(
        q=q[take], k=k, v=v, cu_seqlens=cu_q, cu_seqlens_k=cu, block_size=8, topk=3, backend="triton"
    )
    want = moba_attention_reference(q=q, k=k, v=v, cu_seqlens=cu, block_size=8, topk=3)[take]
    assert_close("decode", o, want, 1e-5)


@triton.jit
def _offset_probe(ROW, OUT, h, H: tl.constexpr, D: tl.constexpr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(OUT + i, _row_offset(tl.load(ROW + i), H, h, D))


@pytest.mark.parametrize("hdim", [(32, 31, 128), (1, 0, 64)], ids=["q-row-H32-D128", "flat-row-D64"])
def test_row_offset_is_exact_past_2_31(hdim, device) -> None:
    """The kernels' offset helper on int32 rows whose ``(row * H + h) * D`` passes 2**31 (int32 wraps there).

    ``(2**19 * 32 + 31) * 128`` is the offset of q[2**14 * 32, 31] at Hq = 32, D = 128 (T = 512K);
    ``2**31 - 1`` is the largest int32 row index a table can hold.
    """
    h_count, h, d = hdim
    rows = [0, 1, 2**19 - 1, 2**19, 2**20 + 3, 2**25, 2**30, 2**31 - 1]
    want = [(r * h_count + h) * d for r in rows]
    assert max(want) >= 2**31
    out = torch.zeros(len(rows), dtype=torch.int64, device=device)
    _offset_probe[(1,)](
        torch.tensor(rows, dtype=torch.int32, device=device), out, h, H=h_count, D=d, N=len(rows)
    )
    assert out.tolist() == want


def test_index_tables_switch_to_int64_past_2_31() -> None:
    """Row tables stay int32 while every index is below 2**31 (e.g. Tq * Hq rows), int64 beyond."""
    assert _index_dtype(2**31) == torch.int32  # indices 0 .. 2**31 - 1
    assert _index_dtype(2**31 + 1) == torch.int64
    assert _index_dtype(2**24 * 32 * 8) == torch.int64  # routed slots Tq * Hq * (topk - 1) at 16M, 32, 8


@pytest.mark.parametrize(
    "dtype,d",
    [(torch.float32, 256), (torch.float16, 128), (torch.bfloat16, 64)],
    ids=["fp32-D256", "fp16-D128", "bf16-D64"],
)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_tile_configs_fit_shared_memory(dtype, d, backward) -> None:
    """Every launch config fits the shared-memory budget, keeps tl.dot dims >= 16, and one exists."""
    bd, itemsize = _bd(d), torch.empty(0, dtype=dtype).element_size()
    configs = tile_configs(bd, itemsize, backward=backward)
    assert configs
    for c in configs:
        assert smem_bytes(c.bm, c.bn, c.num_stages, bd, itemsize, backward) <= SMEM_BUDGET, c
        assert min(c.bm, c.bn, bd) >= 16, c
        assert c.num_warps in (4, 8) and c.num_stages >= 1, c
    big = (128, 64) if not backward else (64, 64)
    sizes = {(c.bm, c.bn) for c in configs}
    if itemsize == 4 or d >= 128:  # the old fixed tiles do not fit: smaller ones are chosen
        assert big not in sizes
    else:
        assert big in sizes


def test_smem_estimate_counts_q_k_v_tiles_per_stage() -> None:
    """The documented estimate: Q once, K and V per stage, in the input dtype, plus the fp32 P tile."""
    assert smem_bytes(128, 128, 2, 256, 4) == 4 * (128 * 256 + 2 * 2 * 128 * 256) + 4 * 128 * 128
    assert smem_bytes(128, 128, 2, 256, 4) > SMEM_BUDGET  # the old fp32 / D = 256 autotune config
    # backward: K, V once and Q, dO per stage (dK/dV kernel) or the reverse (dQ kernel), plus fp32 P and dS
    dkdv, dq = 2 * 128 * (2 * 64 + 2 * 2 * 32), 2 * 128 * (2 * 32 + 2 * 2 * 64)
    assert smem_bytes(32, 64, 2, 128, 2, backward=True) == max(dkdv, dq) + 2 * 4 * 32 * 64


class _LaunchSpy:
    """Stands in for a kernel: records each launch's constexpr ``ATOMIC`` (None if it has none), then runs."""

    def __init__(self, kernel) -> None:
        self.kernel, self.atomic = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.atomic.append(meta.get("ATOMIC"))
            return self.kernel[grid](*args, **meta)

        return launch


def test_triton_deterministic_backward(device, monkeypatch) -> None:
    """``deterministic=True``: same gradients as the reference and the atomic path, bitwise equal run to run,
    and no atomic kernel launched. A sink block makes (kv head 0, block 0) take 2 routed tiles of 64 rows
    plus its GQA pair of own-block tiles, so several tiles share keys and rows take several slots."""
    q, k, v, cu = packed_inputs([80, 23], 4, 2, 24, device=device, seed=5)
    kw = dict(q=q, k=k, v=v, cu_seqlens=cu, block_size=16, topk=3, sink_blocks=1, return_lse=True)
    names = ("dq", "dk", "dv")
    want = grads(*moba_attention_reference(**kw), (q, k, v))
    dkdv = _LaunchSpy(kern.attn_bwd_dkdv_kernel)
    dq = _LaunchSpy(kern.attn_bwd_dq_kernel)
    monkeypatch.setattr(kern, "attn_bwd_dkdv_kernel", dkdv)
    monkeypatch.setattr(kern, "attn_bwd_dq_kernel", dq)
    fast = grads(*moba_attention(**kw, backend="triton"), (q, k, v))
    assert dkdv.atomic == [None, None] and dq.atomic == [True, True]  # the spies see the atomic path
    dkdv.atomic.clear()
    dq.atomic.clear()
    runs = [grads(*moba_attention(**kw, backend="triton", deterministic=True), (q, k, v)) for _ in range(2)]
    assert dkdv.atomic == [] and dq.atomic == [False, False] * 2
    for name, a, b, c in zip(names, runs[0], want, fast):
        assert_close(name, a, b, 1e-4, 1e-3)
        assert_close(f"{name} vs atomic", a, c, 1e-5, 1e-4)
    for name, a, b in zip(names, *runs):
        assert torch.equal(a, b), f"{name}: two deterministic runs differ by {(a - b).abs().max().item():.3e}"


@pytest.mark.parametrize("topk", [1, 3], ids=["own-block-only", "k3"])
def test_triton_deterministic_decode_matches_torch(topk, device) -> None:
    """Deterministic backward on a decode layout: keys no query reaches get zero gradient, and with
    ``topk=1`` there are no routed tiles at all."""
    q, k, v, cu = packed_inputs([45, 30], 4, 2, 20, device=device, seed=2)
    take = torch.tensor([38, 39, 40, 41, 42, 43, 44, 70, 71, 72, 73, 74], device=device)
    qd = q.detach()[take].clone().requires_grad_(True)
    cu_q = torch.tensor([0, 7, 12], dtype=torch.int32, device=device)
    kw = dict(q=qd, k=k, v=v, cu_seqlens=cu_q, cu_seqlens_k=cu, block_size=8, topk=topk, return_lse=True)
    got = grads(*moba_attention(**kw, backend="triton", deterministic=True), (qd, k, v))
    want = grads(*moba_attention(**kw, backend="torch"), (qd, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert_close(name, a, b, 1e-4, 1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_low_precision_on_gpu(device, dtype) -> None:
    from moba_cuda import check_low_precision

    check_low_precision("triton", device, dtype)


@pytest.mark.cuda
def test_triton_large_on_gpu_matches_torch(device) -> None:
    q, k, v, cu = packed_inputs([4096, 1000, 3000], 8, 2, 128, dtype=torch.bfloat16, device=device)
    kw = dict(q=q, k=k, v=v, cu_seqlens=cu, block_size=512, topk=3)
    o = moba_attention(**kw, backend="triton")
    want = moba_attention(**kw, backend="torch")
    assert_close("o", o, want, 2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "dtype,d", [(torch.bfloat16, 128), (torch.float32, 256)], ids=["bf16-D128", "fp32-D256"]
)
def test_triton_deterministic_backward_on_gpu(device, dtype, d) -> None:
    """Compiled: launch configs valid at the largest tiles' edge (fp32 / D = 256), two deterministic runs
    bitwise equal, and their error against fp32 at most twice the atomic path's (same precision)."""
    q, k, v, cu = packed_inputs([2048, 777], 8, 2, d, dtype=dtype, device=device, seed=3)
    kw = dict(cu_seqlens=cu, block_size=64, topk=4, sink_blocks=1, return_lse=True)
    q32, k32, v32 = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    want = grads(*moba_attention(q=q32, k=k32, v=v32, **kw, backend="torch"), (q32, k32, v32))
    fast = grads(*moba_attention(q=q, k=k, v=v, **kw, backend="triton"), (q, k, v))
    runs = [
        grads(*moba_attention(q=q, k=k, v=v, **kw, backend="triton", deterministic=True), (q, k, v))
        for _ in range(2)
    ]
    for name, a, b, c, ref in zip(("dq", "dk", "dv"), *runs, fast, want):
        assert torch.equal(a, b), f"{name}: two deterministic runs differ by {(a - b).abs().max().item():.3e}"
        err, err_fast = ((x.float() - ref).abs().max().item() for x in (a, c))
        assert err <= 2 * err_fast + 1e-5, f"{name}: deterministic err {err:.3e} > 2 x atomic {err_fast:.3e}"
        if dtype == torch.float32:
            assert_close(name, a, ref, 1e-3, 1e-3)
