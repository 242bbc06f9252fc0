"""Distributed Muon on ``torch.distributed``: three tiers, one maths, world-size independent checkpoints.

Every tier computes exactly what single-process :class:`muon_opt.Muon` computes on the global batch
(Moonlight, Liu et al. 2025, arXiv 2502.16982): per logical matrix ``M <- mu M + G``,
``W <- W - lr (scale * NS(G + mu M) + wd W)``, AdamW for the other parameters. They differ in who holds the
optimizer state and who pays for Newton-Schulz (NS), which needs whole matrices:

- :class:`DDPMuon`: replicated parameters whose gradients are already averaged (``DistributedDataParallel``).
  Each matrix has one owner (balanced by NS FLOPs); owners all-gather the orthogonalised updates.
- :class:`ZeroMuon`: replicated parameters with local gradients (no DDP), ZeRO-1 as in the paper's
  Algorithm 1: reduce-scatter gradients, all-to-all only the matrices that straddle shard boundaries,
  all-gather parameters.
- :class:`FSDPMuon`: DTensor parameters sharded on dim 0 (FSDP2 ``fully_shard`` or ``distribute_tensor``):
  all-to-all the momentum rows to each matrix's owner, NS there, all-to-all the rows back.

:func:`distributed_muon` picks the tier from the parameters. Optimizer state is sharded in every tier (per
rank about ``1/W`` of single-process Muon: by ownership in ``DDPMuon``, by flat-buffer shard in
``ZeroMuon``, by rows in ``FSDPMuon``). ``comm_dtype=torch.bfloat16`` sends the matrices that are gathered
for NS (and the updates ``DDPMuon`` all-gathers) in bf16, as the paper does; parameters and gradients always
travel in their own dtype. Every collective's bytes are recorded in ``optimizer.comm``
(:class:`~muon_opt.distributed.comm.CommCounter`).

``state_dict()`` returns ``torch.optim``'s layout (``{"state": {param index: {...}}, "param_groups": [...]}``)
with every state tensor a DTensor of the parameter's shape sharded on dim 0 over the group, whatever the
tier (:mod:`muon_opt.distributed.checkpoint`): ``torch.distributed.checkpoint.state_dict``'s
``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` work with it, and ``torch.distributed.checkpoint``
reshards it to any world size and any tier (:func:`save_checkpoint`, :func:`load_checkpoint`).

Gradient rules: ``grad is None`` skips a parameter (no momentum, no weight decay), as in ``muon_opt.Muon``.
``DDPMuon`` and ``FSDPMuon`` need it to be the same on every rank (DDP and FSDP guarantee this); ``ZeroMuon``
treats a rank's missing gradient as zeros and skips only parameters no rank has a gradient for.

``max_grad_norm`` and ``nonfinite`` mean what they mean in ``muon_opt.Muon``, on the true global gradient
(the averaged one single-process Muon would see on the global batch): ``DDPMuon`` takes the norm of the
all-reduced gradients every rank holds (no communication), ``ZeroMuon`` of the reduce-scattered shards (its
squared norm rides on the all-reduce that already carried the grad-``None`` mask), ``FSDPMuon`` of the
local shards (one 8-byte all-reduce). The non-finite decision is the same on every rank, so all ranks raise
or all skip; naming the parameters costs one more small all-reduce, only when something is not finite.
"""

from __future__ import annotations

from typing import Any

from muon_opt.distributed.base import _DistributedMuon
from muon_opt.distributed.checkpoint import load_checkpoint, save_checkpoint
from muon_opt.distributed.ddp import DDPMuon
from muon_opt.distributed.fsdp import FSDPMuon
from muon_opt.distributed.zero import ZeroMuon

__all__ = [
    "DDPMuon",
    "FSDPMuon",
    "ZeroMuon",
    "distributed_muon",
    "load_checkpoint",
    "save_checkpoint",
]


def distributed_muon(params: Any, *, grads: str = "local", **kwargs: Any) -> _DistributedMuon:
    """The distributed Muon that fits ``params``: :class:`FSDPMuon` for DTensor parameters, otherwise
    :class:`DDPMuon` if ``grads="averaged"`` (the model is wrapped in ``DistributedDataParallel``) or
    :class:`ZeroMuon` if ``grads="local"`` (plain replicated model; the optimizer reduce-scatters).
    Remaining keyword arguments go to the class (``lr``, ``weight_decay``, ``comm_dtype``, ...).
    """
    from torch.distributed.tensor import DTensor

    if grads not in ("local", "averaged"):
        raise ValueError(f"distributed_muon: grads={grads!r} must be 'local' (no DDP) or 'averaged' (DDP)")
    params = list(params)
    flat = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    if any(isinstance(p[1] if isinstance(p, tuple) else p, DTensor) for p in flat):
        return FSDPMuon(params, **kwargs)
    return DDPMuon(params, **kwargs) if grads == "averaged" else ZeroMuon(params, **kwargs)
