"""Tier 2, ``ZeroMuon``: ZeRO-1 over one flat buffer (Moonlight, arXiv 2502.16982, Algorithm 1)."""

from __future__ import annotations

import bisect
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from muon_opt.distributed.base import _DistributedMuon, _Param
from muon_opt.distributed.layout import FlatLayout, plan_flat_layout


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
    chunks of ``bucket_bytes`` (default a twentieth of this rank's Muon bytes or a quarter of its largest
    matrix, whichever is larger; a lone matrix is orthogonalised in place in the gradient shard)
    whose updates go into the parameters before the next chunk. Per-rank step transient: about
    ``1.2 x model bytes / W`` plus the Newton-Schulz workspace of its largest matrix (one more
    matrix-sized buffer and the Gram matrices), and on a rank that gathers a straddling matrix, that matrix.
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
        # Newton-Schulz chunks: bucket_bytes if given, else a twentieth of this rank's Muon bytes or a quarter
        # of its largest matrix, whichever is larger (at most 256 MiB). A lone matrix is orthogonalised in
        # place in the gradient shard (one more matrix-sized buffer and the Gram matrices); a stack costs
        # about 4x its bytes for square matrices, so stacks stay under the largest matrix.
        local_muon = [x for x in self._infos if x.muon and self.layout.held(x.index, me) is not None]
        largest = max((x.numel * elt for x in local_muon), default=0)
        local_bytes = sum(self.layout.held(x.index, me)[1] for x in local_muon) * elt  # type: ignore[index]
        self._ns_cap = self.bucket_bytes or min(max(local_bytes // 20, largest // 4, 1), 1 << 28)

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

    def _nesterov_in_place(self, x: _Param, gshard: Tensor) -> Tensor:
        """``M <- mu M + G``; the matrix to orthogonalise (``G + mu M``, or ``M``) overwrites ``G`` in the
        gradient shard (the same arithmetic as :func:`muon_opt.muon.muon_update`, without its copy)."""
        g, buf, grp = gshard[self._local(x.index)], self.state[x.param]["momentum_buffer"], x.group
        buf.mul_(grp["momentum"]).add_(g)
        if grp["nesterov"]:
            g.add_(buf, alpha=grp["momentum"])
        else:
            g.copy_(buf)
        return g

    def _step(self) -> None:
        """Algorithm 1 with bounded transients: the reduce-scatter input and the all-gather output share one
        bucket buffer of ``comm_bucket_bytes`` (the flat layout is never materialised whole), the Nesterov
        input is formed in place in the gradient shard, and each Newton-Schulz chunk's update goes into the
        parameter before the next chunk runs. Per-rank transient: the gradient shard (model / W), the
        bucket, and one Newton-Schulz chunk's workspace."""
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
            lambda: [x.index for x in mine if not bool(torch.isfinite(gshard[self._local(x.index)]).all())],  # noqa: F821
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
        pieces = {x.index: self._nesterov_in_place(x, gshard) for x in mine if x.muon and has_grad[x.index]}

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
            todo = [s for s in sorted(strad) if s in pieces]
            for n_done, s in enumerate(
                todo, 1
            ):  # one straddler at a time: its whole matrix is alive only for its NS
                parts = [
                    self._comm(pieces[s]) if d == me else received[(s, d)]
                    for d in self.layout.ranks_touching(s)
                ]
                full = torch.cat(parts).to(p0.dtype).view(infos[s].shape)
                del parts
                if n_done == len(todo):  # the last one: the received pieces are all in `full` now
                    received.clear()
                    del recv
                self._orthogonalise_into({s: full}, apply, self._ns_cap)
                del full
            if not todo:
                del recv
            del received
        for x in infos:
            if not x.muon and has_grad[x.index]:
                self._steps[x.index] += 1
        for x in mine:
            if not x.muon and has_grad[x.index]:
                self._adamw(x, local_param(x), gshard[self._local(x.index)])
        del pieces, whole, gshard  # the gradient shard is spent: the all-gather phase needs only the bucket

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
            del send_piece
            for i, po, bo, n in segments:
                if has_grad[i] and not (me * length <= bo < (me + 1) * length):
                    infos[i].param.detach().view(-1)[po : po + n].copy_(buf[bo : bo + n])
