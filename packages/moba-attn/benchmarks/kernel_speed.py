"""Kernel speed and peak memory: MoBA (each available backend) vs SDPA vs FlexAttention vs flash-attn.

Forward, forward+backward and single-token decode latency against context length, for the paper's
block/top-k settings (MoBA section 3: 512/3 for 8K-32K, 4096/12 for 1M). Contenders are timed
round-robin (``benchkit.time_interleaved``) so a slow phase of a shared machine hits all of them.
Beside each measured speed-up over SDPA stands the ideal one, from counting attended key positions.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import moba_attn

BACKENDS = ("torch", "triton", "flash", "flex")


@dataclass
class Shape:
    heads: int
    head_dim: int
    dtype: torch.dtype


def ideal_ratio(t: int, block_size: int, topk: int, head_dim: int, decode: bool = False) -> float:
    """Full-attention FLOPs over MoBA FLOPs (attention + gate), causal, one sequence of ``t`` tokens.

    Attention costs ``4 * D`` FLOPs per (query, key) pair (QK^T and PV); the gate costs ``2 * D`` per
    (query, block) pair. ``decode`` counts only the last query.
    """
    queries = torch.arange(t - 1 if decode else 0, t, dtype=torch.float64)
    full_keys = queries + 1
    own = queries - torch.div(queries, block_size, rounding_mode="floor") * block_size + 1
    earlier = torch.clamp(torch.div(queries, block_size, rounding_mode="floor"), max=topk - 1) * block_size
    n_blocks = torch.div(queries, block_size, rounding_mode="floor") + 1
    full = 4 * head_dim * full_keys.sum()
    moba = 4 * head_dim * (own + earlier).sum() + 2 * head_dim * n_blocks.sum()
    return float(full / moba)


class PeakMemory:
    """Peak extra memory of one call: CUDA allocator peak, or sampled RSS growth on CPU.

    On CPU, glibc is told (``mallopt``) to serve every allocation of 64 KiB or more with its own mmap,
    returned to the OS on free, and not to keep freed heap; RSS sampled every millisecond in a thread
    then tracks live tensor memory (a lower bound on peaks shorter than a millisecond). Without this,
    glibc's adaptive threshold recycles freed memory and the RSS growth reads near zero. This applies
    to the timed calls as well, for every contender alike (it is glibc's own start-up behaviour).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._libc = None
        if device.type == "cpu":
            try:
                import ctypes

                libc = ctypes.CDLL("libc.so.6")
                m_trim_threshold, m_mmap_threshold = -1, -3
                libc.mallopt(m_mmap_threshold, 64 * 1024)
                libc.mallopt(m_trim_threshold, 128 * 1024)
                self._libc = libc
            except (OSError, AttributeError):  # not glibc: RSS growth stays a rougher lower bound
                self._libc = None

    def measure(self, fn: Callable[[], Any]) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        page = os.sysconf("SC_PAGE_SIZE")
        if self._libc is not None:
            self._libc.malloc_trim(0)

        def rss() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        base = rss()
        peak = [base]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.001)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            fn()
        finally:
            done.set()
            th.join()
        peak[0] = max(peak[0], rss())
        return (peak[0] - base) / 2**20


