"""moba-attn on a GPU: MoBA's triton, flash and flex backends against dense causal SDPA, bf16.

    PYTHONPATH=tools:tools/gpu python tools/gpu/moba_speed.py --out bench-results/gpu/bench-moba-attn.json

One sequence of T = 8K, 32K and 128K tokens, 8 query and 8 key/value heads, head dim 128, MoBA block 512 /
top-3 (the setting of the package README's figures); forward (under ``no_grad``) and forward+backward.
Per contender: the median of interleaved timed calls (``benchkit.time_interleaved`` with a CUDA
synchronise around each call), the first call's time (Triton autotuning, FlexAttention's compile), and
the peak memory one call allocates on top of its inputs. SDPA is the strongest dense peer in the same
process (PyTorch picks its flash/cuDNN kernel for bf16). Only the public API is called:
``moba_attn.moba_attention(q=, k=, v=, block_size=, topk=, backend=)`` and ``available_backends()``.

Budget: each (T, mode) is predicted from the previous length (time per call scaled by (T / T_prev)^2,
first-call cost repeated) and skipped with the reason when it would pass the deadline, so the 128K row
is dropped rather than the part killed. A backend that is not installed (flash without a prebuilt wheel)
or that fails (out of memory) is a row with its reason, and the others go on.
"""

from __future__ import annotations

import inspect
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import benchkit
import torch
import torch.nn.functional as F
from partresult import PartResult, parser

LENGTHS = (8192, 32768, 131072)


@dataclass(frozen=True)
class Shape:
    """Everything but the length: heads (query = key/value, no GQA), head dim, MoBA block and top-k."""

    heads: int = 8
    head_dim: int = 128
    block_size: int = 512
    topk: int = 3
    dtype: torch.dtype = torch.bfloat16

    def describe(self) -> str:
        return (
            f"B=1, H={self.heads}, D={self.head_dim}, {str(self.dtype).removeprefix('torch.')}, "
            f"block {self.block_size} / top-{self.topk}"
        )


GPU_SHAPE = Shape()
CHECK_SHAPE = Shape(heads=2, head_dim=32, block_size=64, topk=2, dtype=torch.float32)
# contender -> moba backend (None: dense causal SDPA)
CONTENDERS: dict[str, str | None] = {
    "moba triton": "triton",
    "moba flash": "flash",
    "moba flex": "flex",
    "sdpa causal": None,
}
MODES = ("fwd", "fwd+bwd")
COLUMNS = [
    "T",
    "mode",
    "contender",
    "median ms",
    "spread",
    "first call s",
    "peak MiB",
    "speed-up vs SDPA",
    "status",
]
# Seconds kept back for writing the result and for the interpreter's exit.
MARGIN_S = 6.0


def pair_ratio(t: int, block: int, topk: int) -> float:
    """Dense causal (query, key) pairs over MoBA's: the FLOP ratio a perfect kernel would turn into speed.

    A query at position ``i`` of block ``b`` attends ``i - b * block + 1`` keys of its own block and
    ``min(topk - 1, b)`` whole earlier blocks.
    """
    dense = t * (t + 1) / 2
    moba = 0.0
    for b in range(math.ceil(t / block)):
        n = min(block, t - b * block)  # queries in block b
        moba += n * (n + 1) / 2 + n * min(topk - 1, b) * block
    return dense / moba


