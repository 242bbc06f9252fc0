"""muon-opt on a GPU: optimizer step time with bf16 vs fp32 Newton-Schulz, against torch.optim.Muon.

    PYTHONPATH=tools:tools/gpu python tools/gpu/muon_step.py --out bench-results/gpu/bench-muon-opt.json

Parameters of GPT-2 small's shapes (d_model 768, 12 layers, vocab 50257, context 1024: 48 hidden
matrices, 124M parameters in all), fp32, gradients filled in. Contenders, each on its own copy of the same
parameters and gradients, timed interleaved (``benchkit.time_interleaved``, CUDA synchronise around each
step): ``muon_opt.Muon`` with ``ns_dtype="float32"`` and ``"bf16"`` (``"auto"`` is bf16 on this GPU),
``torch.optim.Muon`` (always bf16 Newton-Schulz) on the matrices with fused ``AdamW`` on the rest (when this
torch has it), and fused ``AdamW`` on everything as the floor. A second table gives the relative error
of one update of the first block's four matrices against a float64 step, which is what bf16 costs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import benchkit
import torch
from partresult import PartResult, parser
from torch import nn


@dataclass(frozen=True)
class GPTShapes:
    d_model: int = 768
    layers: int = 12
    vocab: int = 50257
    context: int = 1024


GPT2_SMALL = GPTShapes()
CHECK_SHAPES = GPTShapes(d_model=32, layers=1, vocab=64, context=16)


def gpt_params(s: GPTShapes, device: torch.device) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices, everything else) with GPT-2's parameter shapes, gradients filled in."""
    d, gen = s.d_model, torch.Generator().manual_seed(0)

    def param(*shape: int) -> nn.Parameter:
        p = nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device)
        return p

    matrices, others = [], [param(s.vocab, d), param(s.context, d)]  # wte (tied head), wpe
    for _ in range(s.layers):
        matrices += [param(3 * d, d), param(d, d), param(4 * d, d), param(d, 4 * d)]  # qkv, proj, fc, fc proj
        others += [param(d), param(d), param(3 * d), param(d), param(4 * d), param(d), param(d), param(d)]
    others += [param(d), param(d)]  # final layer norm
    return matrices, others


def _copy(params: list[nn.Parameter]) -> list[nn.Parameter]:
    out = []
    for p in params:
        c = nn.Parameter(p.detach().clone())
        c.grad = p.grad.clone()
        out.append(c)
    return out


Factory = Callable[[list[nn.Parameter], list[nn.Parameter]], Callable[[], None]]


def _ours(ns_dtype: str) -> Factory:
    def make(matrices: list[nn.Parameter], others: list[nn.Parameter]) -> Callable[[], None]:
        import muon_opt

        groups = [{"params": matrices, "use_muon": True}, {"params": others, "use_muon": False}]
        return muon_opt.Muon(groups, lr=1e-3, weight_decay=0.1, ns_dtype=ns_dtype).step

    return make


def _torch_muon(matrices: list[nn.Parameter], others: list[nn.Parameter]) -> Callable[[], None]:
    fused = matrices[0].device.type == "cuda"
    muon = torch.optim.Muon(matrices, lr=1e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(others, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), fused=fused)

    def step() -> None:
        muon.step()
        adamw.step()

    return step


def _adamw(matrices: list[nn.Parameter], others: list[nn.Parameter]) -> Callable[[], None]:
    fused = matrices[0].device.type == "cuda"
    return torch.optim.AdamW(matrices + others, lr=1e-3, weight_decay=0.1, fused=fused).step


def contenders() -> dict[str, Factory]:
    out: dict[str, Factory] = {
        "muon_opt.Muon ns_dtype=float32": _ours("float32"),
        "muon_opt.Muon ns_dtype=bf16": _ours("bf16"),
    }
    if hasattr(torch.optim, "Muon"):
        out["torch.optim.Muon (bf16 NS) + AdamW"] = _torch_muon
    out["torch.optim.AdamW (all parameters)"] = _adamw
    return out


def _sync(device: torch.device) -> Callable[[], None] | None:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def _peak_mib(step: Callable[[], None], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)


