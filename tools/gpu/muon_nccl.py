"""muon-opt over NCCL: ZeroMuon and DDPMuon on 2 GPUs give the parameters single-process Muon gives.

    PYTHONPATH=tools:tools/gpu python tools/gpu/muon_nccl.py --out bench-results/gpu/nccl-muon-opt.json

Two processes (one per GPU, ``torch.multiprocessing.spawn``) start an NCCL group, build the same small
MLP (seeded), and take three steps on gradients that differ by rank. ``ZeroMuon`` gets each rank's local
gradients (it reduce-scatters them itself); ``DDPMuon`` gets them averaged by ``all_reduce``, as
``DistributedDataParallel`` would. Every rank also runs single-process ``muon_opt.Muon`` on the mean
gradient, which it can compute without communication because every rank's gradients are seeded. The
check: the relative parameter-change error ``||(got - start) - (ref - start)|| / ||ref - start||`` is at
most 1e-4 for every parameter (fp32 all the way; reduction order is the only difference). Then the
median step time of each tier over a few steps, and the bytes each rank sent in the last step by the
optimizer's own accounting. ``--check`` runs the same code with gloo on 2 CPU processes.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from partresult import PartResult, parser
from torch import nn

WORLD = 2
STEPS = 3
TOLERANCE = 1e-4
SIZES = (256, 512, 512, 128)  # an MLP: three hidden matrices, their biases
TIMED_STEPS = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(SIZES):
        layers += [nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers[:-1]).to(device)


def _groups(model: nn.Module) -> list[dict[str, Any]]:
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.ndim == 2], "use_muon": True},
        {"params": [p for p in params if p.ndim != 2], "use_muon": False},
    ]


def _grads(model: nn.Module, rank: int, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(p.shape, generator=gen).to(p.device) for p in model.parameters()]


def _step(model: nn.Module, opt: Any, rank: int, step: int, averaged: bool) -> None:
    """One optimizer step on this rank's gradients; ``averaged``: first all-reduce them, as DDP would."""
    for p, g in zip(model.parameters(), _grads(model, rank, step), strict=True):
        p.grad = g
        if averaged:
            dist.all_reduce(p.grad)
            p.grad.div_(WORLD)
    opt.step()


def _worker(rank: int, backend: str, port: int, out: str) -> None:
    from muon_opt import DDPMuon, Muon, ZeroMuon

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group(
        backend, rank=rank, world_size=WORLD, device_id=device if backend == "nccl" else None
    )
    kwargs = dict(lr=0.02, weight_decay=0.1, ns_dtype="float32")
    report: dict[str, Any] = {"backend": backend, "tiers": {}}
    try:
        start = {n: p.detach().clone() for n, p in _model(device).named_parameters()}
        ref_model = _model(device)
        ref = Muon(_groups(ref_model), **kwargs)
        for step in range(STEPS):
            every = [_grads(ref_model, r, step) for r in range(WORLD)]
            for p, *gs in zip(ref_model.parameters(), *every, strict=True):
                p.grad = torch.stack(gs).mean(0)
            ref.step()
        want = {n: p.detach() for n, p in ref_model.named_parameters()}
        for tier, cls in (("ZeroMuon", ZeroMuon), ("DDPMuon", DDPMuon)):
            model = _model(device)
            opt = cls(_groups(model), **kwargs)

            for step in range(STEPS):
                _step(model, opt, rank, step, averaged=cls is DDPMuon)
            errors = {}
            for n, p in model.named_parameters():
                moved = (want[n] - start[n]).norm().item()
                errors[n] = (p.detach() - want[n]).norm().item() / max(moved, 1e-30)
            times = []
            for step in range(STEPS, STEPS + TIMED_STEPS):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                _step(model, opt, rank, step, averaged=cls is DDPMuon)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
            everyone: list[Any] = [None] * WORLD
            dist.all_gather_object(
                everyone, {"max_error": max(errors.values()), "ms": statistics.median(times) * 1e3}
            )
            report["tiers"][tier] = {
                "max_rel_error_per_rank": [e["max_error"] for e in everyone],
                "median_step_ms_per_rank": [round(e["ms"], 3) for e in everyone],
                "bytes_sent_last_step": opt.comm.bytes_per_step(),
            }
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(report))


def run(result: PartResult, backend: str, scratch: Path) -> None:
    port = _free_port()
    raw = scratch / f"muon-nccl-{os.getpid()}.json"
    mp.spawn(_worker, args=(backend, port, str(raw)), nprocs=WORLD, join=True)
    report = json.loads(raw.read_text())
    raw.unlink()
    table = result.section(
        f"muon-opt: distributed Muon over {backend} ({WORLD} processes)",
        f"MLP {SIZES}, {STEPS} steps on rank-dependent gradients vs single-process Muon on their mean; "
        f"pass: relative parameter-change error <= {TOLERANCE:g}; then the median of {TIMED_STEPS} steps",
        ["tier", "max relative error", "median step ms (per rank)", "bytes sent per step (rank 0)", "status"],
    )
    failed = []
    for tier, r in report["tiers"].items():
        worst = max(r["max_rel_error_per_rank"])
        status = "ok" if worst <= TOLERANCE else f"failed: error {worst:.2e} > {TOLERANCE:g}"
        if worst > TOLERANCE:
            failed.append(tier)
        table.rows.append(
            [tier, f"{worst:.2e}", r["median_step_ms_per_rank"], r["bytes_sent_last_step"], status]
        )
    result.write()
    if failed:
        raise SystemExit(f"muon-opt over {backend}: {failed} do not match single-process Muon")


def check() -> None:
    import tempfile

    result = PartResult("nccl-muon-opt (check)", None, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        run(result, "gloo", Path(tmp))
    print(f"muon_nccl check ok (gloo): {result.sections[0].rows}")


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    if args.check:
        check()
        return 0
    if torch.cuda.device_count() < WORLD:
        raise SystemExit(f"needs {WORLD} GPUs, this machine has {torch.cuda.device_count()}")
    result = PartResult("nccl-muon-opt", args.out, args.deadline)
    result.write()
    run(result, "nccl", args.out.parent)
    result.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
