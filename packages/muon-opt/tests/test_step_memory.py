"""The bucketed fast path: views instead of copies, chunks that change nothing but the peak memory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from close import assert_close, seeded
from test_matrix_view import CASES

from muon_opt import MatrixSpec, Muon, matrix_views, to_matrix_groups

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
memory = pytest.importorskip("memory")


@pytest.mark.parametrize(("shape", "spec"), [(c[0], c[1]) for c in CASES], ids=[str(c[0:2]) for c in CASES])
def test_matrix_views_are_the_logical_matrices_and_write_through(
    shape: tuple, spec: MatrixSpec | None
) -> None:
    t = torch.randn(shape, generator=seeded(0), dtype=torch.float64)
    views = matrix_views(t, spec)
    groups = to_matrix_groups(t, spec)
    assert len(views) == len(groups)
    for v, g in zip(views, groups, strict=True):
        assert v.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()  # a view, not a copy
        assert torch.equal(v.reshape(g.shape), g)
    for k, v in enumerate(views):
        v.fill_(float(k + 1))
    for k, g in enumerate(to_matrix_groups(t, spec)):
        assert bool((g == k + 1).all()), f"group {k} was not written through its view"


def test_matrix_views_refuse_a_tensor_that_cannot_be_viewed() -> None:
    t = torch.randn(6, 4, 5).permute(2, 1, 0)  # [5, 4, 6] whose last two dims cannot merge into 24
    with pytest.raises(RuntimeError):
        matrix_views(t, MatrixSpec(layout="flatten"))
    assert matrix_views(t, MatrixSpec(layout="flatten"), writable=False)[0].shape == (1, 1, 5, 24)


def _params(dtype: torch.dtype) -> list[dict]:
    gen = seeded(3)
    shapes = [(48, 16)] * 5 + [(16, 48)] * 3 + [(6, 8, 12)] + [(24, 12)] * 2 + [(12, 36), (8, 3, 3, 3)]
    specs = [None] * 8 + [None, MatrixSpec(split_sizes=(8, 8, 8)), MatrixSpec(head_dim=4)]
    specs += [MatrixSpec(split_sizes=(12, 12, 12), split_dim=-1), None]
    groups = []
    for i, (shape, spec) in enumerate(zip(shapes, specs, strict=True)):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype))
        groups.append({"params": [p], "matrix_spec": spec, "lr": 0.02 if i % 2 else 0.03})
    # a transposed (non-contiguous) matrix and an extra group with its own momentum
    p = torch.nn.Parameter(torch.randn(20, 16, generator=gen, dtype=dtype).T)
    groups.append({"params": [p], "momentum": 0.9, "nesterov": False})
    return groups


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bucket_bytes", [1, 3000, 20_000])
def test_chunked_step_equals_one_bucket_and_the_reference(dtype: torch.dtype, bucket_bytes: int) -> None:
    """Cutting buckets into chunks (down to one matrix, or one index of a stacked parameter) changes
    nothing: bit-identical to the unchunked fast path, and to the reference within fp rounding."""
    runs = {}
    for name, kw in {"one": {}, "chunked": {"bucket_bytes": bucket_bytes}, "ref": {"foreach": False}}.items():
        groups = _params(dtype)
        opt = Muon(groups, weight_decay=0.1, ns_dtype=None, **kw)
        gen = seeded(11)
        for _ in range(3):
            for g in groups:
                for p in g["params"]:
                    p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
            opt.step()
        runs[name] = [p.detach().clone() for g in groups for p in g["params"]]
    for a, b in zip(runs["one"], runs["chunked"], strict=True):
        assert torch.equal(a, b)
    eps = torch.finfo(dtype).eps  # bf16 Newton-Schulz rounds differently in a batch of another size
    tol = 1e3 * eps if dtype == torch.float64 else 4 * eps
    for k, (a, b) in enumerate(zip(runs["one"], runs["ref"], strict=True)):
        assert_close(a, b, atol=tol, rtol=tol, what=f"param {k}")


def test_peak_step_memory_is_under_the_muon_parameter_bytes() -> None:
    """With the default bucket size, one step allocates less than the Muon parameters' own bytes
    (before bucketing it was 2.8x: every Nesterov input, stack and Newton-Schulz output alive at once)."""
    gen = seeded(5)
    params = [
        torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(512, 128), (128, 512), (384, 128)] * 8
    ]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt = Muon(params, lr=1e-3, ns_dtype="float32")
    opt.step()  # creates the state
    peak = memory.peak_transient_bytes(opt.step)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    assert 0 < peak <= 1.0 * param_bytes, f"peak {peak / param_bytes:.2f}x of {param_bytes / 2**20:.1f} MiB"
    peaks = {}
    for cap in (1 << 18, 1 << 30):  # one matrix per chunk; one bucket per shape (what chunks avoid)
        other = Muon(
            [torch.nn.Parameter(p.detach().clone()) for p in params],
            lr=1e-3,
            ns_dtype="float32",
            bucket_bytes=cap,
        )
        for q, p in zip(other.param_groups[0]["params"], params, strict=True):
            q.grad = p.grad
        other.step()
        peaks[cap] = memory.peak_transient_bytes(other.step)
    assert peaks[1 << 18] < 0.25 * param_bytes < peak < peaks[1 << 30]


@pytest.mark.parametrize("bad", [0, -5, 1.5, True])
def test_bucket_bytes_is_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="bucket_bytes"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], bucket_bytes=bad)  # type: ignore[arg-type]
