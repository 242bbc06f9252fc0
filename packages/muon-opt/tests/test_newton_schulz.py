"""Newton-Schulz: the batched fast path against the per-matrix reference, and the reference against math."""

from __future__ import annotations

import pytest
import torch
from close import assert_close, max_err, seeded

from muon_opt import POLAR_EXPRESS_COEFFICIENTS, newton_schulz, newton_schulz_reference

SHAPES = [(1, 7), (7, 1), (3, 3), (17, 9), (9, 17), (64, 64), (65, 33), (2, 3, 17, 9), (4, 40, 24)]


def _id(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_fast_path_error_bounded_by_reference_error(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """dion-style: the batched path's error vs a float64 reference is at most a small multiple of the
    per-matrix reference's own error in the same dtype (plus a few ulps for float64 itself)."""
    G = torch.randn(shape, generator=seeded(0), dtype=torch.float64)
    truth = newton_schulz_reference(G)
    fast = newton_schulz(G.to(dtype))
    ref = newton_schulz_reference(G.to(dtype))
    assert fast.dtype == dtype and fast.shape == G.shape
    ulp = torch.finfo(dtype).eps
    assert max_err(fast, truth) <= 3 * max_err(ref, truth) + 50 * ulp, (
        f"fast err {max_err(fast, truth):.3e} vs reference err {max_err(ref, truth):.3e}"
    )


@pytest.mark.parametrize("shape", [(8, 8), (24, 10), (10, 24), (3, 30, 12)], ids=_id)
def test_orthogonalises(shape: tuple[int, ...]) -> None:
    G = torch.randn(shape, generator=seeded(1), dtype=torch.float64)
    sv = torch.linalg.svdvals(newton_schulz(G))
    # Keller Jordan's quintic leaves singular values in roughly [0.7, 1.2] (not exactly 1, by design).
    assert sv.min() > 0.6 and sv.max() < 1.25, sv
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = newton_schulz(G, coefficients=POLAR_EXPRESS_COEFFICIENTS)
    # Polar Express converges much closer to the polar factor U V^T in the same 5 steps.
    assert max_err(polar, U @ Vh) < max_err(newton_schulz(G), U @ Vh)
    sv_pe = torch.linalg.svdvals(polar)
    assert sv_pe.min() > 0.8 and sv_pe.max() < 1.2, sv_pe


def test_reference_is_the_written_iteration() -> None:
    G = torch.randn(6, 10, generator=seeded(2), dtype=torch.float64)
    X = G / (G.norm() + 1e-7)
    for _ in range(5):
        A = X @ X.T
        X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
    assert_close(newton_schulz_reference(G), X, atol=1e-13, what="reference vs hand-written NS5")
    # tall input: transposed so the Gram matrix is the small one, result transposed back
    assert_close(newton_schulz_reference(G.T.contiguous()), X.T, atol=1e-13, what="tall vs wide")


def test_per_step_coefficients_and_repeat_last() -> None:
    G = torch.randn(12, 20, generator=seeded(3), dtype=torch.float64)
    pe = POLAR_EXPRESS_COEFFICIENTS
    seven = newton_schulz(G, steps=7, coefficients=pe)
    explicit = newton_schulz(G, steps=7, coefficients=[*pe, pe[-1], pe[-1]])
    assert torch.equal(seven, explicit)
    assert_close(seven, newton_schulz_reference(G, 7, pe), atol=1e-12, what="polar express fast vs ref")


def test_compute_dtype_and_no_aliasing() -> None:
    G = torch.randn(2, 16, 8, generator=seeded(4)).to(torch.bfloat16)
    keep = G.clone()
    out = newton_schulz(G, dtype=torch.float32)
    assert out.dtype == torch.bfloat16
    assert torch.equal(G, keep), "input modified"
    assert out.untyped_storage().data_ptr() != G.untyped_storage().data_ptr()
    ref = newton_schulz_reference(G.float()).to(torch.bfloat16)
    assert_close(out, ref, atol=2 * torch.finfo(torch.bfloat16).eps * 1.5, what="bf16 io, fp32 compute")
    zero = newton_schulz(torch.zeros(5, 3))
    assert torch.equal(zero, torch.zeros(5, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fn", [newton_schulz, newton_schulz_reference], ids=["fast", "reference"])
def test_huge_entries_do_not_overflow_the_norm(fn, dtype: torch.dtype) -> None:
    """Entries up to ~3e38 (near the fp32/bf16 maximum): ||G||_F itself is not representable, but the
    normalisation runs on a power-of-two rescaled copy, so the result is that of G * 2^-120, bit for bit
    (the plain ``G / (||G||_F + eps)`` gives all zeros here)."""
    G = ((torch.rand(2, 24, 40, generator=seeded(6)) * 2 - 1) * 3e38).to(dtype)
    assert torch.isfinite(G).all() and not torch.isfinite(torch.linalg.matrix_norm(G.float())).all()
    out = fn(G)
    assert torch.isfinite(out).all()
    assert torch.equal(out, fn(G * 2.0**-120))
    assert torch.linalg.svdvals(out.double()).min() > 0.5


@pytest.mark.parametrize(
    ("G", "kwargs", "match"),
    [
        (torch.randn(5), {}, "at least 2 dims"),
        (torch.randn(3, 3, dtype=torch.complex64), {}, "complex"),
        (torch.ones(3, 3, dtype=torch.int64), {}, "floating-point"),
        (torch.randn(3, 3), {"steps": -1}, "steps"),
        (torch.randn(3, 3), {"coefficients": (1.0, 2.0)}, "triple"),
    ],
    ids=["1d", "complex", "int", "neg-steps", "bad-coefficients"],
)
@pytest.mark.parametrize("fn", [newton_schulz, newton_schulz_reference], ids=["fast", "reference"])
def test_bad_input_errors(fn, G: torch.Tensor, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fn(G, **kwargs)


@pytest.mark.cuda
def test_fast_path_on_device(device: torch.device) -> None:
    G = torch.randn(3, 64, 48, generator=seeded(5), dtype=torch.float64)
    truth = newton_schulz_reference(G)
    for dtype in (torch.float32, torch.bfloat16):
        fast = newton_schulz(G.to(device, dtype)).cpu()
        ref = newton_schulz_reference(G.to(dtype))
        assert max_err(fast, truth) <= 3 * max_err(ref, truth) + 50 * torch.finfo(dtype).eps


@pytest.mark.parametrize("shape", [(3, 16, 16), (2, 40, 12), (4, 12, 40), (24, 10)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_overwrite_input_is_the_same_iteration(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """``overwrite_input=True`` reuses the input as an iterate (tall matrices in the right-hand form): the
    same polynomial, so it agrees with the copying path to rounding, and with the reference as closely as
    the copying path does; the input's memory is spent."""
    G = torch.randn(shape, generator=seeded(4), dtype=dtype)
    copying = newton_schulz(G.clone())
    ref = newton_schulz_reference(G.double())
    work = G.clone()
    out = newton_schulz(work, overwrite_input=True)
    assert out.shape == G.shape and out.dtype == G.dtype
    eps = torch.finfo(dtype).eps
    assert_close(out, copying, atol=64 * eps, rtol=64 * eps, what="in place vs copying")
    assert max_err(out, ref) <= 2 * max_err(copying, ref) + 64 * eps
    assert not torch.equal(work, G)  # the input was used as workspace


def test_overwrite_input_leaves_inputs_it_cannot_use() -> None:
    """A non-contiguous input, or one in another dtype than the compute dtype, is not overwritten."""
    G = torch.randn(16, 24, generator=seeded(5)).mT  # non-contiguous
    before = G.clone()
    newton_schulz(G, overwrite_input=True)
    assert torch.equal(G, before)
    H = torch.randn(8, 8, generator=seeded(6), dtype=torch.float64)
    before = H.clone()
    newton_schulz(H, dtype=torch.float32, overwrite_input=True)
    assert torch.equal(H, before)
