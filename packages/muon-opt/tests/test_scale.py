"""Update scale (Moonlight's Lemma 1) and the Newton-Schulz dtype choice."""

from __future__ import annotations

import math

import pytest
import torch
from close import seeded

from muon_opt import POLAR_EXPRESS_COEFFICIENTS, newton_schulz, resolve_ns_dtype, update_scale

SHAPES = [(2, 2), (3, 3), (16, 16), (16, 64), (64, 16), (128, 32), (7, 300), (300, 7), (96, 96), (33, 65)]


def _rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


def test_formulas() -> None:
    assert update_scale(64, 16, "match_rms_adamw") == pytest.approx(0.2 * 8)
    assert update_scale(16, 64, "match_rms_adamw") == pytest.approx(0.2 * 8)
    assert update_scale(64, 16, "original") == pytest.approx(2.0)
    assert update_scale(16, 64, "original") == 1.0
    assert update_scale(16, 64, "spectral") == pytest.approx(0.5)
    assert update_scale(16, 64, "spectral_unclamped") == pytest.approx(0.5)
    assert update_scale(16, 64, "none") == 1.0
    with pytest.raises(ValueError, match="mode="):
        update_scale(4, 4, "adam")
    with pytest.raises(ValueError, match="positive"):
        update_scale(0, 4, "none")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_lemma1_scaled_update_rms_is_0p2(shape: tuple[int, int]) -> None:
    """Moonlight Lemma 1: for an orthogonal update of rank min(A, B), 0.2 * sqrt(max(A, B)) gives RMS 0.2."""
    G = torch.randn(shape, generator=seeded(0), dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    scale = update_scale(*shape, "match_rms_adamw")
    assert _rms(scale * (U @ Vh)) == pytest.approx(0.2, rel=1e-9)
    # Newton-Schulz is only approximately orthogonal (singular values in ~[0.7, 1.2]): RMS within 20%.
    assert _rms(scale * newton_schulz(G)) == pytest.approx(0.2, rel=0.2)
    assert _rms(scale * newton_schulz(G, coefficients=POLAR_EXPRESS_COEFFICIENTS)) == pytest.approx(
        0.2, rel=0.1
    )


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_other_modes_rms(shape: tuple[int, int]) -> None:
    A, B = shape
    G = torch.randn(shape, generator=seeded(1), dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    O = U @ Vh
    # RMS(O) = sqrt(min(A, B) / (A * B)); spectral multiplies it by sqrt(A / B).
    assert _rms(update_scale(A, B, "spectral") * O) == pytest.approx(math.sqrt(min(A, B) / (B * B)), rel=1e-9)
    assert _rms(update_scale(A, B, "none") * O) == pytest.approx(1 / math.sqrt(max(A, B)), rel=1e-9)


def test_resolve_ns_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_ns_dtype("auto", "cpu") == torch.float32
    assert resolve_ns_dtype("auto", "cpu", torch.bfloat16) == torch.float32  # never bf16 matmuls on CPU
    assert resolve_ns_dtype("auto", "cpu", torch.float64) == torch.float64  # never downcasts fp64
    assert resolve_ns_dtype(None, "cpu", torch.bfloat16) == torch.bfloat16
    assert resolve_ns_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_ns_dtype(torch.float16, "cpu") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert resolve_ns_dtype("auto", "cuda") == torch.float32  # e.g. a V100: no silent bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_ns_dtype("auto", "cuda") == torch.bfloat16
    with pytest.raises(ValueError, match="ns_dtype"):
        resolve_ns_dtype("int8", "cpu")
    with pytest.raises(ValueError, match="ns_dtype"):
        resolve_ns_dtype(torch.int32, "cpu")
