"""AdamW for the parameters Muon does not handle (embeddings, output head, norms, biases, 1-D tensors).

Decoupled weight decay (Loshchilov & Hutter 2019) with bias-corrected moments, written to match
``torch.optim.AdamW`` operation for operation. :func:`adamw_reference` is the per-parameter spec;
:func:`adamw_foreach` is the fast path (one ``torch._foreach_*`` call per operation for a whole group).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["adamw_foreach", "adamw_reference"]


def adamw_reference(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step on one parameter, in place. ``step`` counts from 1 (already incremented)."""
    beta1, beta2 = betas
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def adamw_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """:func:`adamw_reference` on a list of parameters with ``torch._foreach_*`` ops (same arithmetic)."""
    if not params:
        return
    beta1, beta2 = betas
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