def make_call(
    backend: str | None,
    mode: str,
    shape: Shape,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
) -> Callable[[], None]:
    from moba_attn import moba_attention

    if backend is None:

        def attention() -> torch.Tensor:
            # [T, H, D] -> [1, H, T, D] views: SDPA's layout, no copy
            q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True).squeeze(0).transpose(0, 1)
    else:

        def attention() -> torch.Tensor:
            return moba_attention(
                q=q, k=k, v=v, block_size=shape.block_size, topk=shape.topk, backend=backend
            )

    if mode == "fwd":

        def forward() -> None:
            with torch.no_grad():
                attention()

        return forward

    def forward_backward() -> None:
        q.grad = k.grad = v.grad = None
        attention().backward(do)

    return forward_backward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(call: Callable[[], None], device: torch.device) -> float | None:
    """Memory one call allocates beyond what is live before it (CUDA only)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    call()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _why(err: BaseException) -> str:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "out of memory"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]


def inputs(t: int, shape: Shape, device: torch.device, n: int) -> list[torch.Tensor]:
    """``n`` seeded ``[t, heads, head_dim]`` tensors drawn on ``device`` (no host-side copy of 128K tokens)."""
    gen = torch.Generator(device=device).manual_seed(t)
    size = (t, shape.heads, shape.head_dim)
    return [torch.randn(size, generator=gen, device=device, dtype=shape.dtype) for _ in range(n)]


def run(
    result: PartResult,
    device: torch.device,
    lengths: tuple[int, ...],
    shape: Shape,
    contenders: dict[str, str | None],
    max_repeats: int = 7,
) -> benchkit.Section:
    """The speed and memory table (also added to ``result``), one row per (T, mode, contender)."""
    from moba_attn import available_backends

    available = available_backends()
    table = result.section(
        "moba-attn: MoBA vs dense causal SDPA",
        f"{shape.describe()}; medians of interleaved calls; peak MiB = memory one call allocates beyond its "
        "inputs",
        COLUMNS,
    )
    ratios = result.section(
        "moba-attn: attended pairs",
        "dense causal (query, key) pairs over MoBA's: the speed-up a kernel with no overhead would reach",
        ["T", "dense / MoBA pairs"],
    )
    # contender -> (T, per-call s, first-call s) of its last measured length, for the next prediction
    last: dict[tuple[str, str], tuple[int, float, float]] = {}
    combos = [(t, mode) for t in lengths for mode in MODES]
    for index, (t, mode) in enumerate(combos):
        if mode == MODES[0]:
            ratios.rows.append([t, round(pair_ratio(t, shape.block_size, shape.topk), 2)])
            q, k, v, do = inputs(t, shape, device, 4)
        else:
            for x in (q, k, v):
                x.requires_grad_(True)
        calls: dict[str, Callable[[], None]] = {}
        per_call: dict[str, float] = {}
        rows: dict[str, list] = {}
        for name, backend in contenders.items():
            row = [t, mode, name, None, None, None, None, None, "ok"]
            rows[name] = row
            table.rows.append(row)
            if backend is not None and backend not in available:
                row[-1] = f"skipped: backend {backend!r} not available here (available: {available})"
                continue
            if mode != "fwd" and device.type != "cuda" and backend == "flex":
                row[-1] = "skipped: FlexAttention has no CPU backward"
                continue
            if (name, mode) in last:
                t0, per0, first0 = last[(name, mode)]
                predicted = first0 + per0 * (t / t0) ** 2 * (2 + 3)
                if predicted > result.left() - MARGIN_S:
                    row[-1] = (
                        f"skipped: predicted {predicted:.0f} s from T={t0} would pass the deadline "
                        f"({result.left():.0f} s left)"
                    )
                    continue
            call = make_call(backend, mode, shape, q, k, v, do)
            try:
                start = time.perf_counter()
                call()
                _sync(device)
                row[5] = round(time.perf_counter() - start, 3)
                start = time.perf_counter()
                call()
                _sync(device)
                per_call[name] = time.perf_counter() - start
                row[6] = None if (mib := peak_mib(call, device)) is None else round(mib, 1)
            except Exception as err:  # one backend failing must not stop the others
                row[-1] = f"failed: {_why(err)}"
                q.grad = k.grad = v.grad = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            calls[name] = call
            last[(name, mode)] = (t, per_call[name], row[5])
            result.write()
        if calls:
            # an even share of what is left for the remaining (T, mode) combinations, at most 10 s here
            share = min(10.0, (result.left() - MARGIN_S) / max(1, len(combos) - index))
            repeats = int(max(1, min(max_repeats, share / max(sum(per_call.values()), 1e-6))))
            sync = (lambda: _sync(device)) if device.type == "cuda" else None
            try:
                timings = benchkit.time_interleaved(calls, repeats=repeats, warmup=0, sync=sync)
            except Exception as err:
                for name in calls:
                    rows[name][-1] = f"failed while timing: {_why(err)}"
                timings = {}
            for name, timing in timings.items():
                rows[name][3] = round(timing.median * 1e3, 3)
                rows[name][4] = f"{timing.spread:.0%}" if repeats >= 3 else f"{repeats} run(s)"
            dense = timings.get("sdpa causal")
            for name, timing in timings.items():
                if dense is not None and name != "sdpa causal":
                    rows[name][7] = f"{dense.median / timing.median:.2f}x"
        del calls
        if mode == MODES[-1]:
            del q, k, v, do
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result.write()
        benchkit.progress(f"moba-attn: T={t} {mode} done, {result.left():.0f} s left")
    return table


def agreement(result: PartResult, device: torch.device, t: int, shape: Shape) -> None:
    """Largest difference of each backend's output from the first available one's, on one input."""
    from moba_attn import available_backends, moba_attention

    backends = [b for b in CONTENDERS.values() if b is not None and b in available_backends()]
    if device.type != "cuda":
        backends = [b for b in ("torch", "flex") if b in available_backends()]
    if len(backends) < 2:
        result.note(f"agreement: fewer than two backends to compare ({backends})")
        return
    q, k, v = inputs(t, shape, device, 3)
    outs = {}
    for b in backends:
        try:
            with torch.no_grad():
                outs[b] = moba_attention(
                    q=q, k=k, v=v, block_size=shape.block_size, topk=shape.topk, backend=b
                )
        except Exception as err:
            result.note(f"agreement: backend {b} failed: {_why(err)}")
    if len(outs) < 2:
        return
    first, ref = next(iter(outs.items()))
    s = result.section(
        "moba-attn: backends agree",
        f"max |o - o_{first}| at T={t}, same inputs; {shape.describe()}",
        ["backend", f"max abs diff vs {first}"],
    )
    for b, o in outs.items():
        if b != first:
            s.rows.append([b, float((o.float() - ref.float()).abs().max())])
    result.write()


def plot(table: benchkit.Section, path: Path) -> str:
    """Median ms against T per contender, forward and forward+backward side by side; '' without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ""
    rows = [r for r in table.rows if r[3] is not None]
    if not rows:
        return ""
    names = list(dict.fromkeys(r[2] for r in table.rows))
    fig, axes = plt.subplots(1, len(MODES), figsize=(10, 4), sharey=True)
    for ax, mode in zip(axes, MODES, strict=True):
        for colour, name in enumerate(names):
            pts = [(r[0], r[3]) for r in rows if r[1] == mode and r[2] == name]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name, color=f"C{colour}")
        ax.set(xscale="log", yscale="log", xlabel="tokens T", title=mode)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("median ms per call")
    for ax in axes:
        if ax.lines:
            ax.legend()
    fig.suptitle(f"moba-attn on {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def check() -> None:
    """CPU smoke: the public signature, the backend names, and the same code path on tiny shapes."""
    from moba_attn import available_backends, moba_attention

    params = inspect.signature(moba_attention).parameters
    missing = {"q", "k", "v", "block_size", "topk", "backend"} - set(params)
    if missing:
        raise SystemExit(
            f"moba_attn.moba_attention lost the keyword(s) {sorted(missing)} this benchmark passes"
        )
    q = torch.randn(64, 2, 16)
    for backend in (b for b in CONTENDERS.values() if b is not None):
        if backend in available_backends():
            continue
        try:
            moba_attention(q=q, k=q, v=q, block_size=16, topk=2, backend=backend)
        except RuntimeError as err:  # "not available here": the name is known
            if "not available" not in str(err):
                raise
        except ValueError as err:
            raise SystemExit(f"moba_attn no longer knows the backend {backend!r}: {err}") from err
    warnings.filterwarnings("ignore", module="torch.nn.attention.flex_attention")  # eager flex on CPU
    result = PartResult("bench-moba-attn (check)", None, 0.0)
    cpu = {"moba torch": "torch", "moba flex": "flex", "sdpa causal": None}
    table = run(result, torch.device("cpu"), (256,), CHECK_SHAPE, cpu, max_repeats=1)
    agreement(result, torch.device("cpu"), 256, CHECK_SHAPE)
    bad = [r for r in table.rows if r[-1].startswith("failed")]
    if bad:
        raise SystemExit(f"moba-attn check failed: {bad}")
    with tempfile.TemporaryDirectory() as tmp:
        plot(table, Path(tmp) / "check.png")
    print(f"moba_speed check ok: {len(table.rows)} rows on CPU ({available_backends()})")


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    if args.check:
        check()
        return 0
    device = torch.device(args.device)
    result = PartResult(
        "bench-moba-attn", args.out, args.deadline, environment=benchkit.environment(["moba-attn"])
    )
    result.write()
    table = run(result, device, LENGTHS, GPU_SHAPE, CONTENDERS)
    if result.left() > 10:  # every backend is compiled for this length by now: seconds
        agreement(result, device, LENGTHS[0], GPU_SHAPE)
    png = plot(table, args.out.with_suffix(".png"))
    if png:  # relative to bench-results/, where gpu.md is written
        table.plots.append(str(Path(png).relative_to(args.out.parent.parent)))
    skipped = [r for r in table.rows if str(r[-1]).startswith("skipped: predicted")]
    if skipped:
        result.stop_early(f"{len(skipped)} row(s) skipped to keep the budget")
    result.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
