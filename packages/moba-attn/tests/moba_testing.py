"""Test helpers for the MoBA op tests: seeded packed inputs and one closeness check that reports errors."""

from __future__ import annotations

import torch
from torch import Tensor


def packed_inputs(
    lengths: list[int],
    hq: int,
    hkv: int,
    d: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random ``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` and int32 ``cu_seqlens`` for the given lengths."""
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q = torch.randn(t, hq, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(t, hkv, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(t, hkv, d, generator=g).to(device=device, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    if grad:
        q.requires_grad_(True)
        k.requires_grad_(True)
        v.requires_grad_(True)
    return q, k, v, cu


def assert_close(name: str, got: Tensor, want: Tensor, atol: float, rtol: float = 0.0) -> None:
    """Fail with the max absolute and relative error when ``|got - want| > atol + rtol * |want|``."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.detach().double(), want.detach().double()
    err = (got - want).abs()
    rel = (err / want.abs().clamp(min=1e-6)).max().item() if err.numel() else 0.0
    bad = err > atol + rtol * want.abs()
    assert not bool(bad.any()), (
        f"{name}: max abs err {err.max().item():.3e}, max rel err {rel:.3e}, {int(bad.sum())} of {err.numel()} "
        f"elements outside atol={atol:.1e} rtol={rtol:.1e}"
    )


def grads(out: Tensor, lse: Tensor | None, inputs: tuple[Tensor, ...], seed: int = 1) -> tuple[Tensor, ...]:
    """Gradients of a random linear functional of the output (and of the LSE) w.r.t. ``inputs``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g).to(out)
    loss = (out.float() * w.float()).sum()
    if lse is not None:
        loss = loss + (lse * torch.randn(lse.shape, generator=g).to(lse)).sum()
    return torch.autograd.grad(loss, inputs)
