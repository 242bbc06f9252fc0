"""The torch backend (and the public op on CPU) against the mask-based fp32 reference."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from moba_testing import assert_close, grads, packed_inputs

import moba_attn
from moba_attn import KeyBlockMeans, moba_attention, moba_attention_reference
from moba_attn.reference import moba_mask_reference

# (lengths, Hq, Hkv, D, block_size, topk): the awkward shapes
CASES = [
    ([1], 1, 1, 16, 16, 2),
    ([63], 4, 2, 60, 16, 3),
    ([257], 8, 1, 16, 32, 4),
    ([1000], 2, 2, 128, 64, 8),
    ([1000], 4, 1, 16, 512, 2),
    ([257], 2, 2, 16, 16, 1),
    ([100, 1, 156], 4, 4, 16, 16, 2),
    ([17, 200, 63, 1, 90, 33, 128], 8, 2, 60, 32, 5),
    ([64, 64, 64], 2, 1, 16, 48, 3),
]


def case_id(c: tuple) -> str:
    lengths, hq, hkv, d, bs, topk = c
    return f"N{len(lengths)}-T{sum(lengths)}-H{hq}x{hkv}-D{d}-B{bs}-k{topk}"


def _tol(d: int) -> float:
    return 2e-5 * math.sqrt(d)


# "torch" is the fused CPU path on CPU; "torch_tiled" the batched-matmul baseline
TORCH_PATHS = ["torch", "torch_tiled"]


@pytest.mark.parametrize("backend", TORCH_PATHS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_torch_matches_reference_forward_and_grads(case: tuple, backend: str) -> None:
    lengths, hq, hkv, d, bs, topk = case
    q, k, v, cu = packed_inputs(lengths, hq, hkv, d, seed=len(lengths) + d)
    kw = dict(q=q, k=k, v=v, cu_seqlens=cu, block_size=bs, topk=topk, return_lse=True)
    o, lse = moba_attention(**kw, backend=backend)
    o_ref, lse_ref = moba_attention_reference(**kw)
    assert o.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    assert_close("o", o, o_ref, _tol(d))
    assert_close("lse", lse, lse_ref, _tol(d))
    for name, a, b in zip(("dq", "dk", "dv"), grads(o, lse, (q, k, v)), grads(o_ref, lse_ref, (q, k, v))):
        assert_close(name, a, b, 5 * _tol(d), 1e-4)


@pytest.mark.parametrize("backend", TORCH_PATHS)
@pytest.mark.parametrize(
    "t,bs,topk", [(63, 16, 4), (257, 64, 5), (100, 128, 1), (300, 32, 10), (300, 32, 10**9)]
)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 1)])
def test_full_coverage_equals_sdpa_causal(
    t: int, bs: int, topk: int, hq: int, hkv: int, backend: str
) -> None:
    """Also ``topk=10**9``: clamped to the number of blocks, not allocated."""
    q, k, v, _ = packed_inputs([t], hq, hkv, 32, seed=t)
    o = moba_attention(q=q, k=k, v=v, block_size=bs, topk=topk, backend=backend)
    qs, ks, vs = (x.transpose(0, 1)[None] for x in (q, k, v))
    want = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=hq != hkv)[0].transpose(0, 1)
    assert_close("o vs sdpa", o, want, 1e-5)
    for name, a, b in zip(("dq", "dk", "dv"), grads(o, None, (q, k, v)), grads(want, None, (q, k, v))):
        assert_close(name, a, b, 1e-4, 1e-4)


def _decode_case(lengths: list[int], q_lens: list[int], backend: str = "torch"):
    q, k, v, cu = packed_inputs(lengths, 4, 2, 32, seed=7, grad=False)
    full = moba_attention(q=q, k=k, v=v, cu_seqlens=cu, block_size=16, topk=3, backend=backend)
    cu_l = cu.tolist()
    take = torch.cat([torch.arange(cu_l[i + 1] - n, cu_l[i + 1]) for i, n in enumerate(q_lens)])
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu, full, take, cu_q


@pytest.mark.parametrize("backend", TORCH_PATHS)
@pytest.mark.parametrize(
    "q_lens", [[1, 1, 1], [5, 40, 1], [70, 2, 33], [0, 3, 0]], ids=["decode", "chunk", "mixed", "empty-seqs"]
)
def test_decode_and_chunked_prefill_equal_prefill(q_lens: list[int], backend: str) -> None:
    lengths = [70, 120, 33]
    q, k, v, cu, full, take, cu_q = _decode_case(lengths, q_lens, backend)
    kw = dict(q=q[take], k=k, v=v, cu_seqlens=cu_q, cu_seqlens_k=cu, block_size=16, topk=3)
    o = moba_attention(**kw, backend=backend)
    assert_close("decode vs prefill", o, full[take], 1e-5)
    assert_close("reference decode", moba_attention_reference(**kw), full[take], 1e-5)
    means = KeyBlockMeans.from_keys(k, 16, cu)
    assert_close(
        "with KeyBlockMeans",
        moba_attention(**kw, block_means=means, backend=backend),
        full[take],
        1e-5,
    )


def test_step_by_step_decode_with_incremental_means() -> None:
    """A KV cache grows one token per sequence per step; KeyBlockMeans is appended to, never rebuilt."""
    lengths, prompt = [50, 37], [20, 33]
    q, k, v, cu, full, _, _ = _decode_case(lengths, [1, 1])
    starts = cu.tolist()[:-1]
    means = KeyBlockMeans(16, n_seq=2)
    keep = torch.cat([torch.arange(s, s + p) for s, p in zip(starts, prompt)])
    means.append(k[keep], torch.tensor([0, prompt[0], sum(prompt)], dtype=torch.int32))
    cur = list(prompt)
    one = torch.tensor([0, 1, 2], dtype=torch.int32)
    while cur[0] < lengths[0] and cur[1] < lengths[1]:
        pos = torch.tensor([s + c for s, c in zip(starts, cur)])
        means.append(k[pos], one)
        cur = [c + 1 for c in cur]
        kv = torch.cat([torch.arange(s, s + c) for s, c in zip(starts, cur)])
        cu_k = torch.tensor([0, cur[0], sum(cur)], dtype=torch.int32)
        o = moba_attention(
            q=q[pos],
            k=k[kv],
            v=v[kv],
            cu_seqlens=one,
            cu_seqlens_k=cu_k,
            block_size=16,
            topk=3,
            block_means=means,
        )
        assert_close(f"step {cur}", o, full[pos], 1e-5)
    assert means.lengths.tolist() == cur


def test_ties_go_to_the_earlier_block() -> None:
    """Blocks 0..3 hold identical keys (equal gate scores): the query in block 4 must pick block 0 with topk 2."""
    bs, d = 16, 16
    g = torch.Generator().manual_seed(3)
    blk = torch.randn(bs, 1, d, generator=g)
    k = torch.cat([blk] * 4 + [torch.randn(bs, 1, d, generator=g)])
    v = torch.randn(k.shape, generator=g)
    q = torch.randn(k.shape[0], 1, d, generator=g)
    mask = moba_mask_reference(q, k, bs, topk=2)
    last = mask[0, -1].view(-1, bs).any(-1)
    assert last.tolist() == [True, False, False, False, True]
    o = moba_attention(q=q, k=k, v=v, block_size=bs, topk=2)
    assert_close("ties", o, moba_attention_reference(q=q, k=k, v=v, block_size=bs, topk=2), 1e-5)


def test_scale_and_block_means_arguments() -> None:
    q, k, v, cu = packed_inputs([90, 40], 2, 1, 16, grad=False)
    kw = dict(q=q, k=k, v=v, cu_seqlens=cu, block_size=16, topk=2)
    o = moba_attention(**kw, scale=0.3)
    assert_close("scale", o, moba_attention_reference(**kw, scale=0.3), 1e-5)
    assert not torch.allclose(o, moba_attention(**kw))
    means = KeyBlockMeans.from_keys(k, 16, cu).means()
    assert means.shape == (6 + 3, 1, 16)
    assert_close("block_means tensor", moba_attention(**kw, block_means=means), moba_attention(**kw), 0.0)
    with pytest.raises(ValueError, match="block_means must be"):
        moba_attention(**kw, block_means=means[:-1])


def test_auto_is_torch_on_cpu_and_backends_listed() -> None:
    assert "torch" in moba_attn.available_backends()
    q, k, v, _ = packed_inputs([40], 2, 2, 16, grad=False)
    kw = dict(q=q, k=k, v=v, block_size=16, topk=2)
    assert torch.equal(moba_attention(**kw), moba_attention(**kw, backend="torch"))


def test_half_precision_inputs_on_cpu_return_their_dtype() -> None:
    q, k, v, _ = packed_inputs([70], 2, 1, 16, dtype=torch.bfloat16)
    o = moba_attention(q=q, k=k, v=v, block_size=16, topk=2)
    assert o.dtype == torch.bfloat16
    ref = moba_attention_reference(q=q.float(), k=k.float(), v=v.float(), block_size=16, topk=2)
    assert_close("bf16 o", o, ref, 2e-2)
    dq, dk, dv = grads(o, None, (q, k, v))
    assert dq.dtype == dk.dtype == dv.dtype == torch.bfloat16


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_torch_backend_low_precision_on_gpu(device, dtype) -> None:
    from moba_cuda import check_low_precision

    check_low_precision("torch", device, dtype)


@pytest.mark.cuda
def test_auto_prefers_triton_on_gpu(device) -> None:
    pytest.importorskip("triton")
    from moba_attn.op import _auto

    assert _auto(torch.zeros(4, 2, 16, device=device, dtype=torch.float16)) == "triton"
    assert _auto(torch.zeros(4, 2, 16)) == "torch"


def _bad(**over):
    q, k, v, cu = packed_inputs([32, 32], 4, 2, 16, grad=False)
    kw = dict(q=q, k=k, v=v, cu_seqlens=cu, block_size=16, topk=2)
    kw.update(over)
    return kw


@pytest.mark.parametrize(
    "over,err,match",
    [
        (
            dict(k=torch.randn(64, 3, 16), v=torch.randn(64, 3, 16)),
            ValueError,
            "multiple of the number of key/value",
        ),
        (dict(block_size=0), ValueError, "block_size must be a positive int"),
        (dict(topk=0), ValueError, "topk must be an int >= 1"),
        (dict(q=torch.randint(0, 3, (64, 4, 16))), ValueError, "q must be a floating-point"),
        (dict(cu_seqlens=torch.tensor([0, 40, 30, 64], dtype=torch.int32)), ValueError, "non-decreasing"),
        (dict(cu_seqlens=torch.tensor([0, 32, 60], dtype=torch.int32)), ValueError, r"cu_seqlens\[-1\]=60"),
        (dict(cu_seqlens=torch.tensor([0.0, 64.0])), ValueError, "1-D int32"),
        (dict(q=torch.randn(64, 4)), ValueError, "must be 3-D packed"),
        (dict(k=torch.randn(60, 2, 16), v=torch.randn(60, 2, 16)), ValueError, "pass cu_seqlens_k"),
        (dict(v=torch.randn(64, 2, 8)), ValueError, "same shape"),
        (dict(scale=-1.0), ValueError, "scale must be"),
        (dict(backend="cuda"), ValueError, "backend must be"),
        (dict(cu_seqlens_k=torch.tensor([0, 64], dtype=torch.int32)), ValueError, "describes 1 sequences"),
        (dict(cu_seqlens_k=torch.tensor([0, 16, 64], dtype=torch.int32)), ValueError, "no longer than"),
        (
            dict(block_means=torch.zeros(4, 2, 16, dtype=torch.int64)),
            ValueError,
            "block_means must be floating",
        ),
        (dict(block_means=[[0.0]]), TypeError, "block_means must be a torch.Tensor"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_input_is_named(over: dict, err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        moba_attention(**_bad(**over))


def test_unavailable_backend_says_how_to_fix() -> None:
    if "flash" in moba_attn.available_backends():
        pytest.skip("flash-attn is available here")
    with pytest.raises(RuntimeError, match=r"pip install 'moba-attn\[flash\]'"):
        moba_attention(**_bad(backend="flash"))


_MEMORY_SCRIPT = """
import resource, torch
from moba_attn import moba_attention
torch.manual_seed(0)
T, H, D = 32768, 1, 16
q, k, v = (torch.randn(T, H, D, requires_grad=True) for _ in range(3))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
o = moba_attention(q=q, k=k, v=v, block_size=512, topk=3, backend="torch")
o.float().square().sum().backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""


def test_memory_at_32k_never_builds_a_t_by_t_matrix() -> None:
    """Peak RSS growth for forward + backward at T = 32768 stays far below one T x T matrix (4 GiB fp32,
    1 GiB even as bool): the torch backend scales with T * topk * block_size."""
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, check=True, timeout=300
    )
    grown = int(out.stdout.strip().splitlines()[-1])
    t_by_t_bool = 32768 * 32768
    assert grown < t_by_t_bool // 2, f"peak memory grew by {grown / 2**20:.0f} MiB (T x T bool is 1024 MiB)"


def test_every_public_name_resolves_and_hf_loads_lazily() -> None:
    code = (
        "import sys, moba_attn; assert 'transformers' not in sys.modules, 'transformers imported eagerly'; "
        "missing = [n for n in moba_attn.__all__ if getattr(moba_attn, n, None) is None]; print(missing)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_readme_quickstart_runs() -> None:
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start = readme.index("## Quickstart")
    block = readme[start:].split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(block, "README.md quickstart", "exec"), {})
