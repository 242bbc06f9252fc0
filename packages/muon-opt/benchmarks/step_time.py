"""Optimizer step time, Newton-Schulz time vs shape, and optimizer-state bytes per parameter.

Every comparison runs its contenders interleaved (``benchkit.time_interleaved``) on identical parameters
and gradients, and reports medians, inter-quartile spread and ratios to ``muon_opt.Muon``. Each takes a
share of its section's time budget: one warm-up round measures what a round costs, and the repeats are
cut to what fits (the section's notes say so when they are).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import benchkit
import memory
import torch
from torch import Tensor, nn

import muon_opt


@dataclass
class StepSettings:
    d_model: int = 256  # GPT-2 small is 768 wide with 12 layers; scaled down for the CPU
    layers: int = 4
    vocab: int = 2048
    context: int = 256
    big_shape: tuple[int, int] = (256, 1024)  # "a few 256x1024 matrices": fp32 ours vs torch.optim.Muon
    big_count: int = 4
    small_shape: tuple[int, int] = (32, 32)  # many small matrices: batching vs a per-parameter loop
    small_count: int = 256
    ns_shapes: tuple[tuple[int, int], ...] = (
        (64, 64),
        (128, 128),
        (128, 512),
        (256, 256),
        (256, 1024),
        (512, 512),
    )
    ns_batch: int = 8
    repeats: int = 7
    # CPUs without bf16 arithmetic (no AVX512-BF16/AMX): oneDNN is capped at this ISA in a child process.
    no_bf16_isa: str = "AVX2"
    no_bf16_repeats: int = 3


def gpt_params(s: StepSettings, device: torch.device) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(matrices, others) with GPT-2's parameter shapes at width ``d_model``, gradients filled in."""
    d, gen = s.d_model, torch.Generator().manual_seed(0)

    def param(*shape: int) -> nn.Parameter:
        p = nn.Parameter(torch.randn(shape, generator=gen).to(device) * 0.02)
        p.grad = torch.randn(shape, generator=gen).to(device) * 1e-3
        return p

    matrices, others = [], [param(s.vocab, d), param(s.context, d)]  # wte (tied head), wpe
    for _ in range(s.layers):
        matrices += [param(3 * d, d), param(d, d), param(4 * d, d), param(d, 4 * d)]
        others += [param(d), param(d), param(3 * d), param(d), param(4 * d), param(d), param(d), param(d)]
    others += [param(d), param(d)]
    return matrices, others


def _matrix_params(shape: tuple[int, int], count: int, device: torch.device) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        p = nn.Parameter(torch.randn(shape, generator=gen).to(device) * 0.02)
        p.grad = torch.randn(shape, generator=gen).to(device)
        out.append(p)
    return out


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for st in opt.state.values()
        for v in st.values()
        if isinstance(v, Tensor)
    )


def _update_error(
    make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], params: list[nn.Parameter]
) -> float:
    """Relative error of one step's update against the float64 reference step (lr=1, wd=0, fresh state)."""
    work = [nn.Parameter(p.detach().clone()) for p in params]
    truth = [nn.Parameter(p.detach().double()) for p in params]
    for w, t, p in zip(work, truth, params, strict=True):
        w.grad, t.grad = p.grad.clone(), p.grad.double()
    make(work).step()
    muon_opt.Muon(truth, lr=1.0, weight_decay=0.0, foreach=False).step()
    num = sum(
        ((w.detach().double() - p.detach().double()) - (t.detach() - p.detach().double())).pow(2).sum()
        for w, t, p in zip(work, truth, params, strict=True)
    )
    den = sum((t.detach() - p.detach().double()).pow(2).sum() for t, p in zip(truth, params, strict=True))
    return math.sqrt(float(num) / float(den))


