"""What the three tiers share: parameter bookkeeping, batched Newton-Schulz, the AdamW pieces, the
global-norm clip and non-finite decision, and the DTensor ``state_dict`` (:mod:`.checkpoint`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from muon_opt.adamw import adamw_reference
from muon_opt.distributed import checkpoint
from muon_opt.distributed.comm import CommCounter
from muon_opt.matrix_view import MatrixSpec, from_matrix_groups, to_matrix_groups
from muon_opt.muon import apply_update, muon_update
from muon_opt.optimizer import Muon, _adamw_lr_wd, _describe, _scaled_orthogonal, _uses_muon
from muon_opt.scale import resolve_ns_dtype


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
                self._infos.append(
                    _Param(
                        index=len(self._infos),
                        group=group,
                        group_index=gi,
                        position=j,
                        param=p,
                        muon=_uses_muon(group, p),  # the single-process routing rule
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
        """``consume(i, scale * NS(U_i))`` for whole-shape updates, overwriting ``U_i``. Same-shape matrices are stacked into
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
                    ortho = _scaled_orthogonal(stacked, g, ns_dtype)  # the tiers hand over updates they own
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
        (:mod:`muon_opt.distributed.checkpoint`), in ``torch.optim``'s layout: save it with
        ``torch.distributed.checkpoint`` directly or through ``get_optimizer_state_dict``. A collective:
        every rank of the group must call it."""
        return checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load what :meth:`state_dict` returned (after ``torch.distributed.checkpoint.load`` filled it, at
        any world size and from any tier), what ``set_optimizer_state_dict`` passes, or full tensors.
        A collective."""
        checkpoint.load_state_dict(self, state_dict)
