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
(:class:`~muon_opt.distributed_comm.CommCounter`).

``state_dict()`` returns ``torch.optim``'s layout (``{"state": {param index: {...}}, "param_groups": [...]}``)
with every state tensor a DTensor of the parameter's shape sharded on dim 0 over the group, whatever the
tier (:mod:`muon_opt.distributed_checkpoint`): ``torch.distributed.checkpoint.state_dict``'s
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

import bisect
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from muon_opt import distributed_checkpoint
from muon_opt.adamw import adamw_reference
from muon_opt.distributed_comm import CommCounter
from muon_opt.distributed_layout import FlatLayout, balance_ownership, newton_schulz_flops, plan_flat_layout
from muon_opt.matrix_view import MatrixSpec, from_matrix_groups, to_matrix_groups
from muon_opt.muon import apply_update, muon_update
from muon_opt.newton_schulz import newton_schulz
from muon_opt.optimizer import Muon, _adamw_lr_wd, _describe, _scaled
from muon_opt.scale import resolve_ns_dtype, update_scale

__all__ = [
    "DDPMuon",
    "FSDPMuon",
    "ZeroMuon",
    "distributed_muon",
    "load_checkpoint",
    "save_checkpoint",
]


@dataclass
class _Param:
    """One parameter as the distributed optimizers see it (``index`` is its position over all groups)."""

    index: int
    group: dict[str, Any]
    group_index: int
    position: int  # in its group's params
    param: Tensor
    muon: bool
    spec: MatrixSpec | None
    shape: tuple[int, ...]
    numel: int