def _peak_step_mib(step: Callable[[], None], device: torch.device) -> float:
    """Extra memory one step allocates at its peak, beyond parameters, gradients and state (MiB;
    ``benchmarks/memory.py``: the CUDA allocator's peak, on CPU a count of new storages)."""
    return memory.peak_transient_bytes(step, device) / 2**20


def time_within(
    contenders: dict[str, Callable[[], object]],
    repeats: int,
    seconds: float,
    sync: Callable[[], None] | None = None,
) -> tuple[dict[str, benchkit.Timing], int, float]:
    """What ``benchkit.time_interleaved(contenders, repeats, warmup=1)`` measures, stopped at ``seconds``.

    One untimed warm-up round (first calls, lazy initialisation), then timed interleaved rounds while the
    next one, estimated by the median round so far, fits in ``seconds`` (counted from the start, warm-up
    included); at least one timed round. Medians and quartiles as in ``benchkit``. Returns the timings,
    the rounds timed and the median round's seconds.
    """
    sync = sync or (lambda: None)
    start = time.perf_counter()
    for fn in contenders.values():
        fn()
        sync()
    runs: dict[str, list[float]] = {name: [] for name in contenders}
    rounds: list[float] = []
    while len(rounds) < repeats:
        for name, fn in contenders.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            runs[name].append(time.perf_counter() - t0)
        rounds.append(sum(xs[-1] for xs in runs.values()))
        if time.perf_counter() - start + statistics.median(rounds) > seconds:
            break
    return {name: benchkit.summarise(xs) for name, xs in runs.items()}, len(rounds), statistics.median(rounds)


def _cut_note(n: int, wanted: int, what: str) -> list[str]:
    if n >= wanted:
        return []
    return [f"{what}: {n} interleaved repeats instead of {wanted}, to stay within the section's time budget."]


def _rows(timings: dict[str, benchkit.Timing], base: str) -> list[list]:
    return [
        [name, round(1e3 * t.median, 2), f"{100 * t.spread:.0f}%", round(t.median / timings[base].median, 2)]
        for name, t in timings.items()
    ]


# The fp32-parameter comparison (done-when): name -> optimizer factory; lr 1 and no decay so the update shows.
BIG_CONTENDERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "muon_opt.Muon (fp32 NS)": lambda ps: muon_opt.Muon(ps, lr=1.0, weight_decay=0.0),
    "muon_opt.Muon (ns_dtype=bf16)": lambda ps: muon_opt.Muon(ps, lr=1.0, weight_decay=0.0, ns_dtype="bf16"),
    "torch.optim.Muon (bf16 NS)": lambda ps: torch.optim.Muon(
        ps, lr=1.0, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"
    ),
    "plain per-parameter fp32 reference loop": lambda ps: muon_opt.Muon(
        ps, lr=1.0, weight_decay=0.0, foreach=False
    ),
}


