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

from moba_testing import assert_close, grads, packed_inputs

from moba_attn import moba_attention, moba_attention_reference
from moba_attn.inputs import validate
from moba_attn.routing import BlockTable, QueryInfo, key_block_means, select_blocks

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
