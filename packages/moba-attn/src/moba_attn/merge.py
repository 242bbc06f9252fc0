"""Combine partial attention results computed over disjoint key sets (the paper's "online softmax" merge).

Each part ``i`` gives an output ``o_i`` normalised over its own keys and the log-sum-exp ``lse_i`` of its
scaled scores; the attention over the union is ``sum_i exp(lse_i - lse) o_i`` with
``lse = logsumexp_i lse_i``. Parts with ``lse_i = -inf`` (no keys) drop out. Shared by the torch and
flash-attn backends and the fused CPU decode step.
"""

from __future__ import annotations

import torch
from torch import Tensor


def merge_partials(o_parts: Tensor, lse_parts: Tensor) -> tuple[Tensor, Tensor]:
    """Merge ``o_parts [..., P, D]`` with ``lse_parts [..., P]`` (fp32) into ``o [..., D]``, ``lse [...]``."""
    lse = torch.logsumexp(lse_parts, dim=-1)
    # a row with no keys at all cannot happen in MoBA (the own block always holds the query itself)
    w = torch.exp(lse_parts - lse[..., None])
    o = (w[..., None] * o_parts).sum(dim=-2)
    return o, lse
