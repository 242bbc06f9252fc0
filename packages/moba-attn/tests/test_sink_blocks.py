"""Sink blocks: the first ``n`` key blocks of every sequence are always attended (taking routed slots).

Every backend is checked against the mask reference extended with the same rule, in prefill, decode and
chunked prefill; the Triton backend's sink tests live in ``test_op_triton.py`` (interpreter switch).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from moba_testing import assert_close, grads, packed_inputs

from moba_attn import KeyBlockMeans, moba_attention, moba_attention_reference
from moba_attn.inputs import validate
from moba_attn.reference import moba_mask_reference
from moba_attn.routing import route

# (lengths, Hq, Hkv, D, block_size, topk, sink_blocks)
CASES = [
    ([63], 4, 2, 60, 16, 3, 1),
    ([257], 8, 1, 16, 32, 4, 2),
    ([100, 1, 156], 4, 4, 16, 16, 2, 1),
    ([17, 200, 63, 1, 90, 33, 128], 8, 2, 60, 32, 5, 3),
    ([300], 2, 2, 32, 16, 4, 3),
]


def case_id(c: tuple) -> str:
    lengths, hq, hkv, d, bs, topk, sink = c
    return f"N{len(lengths)}-T{sum(lengths)}-H{hq}x{hkv}-D{d}-B{bs}-k{topk}-s{sink}"


def _tol(d: int) -> float:
    return 2e-5 * math.sqrt(d)


def test_reference_mask_keeps_the_first_blocks_and_the_budget() -> None:
    """Every query past block n sees blocks 0..n-1 whole, its own block causally, and topk-1-n routed."""
    bs, topk, sink = 16, 4, 2
    q, k, _, _ = packed_inputs([160], 2, 1, 16, grad=False, seed=3)
    mask = moba_mask_reference(q, k, bs, topk, sink)  # [Hq, T, T]
    plain = moba_mask_reference(q, k, bs, topk)
    blocks = mask.view(2, 160, 10, bs).any(-1)  # [Hq, T, nb]: block attended at all
    own = torch.arange(160) // bs
    for t in range(160):
        for j in range(min(sink, own[t])):
            assert bool(mask[:, t, j * bs : (j + 1) * bs].all()), f"query {t} misses sink block {j}"
        assert int(blocks[0, t].sum()) == min(topk, own[t] + 1)
    assert not torch.equal(mask, plain)  # the rule changes something on random keys
    # causality is untouched: nothing above the diagonal
    assert not bool(mask.triu(1).any())


def test_sinks_equal_plain_moba_when_they_are_the_gate_choice() -> None:
    """Make block 0 the gate's top pick for every query: sink_blocks=1 must then change nothing."""
    bs = 16
    q, k, v, _ = packed_inputs([128], 2, 2, 16, grad=False, seed=4)
    q = q.abs() + 0.1
    k = k.clone()
    k[:bs] = 10.0  # mean key of block 0 scores far above the others for positive queries
    kw = dict(q=q, k=k, v=v, block_size=bs, topk=3)
    assert_close("sink=1 vs plain", moba_attention(**kw, sink_blocks=1), moba_attention(**kw), 1e-6)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_torch_backend_with_sinks_matches_reference(case: tuple) -> None:
    lengths, hq, hkv, d, bs, topk, sink = case
    q, k, v, cu = packed_inputs(lengths, hq, hkv, d, seed=len(lengths) + d + sink)
    kw = dict(q=q, k=k, v=v, cu_seqlens=cu, block_size=bs, topk=topk, return_lse=True, sink_blocks=sink)
    o, lse = moba_attention(**kw, backend="torch")
    o_ref, lse_ref = moba_attention_reference(**kw)
    assert_close("o", o, o_ref, _tol(d))
    assert_close("lse", lse, lse_ref, _tol(d))
    for name, a, b in zip(("dq", "dk", "dv"), grads(o, lse, (q, k, v)), grads(o_ref, lse_ref, (q, k, v))):
        assert_close(name, a, b, 5 * _tol(d), 1e-4)


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [5, 40, 1], [70, 2, 33]], ids=["decode", "chunk", "mixed"])
def test_sinks_in_decode_and_chunked_prefill_equal_prefill(q_lens: list[int]) -> None:
    lengths = [70, 120, 33]
    q, k, v, cu = packed_inputs(lengths, 4, 2, 32, seed=7, grad=False)
    kw = dict(block_size=16, topk=4, sink_blocks=2)
    full = moba_attention(q=q, k=k, v=v, cu_seqlens=cu, **kw)
    cu_l = cu.tolist()
    take = torch.cat([torch.arange(cu_l[i + 1] - n, cu_l[i + 1]) for i, n in enumerate(q_lens)])
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    dkw = dict(q=q[take], k=k, v=v, cu_seqlens=cu_q, cu_seqlens_k=cu, **kw)
    assert_close("decode vs prefill", moba_attention(**dkw), full[take], 1e-5)
    assert_close("reference decode", moba_attention_reference(**dkw), full[take], 1e-5)
    means = KeyBlockMeans.from_keys(k, 16, cu)
    assert_close("with KeyBlockMeans", moba_attention(**dkw, block_means=means), full[take], 1e-5)