def available_moba_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Backends of the op that run here, each confirmed with a tiny call.

    On CPU the Triton backend exists only under ``TRITON_INTERPRET=1``, a correctness path that is not
    worth timing, so it is left out there.
    """
    listed = moba_attn.available_backends() if hasattr(moba_attn, "available_backends") else list(BACKENDS)
    found = []
    q = torch.randn(64, 2, 16, device=device, dtype=dtype)
    for name in listed:
        if name == "triton" and device.type != "cuda":
            continue
        try:
            moba_attn.moba_attention(q=q, k=q, v=q, block_size=16, topk=2, backend=name)
        except (RuntimeError, ValueError, ImportError, NotImplementedError):
            continue
        found.append(name)
    return found


def _flex_causal(device: torch.device, compiled: bool) -> Callable[..., torch.Tensor] | None:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    fa = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    masks: dict[int, Any] = {}

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t = q.shape[2]
        if t not in masks:
            masks[t] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, t, t, device=device)
        return fa(q, k, v, block_mask=masks[t], enable_gqa=q.shape[1] != k.shape[1])

    return run


def _flash_func():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def run_speed(
    device: torch.device,
    lengths: list[int],
    settings: list[tuple[int, int]],
    shape: Shape,
    repeats: int,
    backward_max_t: int,
    flex_max_t: int,
    log: Callable[[str], None],
    time_interleaved: Callable[..., dict[str, Any]],
    over: Callable[[float], bool] = lambda cost: False,
) -> dict[str, Any]:
    """Time every contender at every length; returns rows keyed by (mode, T, contender).

    ``over(seconds)`` says whether work of that cost would pass the section's budget: before each
    length the cost is extrapolated from the previous length's measured medians (dense contenders
    grow as ``T^2``, MoBA as ``T``; one-time costs such as FlexAttention's compile are not counted)
    and the remaining lengths are skipped, and listed, if it would not fit.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    h, d, dt = shape.heads, shape.head_dim, shape.dtype
    backends = available_moba_backends(device, dt)
    flex = _flex_causal(device, compiled=True)
    flash = _flash_func() if device.type == "cuda" else None
    mem = PeakMemory(device)
    rows: list[dict[str, Any]] = []
    log(
        f"MoBA backends here: {backends}; flex={'yes' if flex else 'no'}; flash-attn={'yes' if flash else 'no'}"
    )
    skipped: list[int] = []
    prev_t = 0
    for t in lengths:
        if prev_t:
            est = _extrapolate(rows, prev_t, t, repeats, backward_max_t, flex_max_t)
            if over(est):
                skipped = [x for x in lengths if x >= t]
                log(f"stopping before T={t}: ~{est:.0f}s (extrapolated) would pass the section budget")
                break
        gen = torch.Generator(device=device).manual_seed(t)
        thd = [torch.randn(t, h, d, device=device, dtype=dt, generator=gen) for _ in range(3)]
        for mode in ("forward", "forward+backward", "decode"):
            if mode == "forward+backward" and t > backward_max_t:
                continue
            contenders, ideal = _contenders(mode, thd, settings, backends, flex, flash, flex_max_t)
            reps = repeats if t <= 16384 or device.type == "cuda" else max(3, repeats - 2)
            log(f"{mode:17s} T={t:>7d}: {', '.join(contenders)} x{reps}")
            peaks = {}
            for name, fn in contenders.items():  # the warm-up call doubles as the memory measurement
                if "flex" in name:
                    fn()  # compile first: compiler memory is not the kernel's
                peaks[name] = mem.measure(fn)
            timings = time_interleaved(contenders, repeats=reps, warmup=0, sync=sync)
            base = timings["sdpa"].median
            for name, tm in timings.items():
                rows.append(
                    {
                        "mode": mode,
                        "T": t,
                        "contender": name,
                        "median_ms": tm.median * 1e3,
                        "spread": tm.spread,
                        "speedup_vs_sdpa": base / tm.median,
                        "ideal_speedup": ideal[name],
                        "peak_mib": peaks[name],
                    }
                )
            del contenders
        del thd
        prev_t = t
    return {"backends": backends, "rows": rows, "skipped_lengths": skipped}


def _extrapolate(
    rows: list[dict[str, Any]], prev_t: int, t: int, repeats: int, backward_max_t: int, flex_max_t: int
) -> float:
    """Seconds the contenders timed at ``prev_t`` would take at ``t`` (warm-up + repeats each), counting
    only the modes and contenders that run at ``t``."""
    total = 0.0
    for r in rows:
        if r["mode"] == "forward+backward" and t > backward_max_t:
            continue
        if "flex" in r["contender"] and t > flex_max_t:
            continue
        if r["T"] == prev_t:
            power = 1 if r["contender"].startswith("moba") else 2
            total += r["median_ms"] / 1e3 * (repeats + 1) * (t / prev_t) ** power
    return total


