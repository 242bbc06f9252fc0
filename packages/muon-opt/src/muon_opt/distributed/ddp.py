"""Tier 1, ``DDPMuon``: replicated parameters with averaged gradients; whole-matrix owners."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from muon_opt.distributed.base import _DistributedMuon, _Param
from muon_opt.distributed.layout import balance_ownership, newton_schulz_flops
from muon_opt.optimizer import _scaled


class DDPMuon(_DistributedMuon):
    """Muon for replicated parameters whose gradients are already averaged (``DistributedDataParallel``).

    Each matrix is owned by one rank (balanced by Newton-Schulz FLOPs, :func:`balance_ownership`), which
    keeps its momentum, orthogonalises it (same-shape matrices batched) and contributes the scaled update
    to one all-gather (in ``comm_dtype``); every rank then applies every update, so replicas stay
    identical. AdamW parameters are owned the same way (balanced by size) and their new values all-gathered.
    Per-rank state is the owned parameters' state, about ``1/W`` of the total.
    """

    tier = "ddp"

    def __init__(self, params: Any, lr: float = 1e-3, weight_decay: float = 0.1, **kwargs: Any) -> None:
        super().__init__(params, lr, weight_decay, **kwargs)
        muon = [x for x in self._infos if x.muon]
        other = [x for x in self._infos if not x.muon]
        self.owner: list[int] = [0] * len(self._infos)
        flops = [newton_schulz_flops(x.shape, x.spec, x.group["ns_steps"]) for x in muon]
        for x, r in zip(muon, balance_ownership(flops, self.world_size), strict=True):
            self.owner[x.index] = r
        for x, r in zip(other, balance_ownership([x.numel for x in other], self.world_size), strict=True):
            self.owner[x.index] = r
        # Each rank's payload in the all-gathers: its owned params in index order, padded to the longest.
        self._slot: dict[int, int] = {}
        self._widths: dict[bool, int] = {}
        for kind, infos in ((True, muon), (False, other)):
            used = [0] * self.world_size
            for x in infos:
                self._slot[x.index] = used[self.owner[x.index]]
                used[self.owner[x.index]] += x.numel
            self._widths[kind] = max(used, default=0)
        self._init_state(lambda x: x.param.detach() if self.owner[x.index] == self.rank else None)

    def _held(self, info: _Param, rank: int) -> tuple[int, int] | None:
        return (0, info.numel) if self.owner[info.index] == rank else None

    def _gather(self, send: Tensor, name: str) -> tuple[Tensor, Any]:
        out = send.new_empty(send.numel() * self.world_size)
        self.comm.record(name, "all_gather", out.numel() * out.element_size())
        return out, dist.all_gather_into_tensor(out, send, group=self.process_group, async_op=True)

    def _step(self) -> None:
        grads = {x.index: self._check_grad(x) for x in self._infos}
        dtype = self._infos[0].param.dtype if self._infos else torch.float32
        scale = None
        if self._infos:
            # the gradients are the all-reduced ones, the same on every rank: the norm needs no communication
            present = [g for g in grads.values() if g is not None]
            skip, scale = self._clip_factor(
                self._sum_of_squares(present, self._device()),
                lambda: [i for i, g in grads.items() if g is not None and not bool(torch.isfinite(g).all())],
                reduce_flags=False,
                dtype=dtype,
            )
            if skip:
                return
        mine = [x for x in self._infos if self.owner[x.index] == self.rank and grads[x.index] is not None]
        grads.update({x.index: _scaled(grads[x.index], scale) for x in mine})  # only what this rank uses
        updates = {x.index: self._momentum(x, grads[x.index]) for x in mine if x.muon}
        scaled = self._orthogonalise(updates)
        jobs = []
        if self._widths[True]:
            send = torch.zeros(self._widths[True], dtype=self.comm_dtype or dtype, device=self._device())
            for i, u in scaled.items():
                send[self._slot[i] : self._slot[i] + u.numel()] = u.reshape(-1)
            jobs.append((True, *self._gather(send, "all_gather/muon_updates")))
        if self._widths[False]:
            send = torch.zeros(self._widths[False], dtype=dtype, device=self._device())
            for x in self._infos:
                if not x.muon and grads[x.index] is not None:
                    self._steps[x.index] += 1
            for x in mine:
                if not x.muon:
                    new = x.param.detach().clone()
                    self._adamw(x, new, grads[x.index])
                    send[self._slot[x.index] : self._slot[x.index] + x.numel] = new.reshape(-1)
            jobs.append((False, *self._gather(send, "all_gather/adamw_params")))
        for kind, out, work in jobs:
            work.wait()
            width = self._widths[kind]
            for x in self._infos:
                if x.muon != kind or grads[x.index] is None:
                    continue
                start = self.owner[x.index] * width + self._slot[x.index]
                value = out[start : start + x.numel].view(x.shape)
                if kind:
                    self._apply_muon(x, x.param.detach(), value)
                else:
                    x.param.detach().copy_(value)

    def _device(self) -> torch.device:
        return self._infos[0].param.device