@pytest.mark.parametrize("case", CASES[:3], ids=case_id)
def test_flex_backend_with_sinks_matches_reference(case: tuple) -> None:
    pytest.importorskip("torch.nn.attention.flex_attention")
    lengths, hq, hkv, d, bs, topk, sink = case
    q, k, v, cu = packed_inputs(lengths, hq, hkv, d, grad=False, seed=11)
    kw = dict(q=q, k=k, v=v, cu_seqlens=cu, block_size=bs, topk=topk, return_lse=True, sink_blocks=sink)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex on CPU warns that it is unfused
        o, lse = moba_attention(**kw, backend="flex")
    o_ref, lse_ref = moba_attention_reference(**kw)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("lse", lse, lse_ref, 1e-5)


@pytest.mark.parametrize("case", CASES[:4], ids=case_id)
def test_flash_plumbing_with_sinks_matches_reference(case: tuple) -> None:
    """The flash backend's gathers and merges, with flash-attn replaced by a dense stand-in."""
    from test_op_flash import DENSE

    from moba_attn.flash_backend import moba_attention_flash

    lengths, hq, hkv, d, bs, topk, sink = case
    q, k, v, cu = packed_inputs(lengths, hq, hkv, d, seed=12)
    layout, scale = validate(q, k, v, bs, topk, cu, None, None, sink)
    o, lse = moba_attention_flash(q, k, v, route(q, k, layout, topk, None, sink), scale, ops=DENSE)
    kw = dict(q=q, k=k, v=v, cu_seqlens=cu, block_size=bs, topk=topk, return_lse=True, sink_blocks=sink)
    o_ref, lse_ref = moba_attention_reference(**kw)
    assert_close("o", o, o_ref, _tol(d))
    assert_close("lse", lse, lse_ref, _tol(d))
    for name, a, b in zip(("dq", "dk", "dv"), grads(o, None, (q, k, v)), grads(o_ref, None, (q, k, v))):
        assert_close(name, a, b, 5 * _tol(d), 1e-4)


@pytest.mark.parametrize(
    "sink,topk,match",
    [(-1, 3, "sink_blocks must be an int >= 0"), (True, 3, "sink_blocks must be an int"),
     (3, 3, "sink_blocks=3 needs topk >= 4"), (1, 1, "sink_blocks=1 needs topk >= 2")],
)  # fmt: skip
def test_bad_sink_blocks_are_named(sink, topk, match) -> None:
    q, k, v, _ = packed_inputs([32], 2, 2, 16, grad=False)
    with pytest.raises(ValueError, match=match):
        moba_attention(q=q, k=k, v=v, block_size=16, topk=topk, sink_blocks=sink)
    with pytest.raises(ValueError, match=match):
        moba_attention_reference(q=q, k=k, v=v, block_size=16, topk=topk, sink_blocks=sink)
