"""The autograd Function of the backends that plan once and attend in plain functions (torch, torch_tiled).

A backend supplies ``forward(q, k, v, plan, scale) -> (o, lse)`` and ``backward(q, k, v, o, lse, do, dlse,
plan, scale) -> (dq, dk, dv)``; the plan is built once in the forward and reused by the backward, which
recomputes from the saved merged output and log-sum-exp (flash-style: nothing of size ``T * block_size``
is kept between the passes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Forward = Callable[[Tensor, Tensor, Tensor, Any, float], tuple[Tensor, Tensor]]
Backward = Callable[..., tuple[Tensor, Tensor, Tensor]]


class PlannedAttention(torch.autograd.Function):
    """``o`` in ``q``'s dtype and ``lse`` fp32 from ``forward``; gradients of both through ``backward``."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: Any, scale: float, fwd: Forward, bwd: Backward):  # type: ignore[override]
        o, lse = fwd(q, k, v, plan, scale)
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan, ctx.scale, ctx.bwd = plan, scale, bwd
        return o, lse

    @staticmethod
    def backward(ctx, do: Tensor, dlse: Tensor | None):  # type: ignore[override]
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = ctx.bwd(q, k, v, o, lse, do, dlse, ctx.plan, ctx.scale)
        return dq, dk, dv, None, None, None, None
