"""Tier 3, ``FSDPMuon``: DTensor parameters sharded on dim 0 (FSDP2 ``fully_shard``)."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from muon_opt.distributed.base import _DistributedMuon, _Param
from muon_opt.distributed.layout import balance_ownership, newton_schulz_flops
from muon_opt.optimizer import _scaled


class FSDPMuon(_DistributedMuon):
    """Muon for DTensor parameters sharded on dim 0 over a 1-D mesh (FSDP2 ``fully_shard``, or
    ``distribute_tensor(..., [Shard(0)])``), the pattern Dion and torchtitan use.

    Each matrix has an owner (balanced by NS FLOPs). Every rank updates the momentum of its rows, one
    all-to-all sends the rows of each matrix to its owner (``comm_dtype``), owners orthogonalise whole
    matrices (same-shape ones batched), and a second all-to-all returns each rank its rows of the update.
    AdamW runs element-wise on the local shards. State per rank is the local rows' (``total / W``, up to
    ``torch.chunk`` rounding of dim 0).
    """

    tier = "fsdp"

    def __init__(self, params: Any, lr: float = 1e-3, weight_decay: float = 0.1, **kwargs: Any) -> None:
        from torch.distributed.tensor import DTensor, Shard

        pg = kwargs.pop("process_group", None)
        params = list(params)
        flat = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
        flat = [p[1] if isinstance(p, tuple) else p for p in flat]
        meshes = set()
        for n, p in enumerate(flat):
            if not isinstance(p, DTensor) or p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                what = (
                    f"DTensor with placements {p.placements}" if isinstance(p, DTensor) else type(p).__name__
                )
                raise ValueError(
                    f"FSDPMuon: parameter {n} is a {what}; it needs DTensors sharded on dim 0 over a 1-D mesh "
                    "(torch.distributed.fsdp.fully_shard). Use DDPMuon/ZeroMuon for replicated parameters"
                )
            meshes.add(id(p.device_mesh))
        if len(meshes) > 1:
            raise ValueError("FSDPMuon: all parameters must live on one device mesh")
        if pg is None and flat:
            pg = flat[0].device_mesh.get_group()
        super().__init__(params, lr, weight_decay, process_group=pg, **kwargs)
        self._rows: list[list[tuple[int, int]]] = []  # per param, per rank: (first row, n rows)
        for x in self._infos:
            n0 = x.shape[0]
            chunk = math.ceil(n0 / self.world_size) if n0 else 0
            rows = [
                (min(r * chunk, n0), max(0, min((r + 1) * chunk, n0) - r * chunk))
                for r in range(self.world_size)
            ]
            self._rows.append(rows)
            local = x.param.to_local()
            if local.shape[0] != rows[self.rank][1]:
                raise ValueError(
                    f"FSDPMuon: parameter {x.index} has {local.shape[0]} local rows on rank {self.rank}, expected "
                    f"{rows[self.rank][1]} (torch.chunk sharding of dim 0); uneven custom sharding is unsupported"
                )
        flops = [newton_schulz_flops(x.shape, x.spec, x.group["ns_steps"]) for x in self._infos if x.muon]
        self.owner = [-1] * len(self._infos)
        for x, r in zip(
            [x for x in self._infos if x.muon], balance_ownership(flops, self.world_size), strict=True
        ):
            self.owner[x.index] = r
        self._init_state(lambda x: x.param.to_local() if self._held(x, self.rank) else None)

    def _held(self, info: _Param, rank: int) -> tuple[int, int] | None:
        first, n = self._rows[info.index][rank]
        rowsize = info.numel // info.shape[0] if info.shape[0] else 0
        return (first * rowsize, n * rowsize) if n * rowsize > 0 else None

    def _piece(self, info: _Param, rank: int) -> int:
        held = self._held(info, rank)
        return 0 if held is None else held[1]

    def _step(self) -> None:
        W, me = self.world_size, self.rank
        grads: dict[int, Tensor] = {}
        for x in self._infos:
            g = self._check_grad(x)
            if g is not None:
                grads[x.index] = g.to_local() if hasattr(g, "to_local") else g
        if not self._infos:
            return
        local0 = self._infos[0].param.to_local()
        sum_sq = self._sum_of_squares(list(grads.values()), local0.device)
        self.comm.record("all_reduce/grad_norm", "all_reduce", sum_sq.element_size())
        dist.all_reduce(sum_sq, op=dist.ReduceOp.SUM, group=self.process_group)
        skip, scale = self._clip_factor(
            sum_sq,
            lambda: [i for i, g in grads.items() if not bool(torch.isfinite(g).all())],
            reduce_flags=True,
            dtype=local0.dtype,
        )
        if skip:
            return
        if scale is not None:
            grads = {i: _scaled(g, scale) for i, g in grads.items()}
        muon = [x for x in self._infos if x.muon and x.index in grads]
        if muon:
            p0 = muon[0].param.to_local()
            cdt = self.comm_dtype or p0.dtype
            local_u = {
                x.index: self._momentum(x, grads[x.index]) if self._held(x, me) else p0.new_zeros(0)
                for x in muon
            }
            # forward: my rows of each matrix to its owner
            by_owner = [[x for x in muon if self.owner[x.index] == d] for d in range(W)]
            send = [local_u[x.index].reshape(-1).to(cdt) for d in range(W) for x in by_owner[d]]
            send_sizes = [sum(self._piece(x, me) for x in by_owner[d]) for d in range(W)]
            recv_sizes = [sum(self._piece(x, s) for x in by_owner[me]) for s in range(W)]
            recv = self._all_to_all(
                send, send_sizes, recv_sizes, cdt, p0.device, "all_to_all/gather_matrices"
            )
            pos, parts = 0, defaultdict(list)
            for s in range(W):
                for x in by_owner[me]:
                    n = self._piece(x, s)
                    parts[x.index].append(recv[pos : pos + n])
                    pos += n
            full = {i: torch.cat(ps).to(p0.dtype).view(self._infos[i].shape) for i, ps in parts.items()}
            scaled = self._orthogonalise(full)
            # backward: each rank's rows of the scaled update
            send = []
            for d in range(W):
                for x in by_owner[me]:
                    held = self._held(x, d)
                    if held is not None:
                        send.append(scaled[x.index].reshape(-1)[held[0] : held[0] + held[1]].to(cdt))
            back_send = [sum(self._piece(x, d) for x in by_owner[me]) for d in range(W)]
            back_recv = [sum(self._piece(x, me) for x in by_owner[s]) for s in range(W)]
            recv = self._all_to_all(send, back_send, back_recv, cdt, p0.device, "all_to_all/scatter_updates")
            pos = 0
            for s in range(W):
                for x in by_owner[s]:
                    n = self._piece(x, me)
                    if n:
                        local = x.param.to_local()
                        self._apply_muon(x, local, recv[pos : pos + n].view(local.shape))
                    pos += n
        for x in self._infos:
            if not x.muon and x.index in grads:
                self._steps[x.index] += 1
                if self._held(x, me):
                    self._adamw(x, x.param.to_local(), grads[x.index])

    def _all_to_all(
        self, parts: list[Tensor], send_sizes: list[int], recv_sizes: list[int], dtype: torch.dtype,
        device: torch.device, name: str,
    ) -> Tensor:  # fmt: skip
        send = torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)
        recv = send.new_empty(sum(recv_sizes))
        others = sum(n for d, n in enumerate(send_sizes) if d != self.rank)
        self.comm.record(name, "all_to_all", others * send.element_size())
        dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=self.process_group)
        return recv
