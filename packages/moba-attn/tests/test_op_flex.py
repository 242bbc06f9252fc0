"""The FlexAttention backend against the reference (forward on CPU; backward needs a GPU)."""

from __future__ import annotations

import warnings

import pytest
import torch
from moba_testing import assert_close, grads, packed_inputs

from moba_attn import moba_attention, moba_attention_reference
from moba_attn.inputs import validate
from moba_attn.routing import route

pytest.importorskip("torch.nn.attention.flex_attention")


def _flex(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager (uncompiled) flex on CPU warns that it is unfused
        return moba_attention(**kw, backend="flex")


@pytest.mark.parametrize(
    "lengths,hq,hkv,d,bs,topk",
    [
        ([63], 4, 2, 60, 16, 3),
        ([300, 1, 200], 4, 1, 16, 64, 3),
        ([257], 2, 2, 16, 200, 2),
        ([130], 2, 2, 16, 16, 1),
    ],
    ids=["T63-H4x2-D60-B16-k3", "N3-H4x1-B64-k3", "T257-B200-k2", "T130-k1"],
)
def test_flex_forward_matches_reference(lengths, hq, hkv, d, bs, topk) -> None:
    q, k, v, cu = packed_inputs(lengths, hq, hkv, d, grad=False)
    kw = dict(q=q, k=k, v=v, cu_seqlens=cu, block_size=bs, topk=topk, return_lse=True)
    o, lse = _flex(**kw)
    o_ref, lse_ref = moba_attention_reference(**kw)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("lse", lse, lse_ref, 1e-5)


def test_flex_decode_matches_prefill() -> None:
    q, k, v, cu = packed_inputs([150, 70], 2, 1, 16, grad=False)
    take = torch.tensor([149, 219])
    cu_q = torch.tensor([0, 1, 2], dtype=torch.int32)
    o = _flex(q=q[take], k=k, v=v, cu_seqlens=cu_q, cu_seqlens_k=cu, block_size=32, topk=3)
    want = moba_attention(q=q, k=k, v=v, cu_seqlens=cu, block_size=32, topk=3)[take]
    assert_close("decode", o, want, 1e-5)


def test_block_mask_is_sparse_and_built_from_routing() -> None:
    """Queries that agree on their routing give a BlockMask with only own + routed tiles active."""
    from moba_attn.flex_backend import build_block_mask

    _, k, _, _ = packed_inputs([1024], 1, 1, 16, grad=False)
    q = torch.randn(1, 1, 16).expand(1024, 1, 16) + 1e-3 * torch.randn(1024, 1, 16)
    layout, _ = validate(q, k, k, 128, 2, None, None, None)
    routing = route(q, k, layout, 2)
    bm = build_block_mask(routing, 1, 1024)
    counts = bm.kv_num_blocks[0, 0].tolist()
    assert counts[0] == 1 and max(counts) <= 2, counts  # causal would need i + 1 tiles for q tile i
    picked = routing.selected[128:, 0, 0]
    tiles = bm.kv_indices[0, 0, 1:, :2].tolist()
    for i, row in enumerate(tiles, start=1):
        assert i in row and int(picked[(i - 1) * 128]) in row


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_flex_on_gpu_forward_backward(device, dtype) -> None:
    from moba_cuda import check_low_precision

    check_low_precision("flex", device, dtype)


@pytest.mark.cuda
def test_flex_fp32_grads_on_gpu(device) -> None:
    q, k, v, cu = packed_inputs([300, 200], 4, 2, 64, device=device)
    kw = dict(q=q, k=k, v=v, cu_seqlens=cu, block_size=64, topk=3)
    o, o_ref = moba_attention(**kw, backend="flex"), moba_attention_reference(**kw)
    assert_close("o", o, o_ref, 1e-4)
    for name, a, b in zip(("dq", "dk", "dv"), grads(o, None, (q, k, v)), grads(o_ref, None, (q, k, v))):
        assert_close(name, a, b, 1e-3, 1e-3)
