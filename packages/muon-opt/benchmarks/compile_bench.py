"""``torch.compile(opt.step)`` under an LR schedule: how many graphs it compiles, and compiled vs eager time.

A Python-float learning rate is a constant to dynamo: every new value a scheduler writes is a guard
failure and a recompile, until the recompile limit makes it fall back to eager. With a one-element tensor
lr (``Muon(lr=torch.tensor(...))``) and the tensor AdamW step count, the graphs are compiled on the first
call and reused for every later lr. The graph count uses a counting backend that runs the captured graphs
eagerly (cheap: tracing only); the timing compiles with the default backend (inductor), when the
section's budget leaves room for it (its first call, the compile, is timed and reported on its own).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import benchkit
import torch
from torch import nn
from torch.optim import lr_scheduler

import muon_opt

#: seconds a cold inductor compile of the default profile's step took here (23 s, 2-core CPU, 1 thread): the
#: timing part is skipped when less than twice this is left of the section's budget
INDUCTOR_COMPILE_S = 25.0


class _CountingBackend:
    """Counts the graphs dynamo hands it; runs them as captured (no code generation)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
        self.graphs += 1
        return gm.forward


def _model(d: int, layers: int, device: torch.device) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    gen = torch.Generator().manual_seed(0)

    def p(*shape: int) -> nn.Parameter:
        return nn.Parameter((torch.randn(*shape, generator=gen) * 0.02).to(device))

    matrices = [p(r, c) for _ in range(layers) for r, c in ((3 * d, d), (d, d), (4 * d, d), (d, 4 * d))]
    others = [p(d) for _ in range(2 * layers)]
    return matrices, others


def _optimizer(
    matrices: list[nn.Parameter], others: list[nn.Parameter], lr: float | torch.Tensor
) -> muon_opt.Muon:
    return muon_opt.Muon(
        [{"params": matrices}, {"params": others, "use_muon": False}],
        lr=lr,
        weight_decay=0.1,
        max_grad_norm=1.0,
    )


def _set_grads(params: list[nn.Parameter], step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for q in params:
        q.grad = (torch.randn(q.shape, generator=gen) * 1e-2).to(q.device)


def count_graphs(
    lr: float | torch.Tensor, steps: int, d: int, layers: int, device: torch.device
) -> list[int]:
    """Graphs compiled so far after each of ``steps`` compiled steps under ``LambdaLR(1 / (1 + s))``."""
    torch._dynamo.reset()
    matrices, others = _model(d, layers, device)
    opt = _optimizer(matrices, others, lr)
    sched = lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    backend = _CountingBackend()
    step = torch.compile(opt.step, backend=backend)
    counts = []
    for s in range(steps):
        _set_grads(matrices + others, s)
        step()
        sched.step()
        counts.append(backend.graphs)
    return counts


def section(
    profile: str, device: torch.device, clock: benchkit.SectionClock, repeats: int
) -> tuple[benchkit.Section, dict[str, Any]]:
    d, layers, steps = {"quick": (32, 1, 4), "default": (128, 2, 8), "full": (256, 4, 12)}[profile]
    # the one graph break (the non-finite check's host sync) is expected: keep dynamo's note about it quiet
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    clock.progress(f"compile: counting graphs over {steps} scheduled steps, tensor lr then float lr")
    tensor_counts = count_graphs(torch.tensor(1e-3), steps, d, layers, device)
    float_counts = count_graphs(1e-3, steps, d, layers, device)
    rows: list[list[Any]] = [
        ["tensor lr (torch.tensor(1e-3))", " ".join(map(str, tensor_counts)), "", "", ""],
        ["Python float lr (1e-3)", " ".join(map(str, float_counts)), "", "", ""],
    ]
    notes = [
        "graphs: the running count of graphs compiled after each step (a constant row is 'compiles once').",
        f"{layers} GPT blocks of width {d}: {4 * layers} matrices on Muon, {2 * layers} vectors on AdamW, "
        "max_grad_norm=1.0; LambdaLR(1 / (1 + step)).",
    ]
    extra: dict[str, Any] = {"graphs_tensor_lr": tensor_counts, "graphs_float_lr": float_counts}
    if profile == "quick" or clock.remaining() < 2 * INDUCTOR_COMPILE_S:
        notes.append(
            "compiled (inductor) vs eager timing not run: "
            + ("the quick profile skips it" if profile == "quick" else "too little of the time budget left")
            + f" (an inductor compile of this step took about {INDUCTOR_COMPILE_S:.0f} s here)."
        )
    else:
        clock.progress("compile: inductor compile of the step (tens of seconds on a CPU)")
        torch._dynamo.reset()
        runs: dict[str, Callable[[], None]] = {}
        for name, compiled in (("eager", False), ("torch.compile (inductor)", True)):
            matrices, others = _model(d, layers, device)
            opt = _optimizer(matrices, others, torch.tensor(1e-3))
            sched = lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
            fn = torch.compile(opt.step) if compiled else opt.step
            params = matrices + others

            def run(fn: Callable[[], Any] = fn, sched: Any = sched, params: list = params) -> None:
                _set_grads(params, 0)
                fn()
                sched.step()

            if compiled:
                t0 = time.perf_counter()
                run()
                extra["inductor_first_call_s"] = time.perf_counter() - t0
            runs[name] = run
        t = benchkit.time_interleaved(runs, repeats=repeats, warmup=1)
        eager = t["eager"].median
        for name, timing in t.items():
            rows.append([f"step time: {name}", "", round(1e3 * timing.median, 2), f"{100 * timing.spread:.0f}%",
                         round(timing.median / eager, 2)])  # fmt: skip
        notes.append(
            f"inductor's first call (the compile) took {extra['inductor_first_call_s']:.1f} s; step times are "
            f"medians of {repeats} interleaved calls after it, with gradients written each call."
        )
        extra["step_ms"] = {k: 1e3 * v.median for k, v in t.items()}
    return (
        benchkit.Section(
            title="torch.compile(opt.step) under an LR schedule: graphs compiled, compiled vs eager",
            description=__doc__.split("\n\n")[1] if __doc__ else "",
            columns=["run", "graphs compiled after each step", "median ms", "IQR", "ratio vs eager"],
            rows=rows,
            notes=notes,
        ),
        extra,
    )
