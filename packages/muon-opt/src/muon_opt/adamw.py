"""AdamW for the parameters Muon does not handle (embeddings, output head, norms, biases, 1-D tensors).

Decoupled weight decay (Loshchilov & Hutter 2019) with bias-corrected moments, written to match
``torch.optim.AdamW`` operation for operation. :func:`adamw_reference` is the per-parameter spec;
:func:`adamw_foreach` is the fast path (one ``torch._foreach_*`` call per operation for a whole group).

``lr`` and ``step`` may be Python numbers (the arithmetic above, exactly) or one-element tensors (what
``torch.compile`` needs so that it does not specialise on their values, as ``torch.optim.AdamW`` does with
its tensor step): the tensor form does the same algebra in at least fp32 and agrees to rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["adamw_foreach", "adamw_reference"]


def _is_python(lr: float | Tensor, weight_decay: float | Tensor, steps: list[int | Tensor]) -> bool:
    return (
        not isinstance(lr, Tensor)
        and not isinstance(weight_decay, Tensor)
        and not any(isinstance(s, Tensor) for s in steps)
    )


def adamw_reference(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int | Tensor,
    *,
    lr: float | Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float | Tensor,
) -> None:
    """One AdamW step on one parameter, in place. ``step`` counts from 1 (already incremented)."""
    beta1, beta2 = betas
    if not _is_python(lr, weight_decay, [step]):
        _adamw_tensor(
            param, grad, exp_avg, exp_avg_sq, step, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
        )
        return
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def _adamw_tensor(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int | Tensor,
    *,
    lr: float | Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float | Tensor,
) -> None:
    """:func:`adamw_reference` with tensor ``lr`` / ``step``: no ``.item()``, no Python-float scalars derived
    from them, and the parameter update in at least fp32, rounded once (see ``muon_opt.muon.apply_update``)."""
    beta1, beta2 = betas
    dtype = torch.promote_types(param.dtype, torch.float32)
    lr_t, wd_t, step_t = (
        torch.as_tensor(x, dtype=dtype, device=param.device).reshape(()) for x in (lr, weight_decay, step)
    )
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step_t
    bias_correction2_sqrt = (1 - beta2**step_t).sqrt()
    denom = (exp_avg_sq.to(dtype).sqrt() / bias_correction2_sqrt).add_(eps)
    new = param.to(dtype) * (1 - lr_t * wd_t) - exp_avg.to(dtype) / denom * (lr_t / bias_correction1)
    param.copy_(new)


def adamw_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int] | list[Tensor],
    *,
    lr: float | Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float | Tensor,
) -> None:
    """:func:`adamw_reference` on a list of parameters with ``torch._foreach_*`` ops (same arithmetic).

    Needs fp32/fp64 parameters when ``lr``, ``weight_decay`` or ``steps`` are tensors (the optimizer sends
    other dtypes through :func:`adamw_reference`)."""
    if not params:
        return
    beta1, beta2 = betas
    if not _is_python(lr, weight_decay, list(steps)):
        device, dtype = params[0].device, torch.promote_types(params[0].dtype, torch.float32)
        lr_t, wd_t = (torch.as_tensor(x, dtype=dtype, device=device).reshape(()) for x in (lr, weight_decay))
        steps_t = [torch.as_tensor(s, dtype=dtype, device=device).reshape(()) for s in steps]
        torch._foreach_mul_(params, 1 - lr_t * wd_t)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [(1 - beta2**s).sqrt() for s in steps_t])
        torch._foreach_add_(denom, eps)
        updates = torch._foreach_div(exp_avgs, denom)
        torch._foreach_mul_(updates, [lr_t / (1 - beta1**s) for s in steps_t])
        torch._foreach_sub_(params, updates)
        return
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    bias_correction2_sqrt = [math.sqrt(1 - beta2**s) for s in steps]
    step_sizes = [-lr / (1 - beta1**s) for s in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)
