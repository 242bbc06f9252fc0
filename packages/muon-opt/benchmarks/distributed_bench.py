"""Distributed Muon benchmark: step time, per-rank optimizer state and bytes sent per step, on gloo.

``run(profile, outdir)`` (called by ``benchmarks/run.py``) spawns one gloo world of 4 CPU processes and
measures, at W = 4 and on the sub-group of ranks {0, 1} (W = 2), every scheme on the same GPT-2-like set of
parameter shapes with fixed synthetic gradients:

- ``naive Muon``: DDP all-reduce of gradients, then every rank runs single-process ``muon_opt.Muon`` on every
  matrix (every rank orthogonalises everything; full state on every rank);
- ``ZeRO-1 AdamW (torch)``: DDP all-reduce + ``torch.distributed.optim.ZeroRedundancyOptimizer(AdamW)``
  (which broadcasts each rank's updated parameters);
- ``ZeRO-1 AdamW (flat)``: ``ZeroMuon`` with every parameter on AdamW, i.e. Megatron-style ZeRO-1 AdamW
  (reduce-scatter gradients + all-gather parameters), the baseline of Moonlight's 1x-1.25x claim;
- ``DDPMuon`` (+ DDP all-reduce), ``ZeroMuon`` (min-straddle and natural layouts, bf16 straddler gather as in
  the paper), ``FSDPMuon`` (parameters ``fully_shard``-ed; FSDP's own parameter all-gather and gradient
  reduce-scatter, ``2 (W-1)/W * 4N`` bytes, are added to its count, though they run outside the timed step).

Bytes are what one rank sends per step under the bandwidth-optimal cost model of
:mod:`muon_opt.distributed.comm` (the optimizers count their own collectives; the DDP all-reduce and
ZeroRedundancyOptimizer's broadcasts are counted here by the same model). Step times are the optimizer step
plus the gradient collective it needs, interleaved, median over repeats, measured on rank 0 between barriers.
A 2-core CPU running 4 processes is heavily oversubscribed: read the times as ratios within one W.

Given a deadline (the section's time budget), rank 0 times one warm-up round of every scheme and cuts the
repeats to what fits (W = 2 takes up to 40% of what is left, W = 4 up to 90% of the rest), at least one.
On Linux the workers are forked from a parent that has already imported torch, torch.distributed and
muon_opt (a spawned worker spends seconds importing them again, four at once on two cores); elsewhere
they are spawned. Either way each worker runs one thread, and the timed steps follow a warm-up round.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

try:
    import benchkit
except ImportError:  # run directly: tools/ is two levels up
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
    import benchkit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory

PROFILES = {
    # d_model, layers, vocab, repeats
    "quick": dict(d=64, layers=2, vocab=256, repeats=2),
    "default": dict(d=128, layers=4, vocab=512, repeats=5),
    "full": dict(d=768, layers=12, vocab=50304, repeats=10),
}
PROFILES["smoke"] = PROFILES["quick"]  # the quick profile's former name
# Fraction of the time left that each world size may take (W = 2 runs first, W = 4 on all 4 processes).
SHARE = {2: 0.4, 4: 0.9}


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)


class _GPTShapes(nn.Module):
    """GPT-2's parameter shapes (no forward needed: gradients are synthetic)."""

    def __init__(self, d: int, layers: int, vocab: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(256, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)


def _groups(model: nn.Module) -> list[dict[str, Any]]:
    named = list(model.named_parameters())
    muon = [p for n, p in named if p.ndim >= 2 and not n.startswith(("wte", "wpe"))]
    other = [p for n, p in named if not (p.ndim >= 2 and not n.startswith(("wte", "wpe")))]
    return [{"params": muon}, {"params": other, "use_muon": False}]


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    if hasattr(opt, "state_bytes"):
        return opt.state_bytes()
    inner = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer keeps the local optimizer in .optim
    total = 0
    for st in inner.state.values():
        for t in st.values():
            if torch.is_tensor(t) and t.ndim > 0:
                total += t.numel() * t.element_size()
    return total


def _worker(rank: int, world: int, port: int, cfg: dict[str, Any], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    pgs = {4: dist.group.WORLD, 2: dist.new_group([0, 1])}
    rows: list[dict[str, Any]] = []
    try:
        for W in (2, 4):
            if rank < W:
                rows += _measure(rank, W, pgs[W], cfg)
            dist.barrier()
    finally:
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
        dist.barrier()
        dist.destroy_process_group()


def _measure(rank: int, W: int, pg: Any, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from muon_opt import Muon
    from muon_opt.distributed import DDPMuon, FSDPMuon, ZeroMuon
    from muon_opt.distributed.comm import collective_bytes

    torch.manual_seed(0)

    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return _GPTShapes(cfg["d"], cfg["layers"], cfg["vocab"])

    n_params = sum(p.numel() for p in fresh().parameters())
    grads_seed = torch.Generator().manual_seed(1 + rank)
    grads = [torch.randn(p.shape, generator=grads_seed) * 1e-2 for p in fresh().parameters()]
    allreduce_bytes = collective_bytes("all_reduce", 4 * n_params, W)
    extra_broadcast = {"bytes": 0.0}

    def ddp_allreduce(model: nn.Module) -> None:
        # one bucket, as DDP does (its default 25 MiB bucket holds every gradient of these models)
        grads = [p.grad for p in model.parameters()]
        bucket = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(bucket, group=pg)
        bucket.div_(W)
        for g, flat in zip(grads, bucket.split([g.numel() for g in grads]), strict=True):
            g.copy_(flat.view_as(g))

    contenders: dict[str, dict[str, Any]] = {}

    def add(name: str, model: nn.Module, opt: Any, allreduce: bool, extra_bytes: int = 0) -> None:
        params = list(model.parameters())

        def prepare() -> None:
            for p, g in zip(params, grads, strict=True):
                if hasattr(p, "to_local"):  # FSDP: the gradient arrives as this rank's rows
                    from torch.distributed.tensor import distribute_tensor

                    p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
                else:
                    p.grad = g.clone()
            if allreduce:
                ddp_allreduce(model)

        def step() -> None:
            prepare()
            opt.step()

        contenders[name] = dict(step=step, prepare=prepare, opt=opt, allreduce=allreduce, extra=extra_bytes)

    kw = dict(lr=0.02, weight_decay=0.1, ns_dtype="float32")
    m = fresh()
    add("naive Muon (all-reduce + every rank NS)", m, Muon(_groups(m), **kw), True)
    m = fresh()
    add(
        "ZeRO-1 AdamW (torch ZeroRedundancyOptimizer)",
        m,
        ZeroRedundancyOptimizer(
            m.parameters(), optimizer_class=torch.optim.AdamW, process_group=pg, lr=0.02, weight_decay=0.1
        ),
        True,
    )
    m = fresh()
    add(
        "ZeRO-1 AdamW (flat, reduce-scatter + all-gather)",
        m,
        ZeroMuon([{"params": list(m.parameters()), "use_muon": False}], process_group=pg, **kw),
        False,
    )
    m = fresh()
    add("DDPMuon (+ DDP all-reduce)", m, DDPMuon(_groups(m), process_group=pg, **kw), True)
    m = fresh()
    add("ZeroMuon (min-straddle, bf16 gather)", m, ZeroMuon(_groups(m), process_group=pg, comm_dtype=torch.bfloat16, **kw), False)  # fmt: skip
    m = fresh()
    add("ZeroMuon (min-straddle, bf16, one comm bucket)", m, ZeroMuon(_groups(m), process_group=pg, comm_dtype=torch.bfloat16, comm_bucket_bytes=4 * n_params, **kw), False)  # fmt: skip
    m = fresh()
    add("ZeroMuon (natural layout, bf16 gather)", m, ZeroMuon(_groups(m), process_group=pg, layout="natural", comm_dtype=torch.bfloat16, **kw), False)  # fmt: skip
    m = fresh()
    fully_shard(m, mesh=DeviceMesh.from_group(pg, "cpu"))
    add("FSDPMuon (bf16 all-to-all)", m, FSDPMuon(_groups(m), comm_dtype=torch.bfloat16, **kw), False, 2 * collective_bytes("all_gather", 4 * n_params, W))  # fmt: skip

    # count ZeroRedundancyOptimizer's broadcasts with the same cost model
    real_broadcast = dist.broadcast

    def counting_broadcast(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        extra_broadcast["bytes"] += collective_bytes("broadcast", tensor.numel() * tensor.element_size(), W)
        return real_broadcast(tensor, *args, **kwargs)

    steps: dict[str, Callable[[], None]] = {k: v["step"] for k, v in contenders.items()}
    dist.barrier(pg)  # every rank has built its contenders (the first build imports, for seconds)
    # the warm-up round (outside the byte count, which is per call), timed to size the repeats
    t0 = time.perf_counter()
    for fn in steps.values():
        fn()
        dist.barrier(pg)
    round_s = time.perf_counter() - t0
    left = (cfg.get("deadline", math.inf) - time.time()) * SHARE[W]
    fit = cfg["repeats"] if math.isinf(left) else int(left / round_s)
    decision = torch.tensor([max(1, min(cfg["repeats"], fit))])
    dist.broadcast(decision, src=0, group=pg)  # every rank must make the same number of calls
    repeats = int(decision)
    if rank == 0:
        benchkit.progress(
            f"distributed W={W}: warm-up round {round_s:.1f} s, {repeats} of {cfg['repeats']} repeats"
        )

    dist.broadcast = counting_broadcast  # type: ignore[assignment]
    try:
        timings = benchkit.time_interleaved(steps, repeats=repeats, warmup=0, sync=lambda: dist.barrier(pg))
        calls = repeats
        zero_name = "ZeRO-1 AdamW (torch ZeroRedundancyOptimizer)"
        zero_broadcast = extra_broadcast["bytes"] / calls
    finally:
        dist.broadcast = real_broadcast  # type: ignore[assignment]

    # Peak transient bytes of the optimizer step alone (gradients set and, for the DDP schemes, averaged
    # beforehand), per rank: what the step allocates on top of parameters, gradients and state.
    peaks: dict[str, int] = {}
    for name, c in contenders.items():
        c["prepare"]()
        dist.barrier(pg)
        try:
            mine = memory.peak_transient_bytes(c["opt"].step)
        except Exception:  # a tensor subclass the counting mode cannot see into (DTensor): not measured
            c["opt"].step()
            mine = -1
        everyone = [None] * W
        dist.all_gather_object(everyone, mine, group=pg)
        peaks[name] = -1 if min(everyone) < 0 else max(everyone)  # type: ignore[type-var]
    largest = max(p.numel() * p.element_size() for p in fresh().parameters() if p.ndim == 2)

    single_muon_state = _state_bytes(contenders["naive Muon (all-reduce + every rank NS)"]["opt"])
    out = []
    for name, c in contenders.items():
        opt = c["opt"]
        sent = c["extra"] + (allreduce_bytes if c["allreduce"] else 0)
        if name == zero_name:
            sent += zero_broadcast
        if hasattr(opt, "comm"):
            sent += sum(opt.comm.last_step.values())
        states, sent_all = [None] * W, [None] * W
        dist.all_gather_object(states, _state_bytes(opt), group=pg)
        dist.all_gather_object(
            sent_all, sent, group=pg
        )  # ranks differ (straddlers, ownership): report the max
        t = timings[name]
        row = dict(
            W=W,
            scheme=name,
            step_ms=t.median * 1e3,
            spread=t.spread,
            bytes_per_step=max(sent_all),
            state_max=max(states),
            state_single=single_muon_state,
            n_params=n_params,
            repeats=repeats,
            peak_transient=peaks[name] if peaks[name] >= 0 else None,
            largest_matrix_bytes=largest,
        )
        if hasattr(opt, "layout"):
            row["straddling"] = opt.layout.report()["straddling_matrices"]
        out.append(row)
    return out


def _start_method() -> str:
    """``fork`` on Linux, with what the workers import loaded first; ``spawn`` elsewhere (fork is unsafe on macOS)."""
    if sys.platform != "linux" or "fork" not in mp.get_all_start_methods():
        return "spawn"
    for module in (
        "torch.distributed.fsdp",
        "torch.distributed.optim",
        "torch.distributed.tensor",
        "muon_opt.distributed",
    ):
        importlib.import_module(module)
    # the first optimizer built in a process imports torch._dynamo (torch.optim's add_param_group)
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    return "fork"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(profile: str, outdir: Path, clock: benchkit.SectionClock | None = None) -> list[benchkit.Section]:
    """The distributed section(s) for ``benchmarks/run.py``: ``profile`` is "quick", "default" or "full".

    With ``clock`` (the running section's), the workers cut their repeats to the section's budget.
    """
    registered = sys.modules.get("distributed_bench")
    if registered is None or getattr(registered, "run", None) is not run:
        # loaded by file path without registering (run.py does this): spawned workers are pickled by module
        # name, so hand over to a properly imported copy of this module
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import distributed_bench

        if distributed_bench.run is not run:
            return distributed_bench.run(profile, outdir, clock)
    cfg = dict(PROFILES.get(profile, PROFILES["default"]))
    log = clock.progress if clock is not None else benchkit.progress
    log(f"distributed Muon: spawning 4 gloo processes ({cfg})")
    if clock is not None:
        cfg["deadline"] = time.time() + clock.remaining()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rows.json"
        mp.start_processes(
            _worker, args=(4, _free_port(), cfg, str(path)), nprocs=4, join=True, start_method=_start_method()
        )
        rows = json.loads(path.read_text())
    flat = "ZeRO-1 AdamW (flat, reduce-scatter + all-gather)"
    torch_zero = "ZeRO-1 AdamW (torch ZeroRedundancyOptimizer)"
    table, notes = [], []
    for r in rows:
        base = next(x for x in rows if x["W"] == r["W"] and x["scheme"] == flat)
        tz = next(x for x in rows if x["W"] == r["W"] and x["scheme"] == torch_zero)
        table.append(
            [
                r["W"],
                r["scheme"],
                round(r["step_ms"], 1),
                round(r["spread"], 3),
                round(r["bytes_per_step"] / 2**20, 3),
                round(r["bytes_per_step"] / base["bytes_per_step"], 4),
                round(r["bytes_per_step"] / tz["bytes_per_step"], 4),
                round(r["state_max"] / 2**20, 3),
                round(r["state_max"] / r["state_single"], 3),
                r.get("straddling", ""),
                "n/a" if r["peak_transient"] is None else round(r["peak_transient"] / 2**20, 3),
                "n/a"
                if r["peak_transient"] is None
                else round(r["peak_transient"] / (4 * r["n_params"] / r["W"]), 3),
            ]
        )
    for W in (2, 4):
        done = next(x["repeats"] for x in rows if x["W"] == W)
        if done < cfg["repeats"]:
            notes.append(
                f"W={W}: {done} interleaved repeats instead of {cfg['repeats']}, to stay within the time budget."
            )
        z = next(x for x in rows if x["W"] == W and x["scheme"].startswith("ZeroMuon (min"))
        base = next(x for x in rows if x["W"] == W and x["scheme"] == flat)
        notes.append(
            f"W={W}: ZeRO-1 Muon sends {z['bytes_per_step'] / base['bytes_per_step']:.4f}x the bytes of ZeRO-1 AdamW "
            f"(paper: 1x-1.25x); its per-rank state is {z['state_max'] / z['state_single']:.3f}x single-process Muon's."
        )
        if z["peak_transient"] is not None:
            model_w = 4 * z["n_params"] / W
            notes.append(
                f"W={W}: ZeroMuon's step transient is {z['peak_transient'] / 2**20:.2f} MiB per rank (max) = "
                f"{z['peak_transient'] / model_w:.2f}x model/W, bound 1.2x model/W + largest matrix = "
                f"{(1.2 * model_w + z['largest_matrix_bytes']) / 2**20:.2f} MiB "
                f"({'within' if z['peak_transient'] <= 1.2 * model_w + z['largest_matrix_bytes'] else 'OVER'})."
            )
    plot = _plot(rows, outdir)
    section = benchkit.Section(
        title="Distributed Muon on gloo (2 and 4 processes)",
        description=__doc__.split("\n\n")[1] if __doc__ else "",
        columns=[
            "W",
            "scheme",
            "step ms (median)",
            "IQR/median",
            "MiB sent/step (max rank)",
            "x ZeRO-1 AdamW (flat)",
            "x ZeroRedundancyOptimizer",
            "max state MiB/rank",
            "x single-process Muon state",
            "straddling matrices",
            "step transient MiB/rank (max)",
            "transient x model/W",
        ],
        rows=table,
        plots=[plot] if plot else [],
        notes=[
            *notes,
            f"{rows[0]['n_params']} parameters (GPT-2 shapes, d={cfg['d']}, {cfg['layers']} layers); fp32 "
            "parameters and gradients; synthetic gradients; 4 processes on this machine's CPU cores.",
            "Bytes: bandwidth-optimal cost model (all-gather/reduce-scatter (W-1)/W, all-reduce 2(W-1)/W of the "
            "payload per rank; all-to-all exact). FSDPMuon includes FSDP's parameter all-gather and gradient "
            "reduce-scatter, which happen outside its timed step.",
            "Step transient: peak bytes the optimizer step allocates beyond parameters, gradients and state "
            "(benchmarks/memory.py; gradients set and, for the DDP schemes, all-reduced before), the max over "
            "ranks; n/a where the counting mode cannot see through DTensor.",
        ],
    )
    return [section]


def _plot(rows: list[dict[str, Any]], outdir: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, key, label in ((axes[0], "bytes_per_step", "MiB sent per step per rank"), (axes[1], "state_max", "MiB optimizer state per rank (max)")):  # fmt: skip
        for k, W in enumerate((2, 4)):
            vals = [next(r[key] for r in rows if r["W"] == W and r["scheme"] == s) / 2**20 for s in schemes]
            ax.barh([i + 0.4 * k for i in range(len(schemes))], vals, height=0.4, label=f"W={W}")
        ax.set_yticks([i + 0.2 for i in range(len(schemes))], schemes, fontsize=7)
        ax.set_xlabel(label)
        ax.legend()
    fig.tight_layout()
    name = "muon-opt-distributed.png"
    outdir.mkdir(parents=True, exist_ok=True)
    fig.savefig(outdir / name, dpi=110)
    plt.close(fig)
    return name


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="default", choices=sorted(PROFILES))
    ap.add_argument("--out", type=Path, default=Path("bench-results/muon-opt-distributed.json"))
    args = ap.parse_args()
    sections = run(args.profile, args.out.parent)
    benchkit.Result("muon-opt", "cpu", args.profile, benchkit.environment(["muon-opt"]), sections).write(
        args.out
    )
    for s in sections:
        for row in s.rows:
            print(row)
        print("\n".join(s.notes))