def step_time_sections(
    s: StepSettings, device: torch.device, clock: benchkit.SectionClock
) -> tuple[list[benchkit.Section], dict]:
    """Three comparisons; they take about 60%, 60% and 90% of what is left of the section's budget in turn."""
    sync, extra = _sync(device), {}
    sections = []

    # 1. GPT-2-small-like parameter set: the whole optimizer step.
    clock.progress("building the optimizers (the first one built imports torch._dynamo: seconds)")
    matrices, others = gpt_params(s, device)
    every = matrices + others
    ours = muon_opt.Muon(
        [{"params": matrices, "use_muon": True}, {"params": others, "use_muon": False}], lr=1e-3
    )
    ref = muon_opt.Muon(
        [{"params": matrices, "use_muon": True}, {"params": others, "use_muon": False}],
        lr=1e-3,
        foreach=False,
    )
    torch_muon = torch.optim.Muon(matrices, lr=1e-3, adjust_lr_fn="match_rms_adamw")
    torch_muon_adamw = torch.optim.AdamW(others, lr=1e-3, foreach=True)
    adamw = torch.optim.AdamW(every, lr=1e-3, weight_decay=0.1, foreach=True)

    def torch_pair() -> None:
        torch_muon.step()
        torch_muon_adamw.step()

    clock.progress(f"step time: GPT-2-like set, d={s.d_model}, {s.layers} layers")
    t, n, _ = time_within(
        {
            "muon_opt.Muon": ours.step,
            "torch.optim.Muon + AdamW": torch_pair,
            "torch.optim.AdamW (foreach)": adamw.step,
            "muon_opt.Muon reference loop (foreach=False)": ref.step,
        },
        repeats=s.repeats,
        seconds=0.6 * clock.remaining(),
        sync=sync,
    )
    n_params = sum(p.numel() for p in every)
    state = {
        "muon_opt.Muon": _state_bytes(ours) / n_params,
        "torch.optim.Muon + AdamW": (_state_bytes(torch_muon) + _state_bytes(torch_muon_adamw)) / n_params,
        "torch.optim.AdamW (foreach)": _state_bytes(adamw) / n_params,
        "muon_opt.Muon reference loop (foreach=False)": _state_bytes(ref) / n_params,
    }
    steps = {
        "muon_opt.Muon": ours.step,
        "torch.optim.Muon + AdamW": torch_pair,
        "torch.optim.AdamW (foreach)": adamw.step,
        "muon_opt.Muon reference loop (foreach=False)": ref.step,
    }
    peak = {name: _peak_step_mib(fn, device) for name, fn in steps.items()}
    matrix_mib = sum(p.numel() * p.element_size() for p in matrices) / 2**20
    rows = [
        [*r, round(state[r[0]], 2), round(peak[r[0]], 2), round(peak[r[0]] / matrix_mib, 2)]
        for r in _rows(t, "muon_opt.Muon")
    ]
    extra["gpt_step"] = {k: v.median for k, v in t.items()}
    extra["gpt_peak_x_matrix_bytes"] = {k: v / matrix_mib for k, v in peak.items()}
    sections.append(
        benchkit.Section(
            title="Optimizer step time and state: GPT-2-small-like parameter shapes (scaled down)",
            description=(
                f"{s.layers} layers, d_model {s.d_model}, vocab {s.vocab}, {n_params:,} fp32 parameters; Muon on "
                f"the {len(matrices)} block matrices, AdamW on embeddings, norms and biases. One optimizer "
                "step, interleaved runs; ratio = median / muon_opt.Muon's median. State = optimizer-state "
                "bytes per parameter after the step; step peak = the most memory a step allocates beyond "
                "parameters, gradients and state (benchmarks/memory.py), also as a multiple of the Muon "
                f"matrices' bytes ({matrix_mib:.1f} MiB). Target for muon_opt.Muon: at most 1.0x."
            ),
            columns=[
                "contender",
                "median ms",
                "IQR",
                "ratio vs ours",
                "state bytes/param",
                "step peak MiB",
                "step peak x matrix bytes",
            ],
            rows=rows,
            notes=[
                "torch.optim.Muon runs Newton-Schulz in bf16 whatever the parameter dtype; muon_opt's "
                "ns_dtype='auto' uses fp32 on CPU. On a CPU with AVX512-BF16 the bf16 matmuls are fast.",
                *_cut_note(n, s.repeats, "GPT-2-like set"),
            ],
        )
    )

    # 2. A few 256x1024 fp32 matrices: muon_opt (fp32 and bf16 Newton-Schulz) vs torch.optim.Muon.
    big = _matrix_params(s.big_shape, s.big_count, device)
    clock.progress(f"step time: {s.big_count} x {s.big_shape} fp32")
    opts = {name: make(big) for name, make in BIG_CONTENDERS.items()}
    t, n, _ = time_within(
        {k: o.step for k, o in opts.items()}, repeats=s.repeats, seconds=0.6 * clock.remaining(), sync=sync
    )
    errs = {name: _update_error(make, big[:1]) for name, make in BIG_CONTENDERS.items()}
    rows = [[*r, f"{errs[r[0]]:.1e}"] for r in _rows(t, "muon_opt.Muon (fp32 NS)")]
    extra["big_step"] = {k: v.median for k, v in t.items()}
    sections.append(
        benchkit.Section(
            title=f"Muon step on {s.big_count} fp32 matrices of {s.big_shape[0]}x{s.big_shape[1]}",
            description=(
                "The done-when comparison: our Muon vs torch.optim.Muon on fp32 parameters. Update error = "
                "relative Frobenius error of one step's update against the float64 reference step."
            ),
            columns=["contender", "median ms", "IQR", "ratio vs ours", "update rel. error vs fp64"],
            rows=rows,
            notes=_cut_note(n, s.repeats, "fp32 matrices"),
        )
    )

    # 3. Many small matrices: the batched fast path vs the plain per-parameter fp32 loop.
    small = _matrix_params(s.small_shape, s.small_count, device)
    opts = {
        "muon_opt.Muon (batched)": muon_opt.Muon(small, lr=1e-3),
        "plain per-parameter fp32 reference loop": muon_opt.Muon(small, lr=1e-3, foreach=False),
        "torch.optim.Muon (bf16 NS, per parameter)": torch.optim.Muon(
            small, lr=1e-3, adjust_lr_fn="match_rms_adamw"
        ),
        "torch.optim.AdamW (foreach)": torch.optim.AdamW(small, lr=1e-3, weight_decay=0.1, foreach=True),
    }
    clock.progress(f"step time: {s.small_count} x {s.small_shape}")
    t, n, _ = time_within(
        {k: o.step for k, o in opts.items()}, repeats=s.repeats, seconds=0.9 * clock.remaining(), sync=sync
    )
    extra["small_step"] = {k: v.median for k, v in t.items()}
    sections.append(
        benchkit.Section(
            title=f"Many small matrices: {s.small_count} x {s.small_shape[0]}x{s.small_shape[1]} fp32",
            description=(
                "Same-shape matrices are stacked and orthogonalised in one batched call and the "
                "per-parameter work (momentum, Nesterov, decay, update) runs as torch._foreach_* over each "
                "chunk; the reference orthogonalises them one at a time. AdamW (foreach) is the floor for "
                "the per-parameter work: Muon adds Newton-Schulz on top of it."
            ),
            columns=["contender", "median ms", "IQR", "ratio vs ours"],
            rows=_rows(t, "muon_opt.Muon (batched)"),
            notes=_cut_note(n, s.repeats, "small matrices"),
        )
    )
    return sections, extra


