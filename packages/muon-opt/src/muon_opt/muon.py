"""The Muon momentum step (Moonlight form), shared by the optimizer's reference and fast paths.

Moonlight (Liu et al. 2025, arXiv 2502.16982, Algorithm 1) keeps an undampened momentum
``M <- mu * M + G`` and, with Nesterov, orthogonalises ``G + mu * M``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["apply_update", "muon_update"]


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


def apply_update(param: Tensor, update: Tensor, *, lr: float | Tensor, weight_decay: float | Tensor) -> None:
    """``param <- param * (1 - lr * weight_decay) - lr * update`` in place (decoupled weight decay).

    With Python numbers this is ``mul_`` then ``add_(alpha=-lr)``. ``lr`` (or ``weight_decay``) may be a
    one-element tensor, so that ``torch.compile`` never specialises on its value; the arithmetic then runs
    in at least fp32 and rounds once into ``param``: a 0-dim tensor is cast to a bf16 parameter's dtype
    first, which would turn ``1 - 1e-4`` into ``1.0`` and drop the weight decay.
    """
    if not isinstance(lr, Tensor) and not isinstance(weight_decay, Tensor):
        param.mul_(1 - lr * weight_decay)
        param.add_(update, alpha=-lr)
        return
    dtype = torch.promote_types(param.dtype, torch.float32)
    lr_t = torch.as_tensor(lr, dtype=dtype, device=param.device).reshape(())
    wd_t = torch.as_tensor(weight_decay, dtype=dtype, device=param.device).reshape(())
    new = param.to(dtype) * (1 - lr_t * wd_t) - update.to(dtype) * lr_t
    param.copy_(new)
