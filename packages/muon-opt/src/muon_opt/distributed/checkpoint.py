"""World-size independent optimizer state for the distributed tiers, as DTensors.

Each tier holds its state in its own pieces of the flattened parameters: whole matrices by owner
(``DDPMuon``), ranges of the ZeRO-1 flat buffer (``ZeroMuon``), dim-0 rows (``FSDPMuon``). A checkpoint
must not depend on that, so :func:`state_dict` returns every state tensor in one canonical layout, the
one FSDP2 uses for parameters: a DTensor of the parameter's shape sharded on dim 0 with ``torch.chunk``
semantics (``Shard(0)``; a 0-dim tensor is ``Replicate()``). Moving between a tier's pieces and the
canonical rows is one ``all_to_all_single`` for all parameters at once. The dict has the layout
``torch.optim.Optimizer.state_dict`` has (``{"state": {param index: {...}}, "param_groups": [{...,
"params": [indices]}]}``), so ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` /
``set_optimizer_state_dict`` can rename the indices to parameter names and back, and
``torch.distributed.checkpoint`` (DCP) reshards the DTensors to any world size when it loads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from muon_opt.distributed.base import _DistributedMuon, _Param

__all__ = ["canonical_range", "load_checkpoint", "load_state_dict", "save_checkpoint", "state_dict"]

Range = tuple[int, int]  # (start, length) in a parameter's flattened elements

#: Group entries saved in a checkpoint (hyper-parameters; the parameters themselves are in the model).
HYPER_KEYS = (
    "lr",
    "weight_decay",
    "momentum",
    "nesterov",
    "ns_steps",
    "eps",
    "adjust_lr",
    "adamw_betas",
    "adamw_eps",
    "adamw_lr_ratio",
    "adamw_weight_decay",
)


def canonical_range(shape: tuple[int, ...], rank: int, world_size: int) -> Range | None:
    """The flattened range that ``rank`` holds of a tensor of ``shape`` sharded ``Shard(0)`` (torch.chunk:
    ``ceil(rows / W)`` rows per rank, the last ranks fewer or none); every rank holds a 0-dim tensor."""
    numel = 1
    for n in shape:
        numel *= n
    if not shape:
        return (0, numel)
    rows = shape[0]
    per = -(-rows // world_size) if rows else 0
    lo, hi = min(rank * per, rows), min((rank + 1) * per, rows)
    cols = numel // rows if rows else 0
    return (lo * cols, (hi - lo) * cols) if hi > lo and cols else None


def _keys(info: _Param) -> tuple[str, ...]:
    return ("momentum_buffer",) if info.muon else ("exp_avg", "exp_avg_sq")


def _overlap(a: Range | None, b: Range | None) -> Range | None:
    if a is None or b is None:
        return None
    lo, hi = max(a[0], b[0]), min(a[0] + a[1], b[0] + b[1])
    return (lo, hi) if hi > lo else None


def _move(
    opt: _DistributedMuon,
    infos: Iterable[_Param],
    src: Callable[[_Param, int], Range | None],
    dst: Callable[[_Param, int], Range | None],
    pieces: dict[int, list[Tensor]],
    out: dict[int, list[Tensor]],
) -> None:
    """Copy flattened state from the ``src`` layout (``pieces[i][k]``: this rank's range of key ``k``) into
    the ``dst`` layout (``out[i][k]``), in one ``all_to_all_single``. Every rank iterates the same
    parameters and keys in the same order, so the receivers know where each run goes without metadata."""
    W, me = opt.world_size, opt.rank
    send: list[list[Tensor]] = [[] for _ in range(W)]
    slots: list[list[Tensor]] = [[] for _ in range(W)]
    for x in infos:
        s_me, d_me = src(x, me), dst(x, me)
        for k in range(len(_keys(x))):
            for peer in range(W):
                iv = _overlap(s_me, dst(x, peer))
                if iv is not None:
                    send[peer].append(pieces[x.index][k][iv[0] - s_me[0] : iv[1] - s_me[0]])  # type: ignore[index]
                iv = _overlap(src(x, peer), d_me)
                if iv is not None:
                    slots[peer].append(out[x.index][k][iv[0] - d_me[0] : iv[1] - d_me[0]])  # type: ignore[index]
    if W == 1:
        for a, b in zip(send[0], slots[0], strict=True):
            b.copy_(a)
        return
    ref = next((t for ts in send + slots for t in ts), None)
    if ref is None:
        ref = torch.zeros(0)
    send_sizes = [sum(t.numel() for t in ts) for ts in send]
    recv_sizes = [sum(t.numel() for t in ts) for ts in slots]
    flat_send = torch.cat([t.reshape(-1) for ts in send for t in ts]) if sum(send_sizes) else ref.new_zeros(0)
    flat_recv = flat_send.new_empty(sum(recv_sizes))
    dist.all_to_all_single(flat_recv, flat_send, recv_sizes, send_sizes, group=opt.process_group)
    pos = 0
    for ts in slots:
        for t in ts:
            t.copy_(flat_recv[pos : pos + t.numel()].view_as(t))
            pos += t.numel()


def _mesh(opt: _DistributedMuon, device: torch.device) -> Any:
    from torch.distributed.device_mesh import DeviceMesh

    group = opt.process_group if opt.process_group is not None else dist.group.WORLD
    return DeviceMesh.from_group(group, device.type)


def _device(opt: _DistributedMuon) -> torch.device:
    p = opt._infos[0].param if opt._infos else torch.zeros(0)
    return p.to_local().device if hasattr(p, "to_local") else p.device


def state_dict(opt: _DistributedMuon) -> dict[str, Any]:
    """The canonical, DTensor state (see the module docstring). A collective: every rank must call it."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    W, me = opt.world_size, opt.rank
    device = _device(opt)
    dtype = next((t.dtype for st in opt.state.values() for t in st.values() if torch.is_tensor(t)), None)
    dtype = dtype or (opt._infos[0].param.dtype if opt._infos else torch.float32)
    pieces = {
        x.index: [opt.state[x.param][k].reshape(-1) for k in _keys(x)]
        for x in opt._infos
        if opt._held(x, me) is not None
    }
    out: dict[int, list[Tensor]] = {}
    for x in opt._infos:
        c = canonical_range(x.shape, me, W)
        out[x.index] = [torch.empty(c[1] if c else 0, dtype=dtype, device=device) for _ in _keys(x)]
    _move(
        opt,
        opt._infos,
        lambda x, r: opt._held(x, r),
        lambda x, r: canonical_range(x.shape, r, W),
        pieces,
        out,
    )
    mesh = _mesh(opt, device)
    state: dict[int, dict[str, Any]] = {}
    for x in opt._infos:
        entry: dict[str, Any] = {}
        stride = torch.empty(x.shape, device="meta").stride()
        for k, flat in zip(_keys(x), out[x.index], strict=True):
            if not x.shape:
                entry[k] = DTensor.from_local(flat.reshape(()), mesh, [Replicate()], run_check=False)
            else:
                rows = flat.numel() // (x.numel // x.shape[0]) if flat.numel() else 0
                local = flat.view(rows, *x.shape[1:])
                entry[k] = DTensor.from_local(
                    local, mesh, [Shard(0)], run_check=False, shape=torch.Size(x.shape), stride=stride
                )
        if not x.muon:
            entry["step"] = torch.tensor(float(opt._steps[x.index]), dtype=torch.float32)
        state[x.index] = entry
    groups = []
    for g in opt.param_groups:
        saved = {k: g[k] for k in HYPER_KEYS}
        saved["params"] = [x.index for x in opt._infos if x.group is g]
        groups.append(saved)
    return {"state": state, "param_groups": groups}


def load_state_dict(opt: _DistributedMuon, sd: dict[str, Any]) -> None:
    """Load a dict in :func:`state_dict`'s layout: DTensors in the canonical layout of this world (what
    DCP fills into the template ``state_dict()`` returns, or what ``set_optimizer_state_dict`` passes),
    DTensors of another layout (redistributed), or plain full tensors (this rank takes its piece). State
    may be keyed by parameter index or, as ``set_optimizer_state_dict`` passes it, by the names listed in
    ``param_groups[*]["params"]`` in the optimizer's order."""
    from torch.distributed.tensor import DTensor, Shard

    name = type(opt).__name__
    groups = sd["param_groups"]
    groups = [groups[str(n)] for n in range(len(groups))] if isinstance(groups, dict) else list(groups)
    if len(groups) != len(opt.param_groups):
        raise ValueError(
            f"{name}.load_state_dict: the checkpoint has {len(groups)} param groups, the optimizer "
            f"{len(opt.param_groups)}; build the optimizer with the same groups"
        )
    keys: list[Any] = []
    for n, (g, saved) in enumerate(zip(opt.param_groups, groups, strict=True)):
        mine = [x for x in opt._infos if x.group is g]
        listed = saved.get("params")
        if listed is not None and len(listed) != len(mine):
            raise ValueError(
                f"{name}.load_state_dict: param group {n} has {len(listed)} parameters in the checkpoint and "
                f"{len(mine)} in the optimizer"
            )
        keys += list(listed) if listed is not None else [x.index for x in mine]
        for k in HYPER_KEYS:
            if k in saved:
                value = saved[k]
                if k == "adamw_betas":
                    value = tuple(float(b) for b in value)
                if torch.is_tensor(g[k]) and torch.is_tensor(value):
                    g[k].copy_(value)
                else:
                    g[k] = value
        # a file written before AdamW's lr became a ratio of lr: its adamw_lr was absolute
        if "adamw_lr_ratio" not in saved and saved.get("adamw_lr") is not None:
            base = float(saved.get("initial_lr", saved["lr"]))
            g["adamw_lr_ratio"] = saved["adamw_lr"] / base if base > 0 else g["adamw_lr_ratio"]
    state = sd["state"]
    W, me = opt.world_size, opt.rank
    device = _device(opt)
    entries = {}
    for x in opt._infos:
        key = keys[x.index]
        entry = state.get(key, state.get(str(key)))
        if entry is None:
            raise ValueError(f"{name}.load_state_dict: no state for parameter {x.index} ({key!r})")
        entries[x.index] = entry
        if not x.muon:
            opt._steps[x.index] = int(float(entry["step"]))

    canonical, plain = [], []
    for x in opt._infos:
        values = [entries[x.index][k] for k in _keys(x)]
        if all(isinstance(v, DTensor) for v in values):
            canonical.append(x)
        elif any(isinstance(v, DTensor) for v in values):
            raise ValueError(f"{name}.load_state_dict: parameter {x.index} mixes DTensor and plain state")
        else:
            plain.append(x)
    pieces: dict[int, list[Tensor]] = {}
    for x in canonical:
        ps = []
        for k in _keys(x):
            v = entries[x.index][k]
            want = canonical_range(x.shape, me, W)
            if not x.shape or (tuple(v.placements) == (Shard(0),) and v.device_mesh.size() == W):
                local = v.to_local().reshape(-1)
            else:  # another layout (a user's own DTensor): gather it whole, keep the canonical rows
                full = v.full_tensor().reshape(-1)
                local = full[want[0] : want[0] + want[1]] if want else full[:0]
            if local.numel() != (want[1] if want else 0):
                raise ValueError(
                    f"{name}.load_state_dict: parameter {x.index} {k!r}: this rank's piece has {local.numel()} "
                    f"elements where Shard(0) of shape {x.shape} over {W} ranks gives {want[1] if want else 0}"
                )
            ps.append(local.to(device))
        pieces[x.index] = ps
    out = {
        x.index: [opt.state[x.param][k].view(-1) for k in _keys(x)]
        for x in canonical
        if opt._held(x, me) is not None
    }
    _move(
        opt, canonical, lambda x, r: canonical_range(x.shape, r, W), lambda x, r: opt._held(x, r), pieces, out
    )
    for x in plain:
        held = opt._held(x, me)
        if held is None:
            continue
        for k in _keys(x):
            src = entries[x.index][k]
            if tuple(src.shape) != x.shape:
                raise ValueError(
                    f"{name}.load_state_dict: parameter {x.index} {k!r} has shape {tuple(src.shape)}, the "
                    f"parameter {x.shape}"
                )
            opt.state[x.param][k].view(-1).copy_(src.reshape(-1)[held[0] : held[0] + held[1]])


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
