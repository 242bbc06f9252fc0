"""The readable Muon step for one parameter: the specification the optimizer's fast path is tested against.

Moonlight (Liu et al. 2025, arXiv 2502.16982, Algorithm 1), per logical matrix ``W`` of shape ``[A, B]``:

    M <- mu * M + G
    U = NS(G + mu * M)                        (Nesterov; NS(M) without)
    W <- W - lr * (scale(A, B) * U + wd * W)  (scale = 0.2 * sqrt(max(A, B)) by default)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from muon_opt.matrix_view import MatrixSpec, from_matrix_groups, to_matrix_groups
from muon_opt.muon import apply_update, muon_update
from muon_opt.newton_schulz import DEFAULT_NS_COEFFICIENTS, newton_schulz_reference
from muon_opt.scale import update_scale

__all__ = ["muon_step_reference"]


def muon_step_reference(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor,
    *,
    lr: float | Tensor,
    weight_decay: float | Tensor,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coefficients: tuple[float, float, float]
    | Sequence[tuple[float, float, float]] = DEFAULT_NS_COEFFICIENTS,
    eps: float = 1e-7,
    adjust_lr: str = "match_rms_adamw",
    ns_dtype: torch.dtype | None = None,
    matrix_spec: MatrixSpec | None = None,
) -> Tensor:
    """Apply one Muon step to ``param`` in place; returns the scaled update ``scale * U`` (before ``lr``).

    ``momentum_buffer`` is advanced in place; ``grad`` is never modified. ``ns_dtype`` is the resolved
    compute dtype of Newton-Schulz (``None``: the gradient's dtype).
    """
    update = muon_update(grad, momentum_buffer, momentum=momentum, nesterov=nesterov)
    scaled = []
    for matrices in to_matrix_groups(update, matrix_spec):
        ortho = newton_schulz_reference(matrices, ns_steps, ns_coefficients, eps, dtype=ns_dtype)
        scaled.append(ortho * update_scale(matrices.shape[-2], matrices.shape[-1], adjust_lr))
    scaled_update = from_matrix_groups(scaled, update.shape, matrix_spec)
    apply_update(param, scaled_update, lr=lr, weight_decay=weight_decay)
    return scaled_update