def _ns_flops(shape: tuple[int, int]) -> float:
    """Multiply-adds x 2 of one quintic Newton-Schulz step on an ``m x n`` matrix (m <= n after transposing)."""
    m, n = sorted(shape)
    return 4 * m * m * n + 2 * m**3


def ns_time_section(
    s: StepSettings, device: torch.device, outdir: Path, prefix: str, clock: benchkit.SectionClock
) -> benchkit.Section:
    """Newton-Schulz (5 steps) time vs matrix shape: batched fast path in fp32 and bf16 vs the reference.

    Shapes run smallest first; a shape whose cost (the last shape's round time scaled by FLOPs, warm-up
    plus one repeat) would pass the section's budget is skipped with the rest, and the notes say so.
    """
    sync = _sync(device)
    rows, series = [], {"batched fp32": [], "batched bf16": [], "reference loop fp32": []}
    shapes = sorted(s.ns_shapes, key=_ns_flops)
    wanted, notes, done, last = max(3, s.repeats - 2), [], [], None
    for i, shape in enumerate(shapes):
        if last is not None:
            # a warm-up round and one timed round, scaled by FLOPs from the last shape's timed round
            est = 2 * last[1] * _ns_flops(shape) / _ns_flops(last[0])
            if clock.over(next_cost=est):
                clock.stop(
                    f"NS5 on {shape} (~{est:.0f} s) would pass the budget; {len(done)} of {len(shapes)} shapes done"
                )
                notes.append(
                    f"Stopped at the section's budget: shapes {', '.join(f'{a}x{b}' for a, b in shapes[i:])} not run."
                )
                break
        G = torch.randn((s.ns_batch, *shape), generator=torch.Generator().manual_seed(2)).to(device)
        Gb = G.bfloat16()
        clock.progress(f"NS5 time: {s.ns_batch} x {shape}")
        t, n, round_s = time_within(
            {
                "batched fp32": lambda G=G: muon_opt.newton_schulz(G),
                "batched bf16": lambda Gb=Gb: muon_opt.newton_schulz(Gb),
                "reference loop fp32": lambda G=G: muon_opt.newton_schulz_reference(G),
            },
            repeats=wanted,
            # this shape's FLOP share of what is left, but at least a quarter of an equal share: small
            # shapes cost Python overhead more than FLOPs
            seconds=clock.remaining()
            * max(_ns_flops(shape) / sum(map(_ns_flops, shapes[i:])), 0.25 / (len(shapes) - i)),
            sync=sync,
        )
        notes += _cut_note(n, wanted, f"{shape[0]}x{shape[1]}")
        done.append(shape)
        last = (shape, round_s)
        for name, timing in t.items():
            series[name].append(1e3 * timing.median / s.ns_batch)
        rows.append(
            [f"{shape[0]}x{shape[1]}"]
            + [round(1e3 * t[n].median / s.ns_batch, 3) for n in series]
            + [round(t["reference loop fp32"].median / t["batched fp32"].median, 2)]
        )
    plots = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        x = [a * b for a, b in done]
        for name, ys in series.items():
            ax.plot(x, ys, marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("matrix elements (rows x cols)")
        ax.set_ylabel("ms per matrix")
        ax.set_title(f"Newton-Schulz, 5 steps, batch of {s.ns_batch} ({device.type})")
        ax.legend()
        fig.tight_layout()
        name = f"{prefix}-ns-time.png"
        fig.savefig(outdir / name, dpi=120)
        plt.close(fig)
        plots.append(name)
    except ImportError:
        pass
    return benchkit.Section(
        title="Newton-Schulz (5 steps) time vs matrix shape",
        description=f"Milliseconds per matrix, batches of {s.ns_batch} same-shape matrices, interleaved runs.",
        columns=[
            "shape",
            "batched fp32 ms",
            "batched bf16 ms",
            "reference loop fp32 ms",
            "reference / batched",
        ],
        rows=rows,
        plots=plots,
        notes=notes,
    )


def _gemm_gflops(dtype: torch.dtype, n: int = 512, reps: int = 3) -> float:
    """Measured n x n x n GEMM throughput in this process (GFLOP/s), to show which arithmetic the CPU has."""
    a = torch.randn(n, n).to(dtype)
    a @ a
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ a
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def _no_bf16_child(s: StepSettings, deadline: float) -> dict:
    """Runs inside the ISA-capped child: fp32 parameters, ours vs torch.optim.Muon vs the reference loop.

    ``deadline`` is a ``time.time()`` by which the child should be done (the section's budget).
    """
    big = _matrix_params(s.big_shape, s.big_count, torch.device("cpu"))
    # ns_dtype=bf16 is left out: without bf16 hardware it is as slow as torch's bf16 step and not a choice
    opts = {n: make(big) for n, make in BIG_CONTENDERS.items() if n != "muon_opt.Muon (ns_dtype=bf16)"}
    # about 1 s on the slowest CPU seen (bf16 GEMM at 2 GFLOP/s) is kept for the GEMM throughputs below
    t, n, _ = time_within(
        {k: o.step for k, o in opts.items()}, repeats=s.no_bf16_repeats, seconds=deadline - time.time() - 1.0
    )
    return {
        "timings": {k: {"median": v.median, "q25": v.q25, "q75": v.q75} for k, v in t.items()},
        "repeats": n,
        "gflops": {"fp32": _gemm_gflops(torch.float32), "bf16": _gemm_gflops(torch.bfloat16)},
    }


def no_bf16_section(s: StepSettings, clock: benchkit.SectionClock) -> tuple[benchkit.Section, dict]:
    """The done-when comparison on a CPU without bf16 arithmetic, emulated by capping oneDNN's ISA.

    ``torch.optim.Muon`` always runs Newton-Schulz in bf16. Where the CPU has AVX512-BF16 or AMX (this
    benchmark's own machine, for example) that is fast; where it has not, oneDNN falls back to a slow
    reference bf16 GEMM and a step takes seconds to minutes. ``ONEDNN_MAX_CPU_ISA`` must be set before
    torch loads, so the measurement runs in a child process; the GEMM throughputs it reports show which
    arithmetic that process had. The child gets the section's deadline and cuts its repeats to fit (one
    warm-up round and one timed round at least: torch's step there is seconds, and cannot be cut).
    """
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": s.no_bf16_isa}
    deadline = time.time() + clock.remaining() - 0.5  # the parent's own GEMM throughputs below
    args = json.dumps({"settings": asdict(s), "deadline": deadline})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--no-bf16-child", args]
    clock.progress(f"step time without bf16 arithmetic (ONEDNN_MAX_CPU_ISA={s.no_bf16_isa}, child process)")
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    child = json.loads(out.strip().splitlines()[-1])
    native = {"fp32": _gemm_gflops(torch.float32), "bf16": _gemm_gflops(torch.bfloat16)}
    timings = {name: benchkit.Timing(**v) for name, v in child["timings"].items()}
    torch_ratio = timings["torch.optim.Muon (bf16 NS)"].median / timings["muon_opt.Muon (fp32 NS)"].median
    section = benchkit.Section(
        title=(
            f"Muon step on {s.big_count} fp32 matrices of {s.big_shape[0]}x{s.big_shape[1]}, "
            f"CPU without bf16 arithmetic (oneDNN capped at {s.no_bf16_isa})"
        ),
        description=(
            "The done-when comparison where the CPU lacks AVX512-BF16/AMX (the issue's measurement): "
            f"ONEDNN_MAX_CPU_ISA={s.no_bf16_isa} in a child process. 512^3 GEMM throughput there: fp32 "
            f"{child['gflops']['fp32']:.0f} GFLOP/s, bf16 {child['gflops']['bf16']:.1f} GFLOP/s (native ISA in "
            f"the parent: fp32 {native['fp32']:.0f}, bf16 {native['bf16']:.0f} GFLOP/s)."
        ),
        columns=["contender", "median ms", "IQR", "ratio vs ours"],
        rows=_rows(timings, "muon_opt.Muon (fp32 NS)"),
        notes=[
            f"torch.optim.Muon takes {torch_ratio:.0f}x our fp32 step here (done-when: at least 20x). On this "
            "machine's native ISA, with bf16 GEMMs in hardware, it is faster than our fp32 step (previous "
            "sections); muon_opt.Muon(ns_dtype='bf16') opts into the same trade.",
            *_cut_note(child["repeats"], s.no_bf16_repeats, "child process"),
        ],
    )
    return section, {"child": child, "native_gflops": native, "torch_over_ours": torch_ratio}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--no-bf16-child":
        given = json.loads(sys.argv[2])
        fields = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
                  for k, v in given["settings"].items()}  # fmt: skip
        print(json.dumps(_no_bf16_child(StepSettings(**fields), given["deadline"])))
    else:
        raise SystemExit("step_time.py is a module of benchmarks/run.py; run that instead")
