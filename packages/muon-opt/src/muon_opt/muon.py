"""The Muon momentum step (Moonlight form), shared by the optimizer's reference and fast paths.

Moonlight (Liu et al. 2025, arXiv 2502.16982, Algorithm 1) keeps an undampened momentum
``M <- mu * M + G`` and, with Nesterov, orthogonalises ``G + mu * M``.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["muon_update"]


def muon_update(grad: Tensor, momentum_buffer: Tensor, *, momentum: float, nesterov: bool) -> Tensor:
    """Advance ``momentum_buffer`` in place and return the matrix to orthogonalise.

    ``momentum_buffer <- momentum * momentum_buffer + grad``; returns ``grad + momentum * momentum_buffer``
    (Nesterov) or a copy of the buffer. The result is always a fresh tensor: whatever the caller does to
    it (Newton-Schulz, in-place scaling) can never write into the optimizer state or into ``grad``.
    ``torch.optim.Muon`` renormalises an alias of its momentum buffer in place when ``nesterov=False``
    and the parameter is bf16; this function is the guard against that class of bug.
    """
    momentum_buffer.mul_(momentum).add_(grad)
    if nesterov:
        return grad.add(momentum_buffer, alpha=momentum)
    return momentum_buffer.clone()