def _contenders(
    mode: str,
    thd: list[torch.Tensor],
    settings: list[tuple[int, int]],
    backends: list[str],
    flex: Callable[..., torch.Tensor] | None,
    flash: Callable[..., torch.Tensor] | None,
    flex_max_t: int,
) -> tuple[dict[str, Callable[[], Any]], dict[str, float]]:
    """Zero-argument callables for one (mode, T), and each one's ideal speed-up over SDPA.

    MoBA reads packed ``[T, H, D]``; SDPA and FlexAttention read ``[1, H, T, D]``, prepared beforehand
    so no contender pays for a layout change.
    """
    t, d = thd[0].shape[0], thd[0].shape[2]
    device, dt = thd[0].device, thd[0].dtype
    grad = mode == "forward+backward"
    cpu = device.type == "cpu"
    qm, km, vm = (x.detach().requires_grad_(grad) for x in thd)
    qs, ks, vs = (x.detach().transpose(0, 1).unsqueeze(0).contiguous().requires_grad_(grad) for x in thd)

    def wrap(f: Callable[[], torch.Tensor]) -> Callable[[], Any]:
        if grad:
            return lambda: f().sum().backward()

        def fwd() -> None:
            with torch.no_grad():
                f()

        return fwd

    contenders: dict[str, Callable[[], Any]] = {}
    ideal: dict[str, float] = {}
    if mode == "decode":
        q1s, q1m = qs[:, :, -1:], qm[-1:]
        cu_q = torch.tensor([0, 1], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, t], dtype=torch.int32, device=device)
        contenders["sdpa"] = wrap(lambda: F.scaled_dot_product_attention(q1s, ks, vs))
        ideal["sdpa"] = 1.0
        for bs, topk in settings:
            for be in backends:
                if be == "flex" and cpu:
                    continue
                name = f"moba-{be} {bs}/{topk}"
                contenders[name] = wrap(
                    lambda be=be, bs=bs, topk=topk: moba_attn.moba_attention(
                        q=q1m,
                        k=km,
                        v=vm,
                        block_size=bs,
                        topk=topk,
                        cu_seqlens=cu_q,
                        cu_seqlens_k=cu_k,
                        backend=be,
                    )
                )
                ideal[name] = ideal_ratio(t, bs, topk, d, decode=True)
        return contenders, ideal
    contenders["sdpa"] = wrap(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
    ideal["sdpa"] = 1.0
    if flash is not None and dt in (torch.float16, torch.bfloat16):
        qf, kf, vf = (x.detach().unsqueeze(0).requires_grad_(grad) for x in thd)
        contenders["flash-attn"] = wrap(lambda: flash(qf, kf, vf, causal=True))
        ideal["flash-attn"] = 1.0
    flex_ok = t <= flex_max_t and not (grad and cpu)  # FlexAttention has no CPU backward
    if flex is not None and flex_ok:
        contenders["flex (causal)"] = wrap(lambda: flex(qs, ks, vs))
        ideal["flex (causal)"] = 1.0
    for bs, topk in settings:
        if bs * topk >= t:  # MoBA is full attention there: nothing sparse to measure
            continue
        for be in backends:
            if be == "flex" and (cpu or not flex_ok):
                continue
            name = f"moba-{be} {bs}/{topk}"
            contenders[name] = wrap(
                lambda be=be, bs=bs, topk=topk: moba_attn.moba_attention(
                    q=qm, k=km, v=vm, block_size=bs, topk=topk, backend=be
                )
            )
            ideal[name] = ideal_ratio(t, bs, topk, d)
    return contenders, ideal


def plot_speed(rows: list[dict[str, Any]], out_dir: Any, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {
        name: palette[i % len(palette)] for i, name in enumerate(dict.fromkeys(r["contender"] for r in rows))
    }
    modes = [m for m in ("forward", "forward+backward", "decode") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        sub = [r for r in rows if r["mode"] == mode]
        for name in dict.fromkeys(r["contender"] for r in sub):
            pts = sorted((r["T"], r["median_ms"]) for r in sub if r["contender"] == name)
            style = "-o" if name.startswith("moba") else "--s"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name, ms=4, color=color[name])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length T")
        ax.set_ylabel("median ms per call")
        ax.set_title(mode)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fname = f"{prefix}-speed.png"
    fig.savefig(out_dir / fname, dpi=110)
    plt.close(fig)
    names.append(fname)

    fig, ax = plt.subplots(figsize=(6, 4.2))
    sub = [r for r in rows if r["mode"] == "forward" and not math.isnan(r["peak_mib"])]
    for name in dict.fromkeys(r["contender"] for r in sub):
        pts = sorted((r["T"], max(r["peak_mib"], 1e-2)) for r in sub if r["contender"] == name)
        ax.plot(
            [p[0] for p in pts], [p[1] for p in pts], "-o" if name.startswith("moba") else "--s", label=name
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length T")
    ax.set_ylabel("peak extra memory, MiB (forward)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fname = f"{prefix}-memory.png"
    fig.savefig(out_dir / fname, dpi=110)
    plt.close(fig)
    names.append(fname)
    return names