def step_times(result: PartResult, shapes: GPTShapes, device: torch.device, max_repeats: int) -> None:
    matrices, others = gpt_params(shapes, device)
    n_params = sum(p.numel() for p in matrices + others)
    table = result.section(
        "muon-opt: optimizer step, GPT-2-small shapes",
        f"d_model {shapes.d_model}, {shapes.layers} layers, vocab {shapes.vocab}, context {shapes.context}: "
        f"{len(matrices)} hidden matrices, {n_params / 1e6:.1f}M fp32 parameters; medians of interleaved steps",
        ["contender", "median ms", "spread", "time / muon_opt fp32", "peak MiB"],
    )
    if not hasattr(torch.optim, "Muon"):
        result.note(f"torch {torch.__version__} has no torch.optim.Muon: that contender is left out")
    steps: dict[str, Callable[[], None]] = {}
    peaks: dict[str, float | None] = {}
    for name, make in contenders().items():
        try:
            step = make(_copy(matrices), _copy(others))
            step()  # first step: state allocation, lazy imports, kernel selection
            peaks[name] = _peak_mib(step, device)
            steps[name] = step
        except Exception as err:  # one contender failing must not stop the others
            table.rows.append([name, None, None, None, f"failed: {type(err).__name__}: {err}"[:200]])
    del matrices, others
    if not steps:
        return
    one = benchkit.time_interleaved(steps, repeats=1, warmup=0, sync=_sync(device))
    per_round = sum(t.median for t in one.values())
    repeats = int(max(1, min(max_repeats, (min(10.0, result.left() - 5.0)) / max(per_round, 1e-6))))
    timings = benchkit.time_interleaved(steps, repeats=repeats, warmup=0, sync=_sync(device))
    base = timings.get("muon_opt.Muon ns_dtype=float32")
    for name, t in timings.items():
        ratio = f"{t.median / base.median:.2f}x" if base else None
        spread = f"{t.spread:.0%}" if repeats >= 3 else f"{repeats} run(s)"
        table.rows.append([name, round(t.median * 1e3, 3), spread, ratio, peaks[name]])
    result.write()


def update_errors(result: PartResult, shapes: GPTShapes, device: torch.device) -> None:
    """Relative error of one step's update (lr 1, no decay, fresh state) against the float64 step."""
    import muon_opt

    # one block is enough: its four matrices have every hidden-matrix shape of the model
    matrices, _ = gpt_params(replace(shapes, layers=1, vocab=16, context=16), device)
    truth = [nn.Parameter(p.detach().double()) for p in matrices]
    for t, p in zip(truth, matrices, strict=True):
        t.grad = p.grad.double()
    muon_opt.Muon(truth, lr=1.0, weight_decay=0.0, ns_dtype="float64").step()
    makers: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
        "muon_opt.Muon ns_dtype=float32": lambda ps: muon_opt.Muon(
            ps, lr=1.0, weight_decay=0.0, ns_dtype="float32"
        ),
        "muon_opt.Muon ns_dtype=bf16": lambda ps: muon_opt.Muon(
            ps, lr=1.0, weight_decay=0.0, ns_dtype="bf16"
        ),
    }
    if hasattr(torch.optim, "Muon"):
        makers["torch.optim.Muon (bf16 NS)"] = lambda ps: torch.optim.Muon(
            ps, lr=1.0, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"
        )
    table = result.section(
        "muon-opt: update error against float64",
        "first block's four matrices, one step at lr 1: ||update - update_fp64|| / ||update_fp64||",
        ["contender", "relative error"],
    )
    ref = [t.detach() - p.detach().double() for t, p in zip(truth, matrices, strict=True)]
    den = sum(float(r.pow(2).sum()) for r in ref)
    for name, make in makers.items():
        work = _copy(matrices)
        make(work).step()
        num = sum(
            float(((w.detach().double() - p.detach().double()) - r).pow(2).sum())
            for w, p, r in zip(work, matrices, ref, strict=True)
        )
        table.rows.append([name, f"{math.sqrt(num / den):.2e}"])
    result.write()


def check() -> None:
    result = PartResult("bench-muon-opt (check)", None, 0.0)
    step_times(result, CHECK_SHAPES, torch.device("cpu"), max_repeats=1)
    update_errors(result, CHECK_SHAPES, torch.device("cpu"))
    bad = [r for s in result.sections for r in s.rows if "failed" in str(r[-1])]
    if bad:
        raise SystemExit(f"muon-opt check failed: {bad}")
    names = [r[0] for r in result.sections[0].rows]
    print(f"muon_step check ok: {names}")


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    if args.check:
        check()
        return 0
    device = torch.device(args.device)
    env = benchkit.environment(["muon-opt"])
    result = PartResult("bench-muon-opt", args.out, args.deadline, environment=env)
    result.write()
    update_errors(result, GPT2_SMALL, device)
    step_times(result, GPT2_SMALL, device, max_repeats=20)
    result.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