class _DistributedMuon(Muon):
    """Shared machinery: param bookkeeping, batched NS, AdamW pieces, accounting, sharded state_dict."""

    tier = "base"

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        *,
        process_group: dist.ProcessGroup | None = None,
        comm_dtype: torch.dtype | None = None,
        **muon_kwargs: Any,
    ) -> None:
        if muon_kwargs.get("log_update_rms"):
            raise ValueError(
                f"{type(self).__name__}: log_update_rms=True is single-process only; leave it False"
            )
        super().__init__(params, lr=lr, weight_decay=weight_decay, **muon_kwargs)
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"{type(self).__name__}: torch.distributed is not initialised; call "
                "torch.distributed.init_process_group('gloo' or 'nccl') first (or use muon_opt.Muon)"
            )
        if comm_dtype is not None and not (
            isinstance(comm_dtype, torch.dtype) and comm_dtype.is_floating_point
        ):
            raise ValueError(
                f"{type(self).__name__}: comm_dtype={comm_dtype!r} must be None or a float dtype"
            )
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.comm_dtype = comm_dtype
        self.comm = CommCounter(self.world_size)
        self._infos: list[_Param] = []
        for gi, group in enumerate(self.param_groups):
            specs = group["matrix_spec"]
            for j, p in enumerate(group["params"]):
                use = group["use_muon"]
                self._infos.append(
                    _Param(
                        index=len(self._infos),
                        group=group,
                        group_index=gi,
                        position=j,
                        param=p,
                        muon=p.ndim >= 2 if use is None else bool(use),
                        spec=specs[j] if isinstance(specs, list) else specs,
                        shape=tuple(p.shape),
                        numel=p.numel(),
                    )
                )
        self._steps = [0] * len(self._infos)  # AdamW step counts, kept on every rank
        dtypes = {x.param.dtype for x in self._infos}
        if len(dtypes) > 1:
            raise ValueError(
                f"{type(self).__name__}: parameters have several dtypes {sorted(map(str, dtypes))}; the "
                "communication buffers hold one dtype, so build one optimizer per parameter dtype"
            )
        if self.tier != "fsdp":
            from torch.distributed.tensor import DTensor

            if any(isinstance(x.param, DTensor) for x in self._infos):
                raise ValueError(
                    f"{type(self).__name__}: got DTensor parameters (FSDP2 / fully_shard); use FSDPMuon for them"
                )

    # ------------------------------------------------------------------ what this rank holds

    def _held(self, info: _Param, rank: int) -> tuple[int, int] | None:
        """``(start, length)`` of ``info``'s flattened parameter whose optimizer state ``rank`` holds."""
        raise NotImplementedError

    def _init_state(self, like: Callable[[_Param], Tensor | None]) -> None:
        """Zero state for what this rank holds (zeros are what single-process Muon starts from)."""
        for info in self._infos:
            st = self.state[info.param]  # an entry for every parameter, so that optim.state is never empty
            # (get_optimizer_state_dict would otherwise "initialise" it with a zero-lr step on this rank only)
            ref = like(info)
            if ref is None:
                continue
            if info.muon:
                st["momentum_buffer"] = torch.zeros_like(ref)
            else:
                st["exp_avg"] = torch.zeros_like(ref)
                st["exp_avg_sq"] = torch.zeros_like(ref)

    def state_bytes(self) -> int:
        """Bytes of optimizer state tensors held by this rank."""
        return sum(
            t.numel() * t.element_size()
            for st in self.state.values()
            for t in st.values()
            if torch.is_tensor(t)
        )

    # ------------------------------------------------------------------ shared maths

    def _comm(self, x: Tensor) -> Tensor:
        return x if self.comm_dtype is None else x.to(self.comm_dtype)

    def _orthogonalise(self, updates: dict[int, Tensor]) -> dict[int, Tensor]:
        """``scale * NS(U)`` for whole-shape updates, stacking same-shape matrices into one NS call."""
        out: dict[int, Tensor] = {}
        self._orthogonalise_into(updates, out.__setitem__, None)
        return out

    def _orthogonalise_into(
        self, updates: dict[int, Tensor], consume: Callable[[int, Tensor], None], cap_bytes: int | None
    ) -> None:
        """``consume(i, scale * NS(U_i))`` for whole-shape updates. Same-shape matrices are stacked into
        batched NS calls of at most ``cap_bytes`` (``None``: one call per shape; a larger matrix goes
        alone), and each call's results are consumed before the next call runs, so only one chunk's
        transients are alive at a time."""
        batches: dict[tuple, list[int]] = defaultdict(list)
        for i, u in updates.items():
            info = self._infos[i]
            batches[(id(info.group), info.shape, info.spec, u.dtype)].append(i)
        for all_idx in batches.values():
            info = self._infos[all_idx[0]]
            g = info.group
            nbytes = updates[all_idx[0]].numel() * updates[all_idx[0]].element_size()
            per_call = len(all_idx) if cap_bytes is None else max(1, cap_bytes // max(nbytes, 1))
            for c in range(0, len(all_idx), per_call):
                idx = all_idx[c : c + per_call]
                ns_dtype = resolve_ns_dtype(g["ns_dtype"], updates[idx[0]].device, updates[idx[0]].dtype)
                per = [to_matrix_groups(updates[i], info.spec) for i in idx]
                result: list[list[Tensor]] = [[] for _ in idx]
                for k in range(len(per[0])):
                    stacked = torch.cat([m[k] for m in per]) if len(idx) > 1 else per[0][k]
                    rows, cols = stacked.shape[-2:]
                    ortho = newton_schulz(
                        stacked, g["ns_steps"], g["ns_coefficients"], g["eps"], dtype=ns_dtype
                    )
                    ortho.mul_(update_scale(rows, cols, g["adjust_lr"]))  # a fresh tensor: never the input
                    for n, part in enumerate(ortho.split([m[k].shape[0] for m in per])):
                        result[n].append(part)
                    del stacked, ortho, part  # a loop variable's view would keep this chunk alive
                for n, i in enumerate(idx):
                    consume(i, from_matrix_groups(result[n], info.shape, info.spec))
                del per, result

    def _momentum(self, info: _Param, grad: Tensor) -> Tensor:
        g = info.group
        buf = self.state[info.param]["momentum_buffer"]
        return muon_update(grad, buf, momentum=g["momentum"], nesterov=g["nesterov"])

    @staticmethod
    def _apply_muon(info: _Param, target: Tensor, scaled: Tensor) -> None:
        lr, wd = info.group["lr"], info.group["weight_decay"]
        apply_update(target, scaled.to(target.dtype), lr=lr, weight_decay=wd)

    def _adamw(self, info: _Param, target: Tensor, grad: Tensor) -> None:
        g = info.group
        lr, wd = _adamw_lr_wd(g, info.group_index)
        st = self.state[info.param]
        adamw_reference(
            target, grad, st["exp_avg"], st["exp_avg_sq"], self._steps[info.index],
            lr=lr, betas=g["adamw_betas"], eps=g["adamw_eps"], weight_decay=wd,
        )  # fmt: skip

    def _check_grad(self, info: _Param) -> Tensor | None:
        grad = info.param.grad
        if grad is None:
            return None
        if grad.is_sparse or grad.layout != torch.strided:
            raise ValueError(
                f"{type(self).__name__}: parameter {info.index} has a sparse gradient; use dense"
            )
        if tuple(grad.shape) != info.shape:
            raise ValueError(
                f"{type(self).__name__}: parameter {info.index} of shape {info.shape} has a gradient of shape "
                f"{tuple(grad.shape)}"
            )
        return grad

    @staticmethod
    def _sum_of_squares(grads: list[Tensor], device: torch.device) -> Tensor:
        """Sum of squared entries of ``grads`` as a float64 0-dim tensor: squares of entries up to the fp32
        maximum (~3e38) cannot overflow it, so it is non-finite exactly when an entry is."""
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=device)
        norms = torch._foreach_norm(grads, 2, dtype=torch.float64)
        return torch.stack([n.to(device) for n in norms]).square().sum()

    def _clip_factor(
        self, sum_sq: Tensor, local_bad: Callable[[], list[int]], reduce_flags: bool, dtype: torch.dtype
    ) -> tuple[bool, Tensor | None]:
        """From the global ``sum_sq`` (every rank holds the same): record :attr:`last_grad_norm`, raise or
        skip on a non-finite gradient (the same decision on every rank), return ``(skip, clip factor)``.

        ``local_bad()`` lists the parameter indices whose local gradient piece is not finite; with
        ``reduce_flags`` their union over the ranks is all-reduced first (one collective, only then)."""
        norm = sum_sq.sqrt()
        self._stats["last_grad_norm"] = norm.to(torch.promote_types(dtype, torch.float32))
        if not bool(torch.isfinite(norm)):
            flags = torch.zeros(len(self._infos), dtype=torch.float32, device=sum_sq.device)
            for i in local_bad():
                flags[i] = 1.0
            if reduce_flags:
                self.comm.record(
                    "all_reduce/nonfinite_flags", "all_reduce", flags.numel() * flags.element_size()
                )
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.process_group)
            bad = [self._infos[i] for i in flags.nonzero().flatten().tolist()]
            described = [f"{_describe(x.group, x.group_index, x.position, x.param)}" for x in bad]
            return self._nonfinite(described or ["(not located: the gradient norm overflowed float64)"]), None
        if self.max_grad_norm is None:
            return False, None
        return False, torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step()
        self.comm.end_step()
        return loss

    def _step(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ world-size independent checkpoints

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """World-size independent state, every tensor a DTensor sharded ``Shard(0)`` over this group
        (:mod:`muon_opt.distributed_checkpoint`), in ``torch.optim``'s layout: save it with
        ``torch.distributed.checkpoint`` directly or through ``get_optimizer_state_dict``. A collective:
        every rank of the group must call it."""
        return distributed_checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load what :meth:`state_dict` returned (after ``torch.distributed.checkpoint.load`` filled it, at
        any world size and from any tier), what ``set_optimizer_state_dict`` passes, or full tensors.
        A collective."""
        distributed_checkpoint.load_state_dict(self, state_dict)


# ---------------------------------------------------------------------- tier 1: replicated parameters


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


# ---------------------------------------------------------------------- tier 2: ZeRO-1 flat buffer


class ZeroMuon(_DistributedMuon):
    """ZeRO-1 Muon, the paper's Algorithm 1 (Moonlight, arXiv 2502.16982, Sec. 2.3), for replicated
    parameters with local (not yet averaged) gradients: do not wrap the model in DDP.

    Parameters are laid out in one flat buffer split into ``W`` equal shards (:func:`plan_flat_layout`,
    ``layout="min_straddle"`` packs matrices so few cross a shard boundary; ``self.layout.report()`` says
    how many do). Per step: reduce-scatter the gradients, update the momentum of the local shard, run NS on
    the matrices that lie wholly in the shard, all-to-all the momentum-updated pieces of the straddling
    matrices (``comm_dtype``, bf16 in the paper) so each rank touching one has it whole, NS it and keep the
    local slice, apply the update to the local shard, all-gather the parameters. The straddler exchange
    runs while the local NS computes. State per rank is exactly the local shard's (``total / W``).

    Memory: the flat buffer is never materialised whole. The reduce-scatter input and the all-gather
    output share one buffer of ``comm_bucket_bytes`` (default a fifth of a shard's bytes, at least 64 KiB:
    ``5 W`` reduce-scatters and all-gathers a step; raise it on large clusters where per-call latency
    dominates), the Nesterov input is formed in place in the gradient shard, and Newton-Schulz runs in
    chunks of ``bucket_bytes`` (default a twentieth of this rank's Muon bytes, at least its largest matrix)
    whose updates go into the parameters before the next chunk. Per-rank step transient: about
    ``1.2 x model bytes / W`` plus a few Newton-Schulz chunks.
    """

    tier = "zero1"

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        *,
        layout: str = "min_straddle",
        comm_bucket_bytes: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, lr, weight_decay, **kwargs)
        if comm_bucket_bytes is not None and (
            isinstance(comm_bucket_bytes, bool)
            or not isinstance(comm_bucket_bytes, int)
            or comm_bucket_bytes <= 0
        ):
            raise ValueError(
                f"ZeroMuon: comm_bucket_bytes={comm_bucket_bytes!r} must be None (automatic) or a positive int"
            )
        devices = {x.param.device for x in self._infos}
        if len(devices) > 1:
            raise ValueError(
                f"ZeroMuon: all parameters must be on one device for the flat buffer; got {sorted(map(str, devices))}"
            )
        for x in self._infos:
            if not x.param.is_contiguous():
                raise ValueError(f"ZeroMuon: parameter {x.index} is not contiguous; call .contiguous() on it")
        self.layout: FlatLayout = plan_flat_layout(
            [x.numel for x in self._infos],
            [x.muon for x in self._infos],
            self.world_size,
            layout,  # type: ignore[arg-type]
        )
        self._init_state(self._state_like)
        me = self.rank
        straddlers = self.layout.straddlers
        self._has_straddlers = bool(straddlers)
        # all-to-all plan: (straddler, peer) pairs in a fixed order on every rank
        self._a2a_send: list[list[int]] = [[] for _ in range(self.world_size)]
        for s in straddlers:
            touching = self.layout.ranks_touching(s)
            if me in touching:
                for d in touching:
                    if d != me:
                        self._a2a_send[d].append(s)
        # One buffer of comm_bucket_bytes carries the reduce-scatter input and the all-gather output, one
        # bucket at a time (each bucket is W pieces, one per rank's shard). Default: a fifth of a shard's
        # bytes (0.2x model / W, so 5 W buckets a step), at least 64 KiB.
        elt = self._infos[0].param.element_size() if self._infos else 4
        shard_bytes = self.layout.shard_size * elt
        total = comm_bucket_bytes or max(shard_bytes // 5, 1 << 16)
        bucket_elems = max(1, min(self.layout.shard_size, total // (elt * self.world_size)))
        self.comm_bucket_bytes = bucket_elems * elt * self.world_size
        self._bucket_plan = self._plan_buckets(bucket_elems)
        # Newton-Schulz chunks: bucket_bytes if given, else a twentieth of this rank's Muon bytes, at least
        # its largest matrix, at most 256 MiB: a chunk's workspace (about 4x its bytes) stays near
        # 0.2x model / W plus 4 largest matrices.
        local_muon = [x for x in self._infos if x.muon and self.layout.held(x.index, me) is not None]
        largest = max((x.numel * elt for x in local_muon), default=0)
        local_bytes = sum(self.layout.held(x.index, me)[1] for x in local_muon) * elt  # type: ignore[index]
        self._ns_cap = self.bucket_bytes or min(max(local_bytes // 20, largest, 1), 1 << 28)

    def _state_like(self, info: _Param) -> Tensor | None:
        held = self.layout.held(info.index, self.rank)
        if held is None:
            return None
        return info.param.detach().reshape(-1)[held[0] : held[0] + held[1]]

    def _held(self, info: _Param, rank: int) -> tuple[int, int] | None:
        return self.layout.held(info.index, rank)

    def _local(self, i: int, rank: int | None = None) -> slice:
        """Slice of shard ``rank`` (default: this rank) holding parameter ``i``'s piece."""
        rank = self.rank if rank is None else rank
        start, length = self.layout.held(i, rank)  # type: ignore[misc]
        begin = self.layout.offsets[i] + start - rank * self.layout.shard_size
        return slice(begin, begin + length)

    def _zeros_piece(self, s: int, dtype: torch.dtype) -> Tensor:
        """Zeros standing in for a straddler piece no rank has a gradient for (keeps all-to-all sizes static)."""
        n = self.layout.held(s, self.rank)[1]  # type: ignore[index]
        return torch.zeros(n, dtype=dtype, device=self._infos[s].param.device)

    def _plan_buckets(self, bucket_elems: int) -> list[tuple[int, int, list[tuple[int, int, int, int]]]]:
        """Cut the shard space into buckets of at most ``bucket_elems`` elements per rank: for each,
        ``(begin, length, segments)`` with ``segments`` the ``(param index, param offset, buffer offset,
        length)`` runs that tie the bucket's ``W * length`` buffer to the parameters (rank ``r``'s block of
        the buffer is the flat layout's ``[r * S + begin, r * S + begin + length)``)."""
        W, S = self.world_size, self.layout.shard_size
        spans = sorted(
            (off, off + n, i) for i, (off, n) in enumerate(zip(self.layout.offsets, self.layout.numels)) if n
        )
        starts = [sp[0] for sp in spans]
        plan = []
        for begin in range(0, S, bucket_elems):
            length = min(bucket_elems, S - begin)
            segments = []
            for r in range(W):
                lo, hi = r * S + begin, r * S + begin + length
                k = max(bisect.bisect_right(starts, lo) - 1, 0)
                while k < len(spans) and spans[k][0] < hi:
                    off, end, i = spans[k]
                    a, b = max(lo, off), min(hi, end)
                    if a < b:
                        segments.append((i, a - off, r * length + a - lo, b - a))
                    k += 1
            plan.append((begin, length, segments))
        return plan

    def _step(self) -> None:
        """Algorithm 1 with bounded transients: the reduce-scatter input and the all-gather output share one
        bucket buffer of ``comm_bucket_bytes`` (the flat layout is never materialised whole), the Nesterov
        input is formed in place in the gradient shard, and each Newton-Schulz chunk's update goes into the
        parameter before the next chunk runs. Per-rank transient: the gradient shard (model / W), the
        bucket, and a few Newton-Schulz chunks (at least the largest matrix)."""
        W, S, pg, me = self.world_size, self.layout.shard_size, self.process_group, self.rank
        infos = self._infos
        if not infos:
            return
        p0 = infos[0].param
        grads = [self._check_grad(x) for x in infos]
        mask = torch.tensor([g is not None for g in grads], dtype=torch.float64, device=p0.device)
        flat_grads = [None if g is None else g.reshape(-1) for g in grads]
        plan = self._bucket_plan
        bucket = p0.new_empty(W * max((length for _, length, _ in plan), default=0))
        gshard = p0.new_empty(S)
        for begin, length, segments in plan:
            buf = bucket[: W * length]
            buf.zero_()  # padding and parameters without a gradient on this rank count as zeros
            for i, po, bo, n in segments:
                g = flat_grads[i]
                if g is not None:
                    buf[bo : bo + n].copy_(g[po : po + n])
            self.comm.record("reduce_scatter/grads", "reduce_scatter", buf.numel() * buf.element_size())
            dist.reduce_scatter_tensor(gshard[begin : begin + length], buf, op=dist.ReduceOp.SUM, group=pg)
        del flat_grads, grads, bucket, buf  # allocated again for the all-gather, after Newton-Schulz
        gshard.div_(W)
        mine = [x for x in infos if self.layout.held(x.index, me) is not None]

        # One all-reduce: which parameters have a gradient on some rank, and the squared norm of the
        # averaged (true global) gradient, summed over the shards.
        stats = torch.cat([mask, self._sum_of_squares([gshard], p0.device).reshape(1)])
        self.comm.record("all_reduce/grad_stats", "all_reduce", stats.numel() * stats.element_size())
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=pg)
        has_grad = [v > 0 for v in stats[:-1].tolist()]
        skip, scale = self._clip_factor(
            stats[-1],
            lambda: [x.index for x in mine if not bool(torch.isfinite(gshard[self._local(x.index)]).all())],
            reduce_flags=True,
            dtype=p0.dtype,
        )
        if skip:
            return
        if scale is not None:
            gshard.mul_(scale.to(gshard.dtype))

        def local_param(x: _Param) -> Tensor:
            start, length = self.layout.held(x.index, me)  # type: ignore[misc]
            return x.param.detach().reshape(-1)[start : start + length]

        # M <- mu M + G; the matrix to orthogonalise (G + mu M, or M) overwrites the gradient in the shard
        pieces: dict[int, Tensor] = {}
        for x in mine:
            if x.muon and has_grad[x.index]:
                g, buf, grp = gshard[self._local(x.index)], self.state[x.param]["momentum_buffer"], x.group
                buf.mul_(grp["momentum"]).add_(g)
                if grp["nesterov"]:
                    g.add_(buf, alpha=grp["momentum"])
                else:
                    g.copy_(buf)
                pieces[x.index] = g

        work = None
        if self._has_straddlers:
            cdt = self.comm_dtype or p0.dtype
            send_parts, send_sizes, recv_sizes = [], [], []
            for d in range(W):
                parts = [
                    self._comm(pieces[s]) if has_grad[s] else self._zeros_piece(s, cdt)
                    for s in self._a2a_send[d]
                ]
                send_parts += parts
                send_sizes.append(sum(p.numel() for p in parts))
                recv_sizes.append(sum(self.layout.held(s, d)[1] for s in self._a2a_send[d]))  # type: ignore[index]
            send = torch.cat(send_parts) if send_parts else p0.new_zeros(0, dtype=cdt)
            send = send.to(cdt)
            del send_parts
            recv = send.new_empty(sum(recv_sizes))
            self.comm.record("all_to_all/straddlers", "all_to_all", send.numel() * send.element_size())
            work = dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=pg, async_op=True)

        def apply(i: int, scaled: Tensor) -> None:
            x = infos[i]
            start, length = self.layout.held(i, me)  # type: ignore[misc]
            self._apply_muon(x, local_param(x), scaled.reshape(-1)[start : start + length])

        strad = set(self.layout.straddlers)
        whole = {i: u.view(infos[i].shape) for i, u in pieces.items() if i not in strad}
        self._orthogonalise_into(whole, apply, self._ns_cap)  # overlaps with the straddler exchange

        if work is not None:
            work.wait()
            del send, work  # the finished work object still holds both buffers
            received: dict[tuple[int, int], Tensor] = {}
            pos = 0
            for d in range(W):
                for s in self._a2a_send[d]:
                    n = self.layout.held(s, d)[1]  # type: ignore[index]
                    received[(s, d)] = recv[pos : pos + n]
                    pos += n
            for s in sorted(strad):  # one straddler at a time: its whole matrix is alive only for its NS
                if s not in pieces:
                    continue
                parts = [
                    self._comm(pieces[s]) if d == me else received[(s, d)]
                    for d in self.layout.ranks_touching(s)
                ]
                full = torch.cat(parts).to(p0.dtype).view(infos[s].shape)
                self._orthogonalise_into({s: full}, apply, self._ns_cap)
            del recv, received
        for x in infos:
            if not x.muon and has_grad[x.index]:
                self._steps[x.index] += 1
        for x in mine:
            if not x.muon and has_grad[x.index]:
                self._adamw(x, local_param(x), gshard[self._local(x.index)])
        del pieces

        # All-gather the updated shards bucket by bucket through the same buffer, straight back into the
        # parameters (each rank's own piece is already in place).
        bucket = p0.new_empty(W * max((length for _, length, _ in plan), default=0))
        for _begin, length, segments in plan:
            buf = bucket[: W * length]
            mine_in = buf[me * length : (me + 1) * length]
            for i, po, bo, n in segments:
                if me * length <= bo < (me + 1) * length:
                    mine_in[bo - me * length : bo - me * length + n].copy_(
                        infos[i].param.detach().reshape(-1)[po : po + n]
                    )
            send_piece = mine_in.clone()  # an input aliasing the output is not safe on every backend
            self.comm.record("all_gather/params", "all_gather", buf.numel() * buf.element_size())
            dist.all_gather_into_tensor(buf, send_piece, group=pg)
            for i, po, bo, n in segments:
                if has_grad[i] and not (me * length <= bo < (me + 1) * length):
                    infos[i].param.detach().view(-1)[po : po + n].copy_(buf[bo : bo + n])


# ---------------------------------------------------------------------- tier 3: DTensor / FSDP2


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


# ---------------------------------------------------------------------- choosing a tier, checkpoints


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


def save_checkpoint(optimizer: _DistributedMuon, path: str | Path) -> None:
    """Save ``optimizer.state_dict()`` with ``torch.distributed.checkpoint`` (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(
        {"optimizer": optimizer.state_dict()}, checkpoint_id=str(path), process_group=optimizer.process_group
    )


def load_checkpoint(optimizer: _DistributedMuon, path: str | Path) -> None:
    """Load a checkpoint written by :func:`save_checkpoint` at any world size, into any tier (collective)."""
    import torch.distributed.checkpoint as dcp

    sd = {"optimizer": optimizer.state_dict()}  # the template: DCP reshards into its DTensors
    dcp.load(sd, checkpoint_id=str(path), process_group=optimizer.process_group)
    optimizer.load_state_dict(sd["optimizer"])
