"""The one assertion helper of these tests: prints absolute and relative error on failure."""

from __future__ import annotations

import torch
from torch import Tensor


def max_err(actual: Tensor, expected: Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def assert_close(actual: Tensor, expected: Tensor, *, atol: float, rtol: float = 0.0, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    if not bool((diff <= bound).all()):
        rel = (diff / expected.double().abs().clamp_min(1e-30)).max().item()
        raise AssertionError(
            f"{what}: max abs err {diff.max().item():.3e} (atol {atol:.1e}, rtol {rtol:.1e}), max rel err {rel:.3e}"
        )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
