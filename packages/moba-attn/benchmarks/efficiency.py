"""MoBA's efficiency where users meet it (CPU): the op, its memory, and decoding inside transformers.

Everything is measured in one process with contenders interleaved (``benchkit.time_interleaved``),
except peak memory, which gets a fresh process per point (a process's RSS never shrinks back to what
it was, so points measured in one process would read each other's peaks). Thread counts are set with
``torch.set_num_threads``; on a shared 2-core machine two OpenMP threads can starve each other, so the
1-thread figures are the ones to compare across runs.

* **op**: forward and forward+backward of ``moba_attention`` (backend ``"torch"``: the fused CPU path)
  against SDPA causal (PyTorch's fused CPU flash kernel, ``enable_gqa`` for GQA), with the ideal FLOP
  ratio beside each; at a short length also the tiled baseline (``"torch_tiled"``) and the reference.
* **memory**: peak RSS growth of one call, forward and forward+backward, MoBA vs SDPA, and MoBA with a
  ``topk`` that covers the context (which must cost what SDPA costs).
* **decode**: one new token against a cached context of ``S`` tokens: the op on a contiguous
  ``[S, H, D]`` cache with :class:`~moba_attn.KeyBlockMeans`; ``MoBAAttention`` (the transformers
  attention function) on a cache layer's own ``[B, H, S, D]`` tensors vs transformers' SDPA attention
  function; and a whole small Llama's ``generate()`` token rate (MoBA with the MoBACache that generate
  builds by itself, vs ``attn_implementation="sdpa"``) from the same prefilled cache.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import benchkit
import torch
import torch.nn.functional as F
from kernel_speed import PeakMemory, ideal_ratio


@dataclass
class EffSettings:
    """What the efficiency section measures (lengths in tokens)."""

    fwd_lengths: list[int] = field(default_factory=lambda: [8192, 16384, 32768])
    bwd_lengths: list[int] = field(default_factory=lambda: [8192, 16384])
    heads: list[tuple[int, int]] = field(default_factory=lambda: [(4, 4), (8, 2)])
    gqa_max_t: int = 16384  # GQA 8/2 rows up to this length
    threads: list[int] = field(default_factory=lambda: [1, 2])
    two_thread_max_t: int = 32768
    head_dim: int = 128
    block_size: int = 512
    topk: int = 3
    repeats: int = 3
    baseline_t: int = 4096  # fused vs tiled vs reference vs SDPA at this length
    covering_max_t: int = 16384  # forward rows up to this length also time a topk that covers T
    memory_lengths: list[int] = field(default_factory=lambda: [16384])
    memory_modes: list[str] = field(default_factory=lambda: ["forward", "forward+backward"])
    decode_lengths: list[int] = field(default_factory=lambda: [8192, 16384, 32768])
    decode_batches: list[int] = field(default_factory=lambda: [1, 2])
    generate_lengths: list[int] = field(default_factory=lambda: [16384])
    generate_batches: list[int] = field(default_factory=lambda: [1])
    generate_tokens: int = 8
    model_layers: int = 4


def profile(name: str) -> EffSettings:
    if name in ("quick", "smoke"):
        return EffSettings(
            fwd_lengths=[2048, 4096], bwd_lengths=[2048], heads=[(4, 4), (8, 2)], threads=[1], head_dim=64,
            block_size=256, repeats=2, baseline_t=1024, memory_lengths=[2048], memory_modes=["forward+backward"],
            decode_lengths=[4096],
            decode_batches=[1, 2], generate_lengths=[2048], generate_tokens=3, model_layers=2,
        )  # fmt: skip
    if name == "full":
        return EffSettings(
            fwd_lengths=[8192, 16384, 32768, 65536], bwd_lengths=[8192, 16384, 32768], gqa_max_t=32768,
            repeats=3, memory_lengths=[16384, 32768], generate_lengths=[8192, 16384, 32768],
            generate_batches=[1, 2],
        )  # fmt: skip
    # default: the 1-thread points behind the targets, sized to budget.json's 360 s (2 threads, GQA
    # beyond 8K, 64K and memory at 32K are --profile full's)
    return EffSettings(
        heads=[(4, 4), (8, 2)], gqa_max_t=8192, threads=[1], baseline_t=2048, memory_modes=["forward+backward"],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- op


def _inputs(t: int, hq: int, hkv: int, d: int, grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, hq, d, generator=g)
    k = torch.randn(t, hkv, d, generator=g)
    v = torch.randn(t, hkv, d, generator=g)
    return [x.requires_grad_(grad) for x in (q, k, v)]


def _sdpa(q, k, v):
    qs, ks, vs = (x.transpose(0, 1)[None] for x in (q, k, v))
    return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def _contenders(q, k, v, s: EffSettings, backward: bool, extra: bool) -> dict[str, Callable[[], Any]]:
    from moba_attn import moba_attention, moba_attention_reference

    def moba(backend: str) -> Callable[[], Any]:
        return lambda: moba_attention(q=q, k=k, v=v, block_size=s.block_size, topk=s.topk, backend=backend)

    fns: dict[str, Callable[[], Any]] = {"sdpa": lambda: _sdpa(q, k, v), "moba": moba("torch")}
    if not backward and q.shape[0] <= s.covering_max_t:  # topk covering T: must cost what SDPA costs
        covering = -(-q.shape[0] // s.block_size)
        fns[f"moba topk={covering} (covers T)"] = lambda: moba_attention(
            q=q, k=k, v=v, block_size=s.block_size, topk=covering
        )
    if extra:
        fns["moba torch_tiled"] = moba("torch_tiled")
        fns["reference"] = lambda: moba_attention_reference(
            q=q, k=k, v=v, block_size=s.block_size, topk=s.topk
        )
    if not backward:
        return {n: (lambda f=f: _no_grad(f)) for n, f in fns.items()}
    return {n: (lambda f=f: f().float().sum().backward()) for n, f in fns.items()}


def _no_grad(f: Callable[[], Any]) -> Any:
    with torch.no_grad():
        return f()


def run_op(s: EffSettings, progress, over) -> tuple[list[dict], list[str]]:
    rows: list[dict] = []
    skipped: list[str] = []
    points = []
    for threads in s.threads:
        for hq, hkv in s.heads:
            for mode, lengths in (("forward", s.fwd_lengths), ("forward+backward", s.bwd_lengths)):
                for t in lengths:
                    if (hq, hkv) != s.heads[0] and t > s.gqa_max_t:
                        continue
                    if threads > 1 and t > s.two_thread_max_t:
                        continue
                    points.append((threads, hq, hkv, mode, t, False))
    points.insert(0, (1, *s.heads[0], "forward", s.baseline_t, True))
    points.insert(1, (1, *s.heads[0], "forward+backward", s.baseline_t, True))
    last: dict[tuple, tuple[float, int]] = {}  # (threads, heads, mode) -> (seconds, T) of the last point
    for threads, hq, hkv, mode, t, extra in points:
        key = (threads, hq, hkv, mode)
        prev = last.get(key)
        estimate = prev[0] * (t / prev[1]) ** 1.9 if prev else 0.0  # SDPA dominates: about quadratic
        label = f"{mode} T={t} H={hq}/{hkv} {threads} thread(s)"
        if over(estimate):
            skipped.append(label)
            continue
        torch.set_num_threads(threads)
        q, k, v = _inputs(t, hq, hkv, s.head_dim, grad=mode != "forward")
        started = time.perf_counter()
        timings = benchkit.time_interleaved(
            _contenders(q, k, v, s, mode != "forward", extra), repeats=s.repeats
        )
        took = time.perf_counter() - started
        if not extra:
            last[key] = (took, t)
        base = timings["sdpa"].median
        for name, tm in timings.items():
            rows.append(
                dict(
                    mode=mode,
                    T=t,
                    heads=f"{hq}/{hkv}",
                    threads=threads,
                    contender=name,
                    median_ms=1e3 * tm.median,
                    spread=tm.spread,
                    speedup_vs_sdpa=base / tm.median,
                    ideal_speedup=ideal_ratio(t, s.block_size, s.topk, s.head_dim),
                )
            )
        moba = timings["moba"].median
        progress(
            f"{label}: MoBA {1e3 * moba:.0f} ms, SDPA {1e3 * base:.0f} ms ({base / moba:.2f}x) in {took:.0f} s"
        )
        del q, k, v
    torch.set_num_threads(s.threads[0])
    return rows, skipped


# ------------------------------------------------------------------------------------------ memory

_MEMORY_POINT = "--memory-point"


def _memory_point(spec: dict) -> float:
    """Peak extra MiB of one call in this (fresh) process: what :func:`run_memory` spawns."""
    from moba_attn import moba_attention

    torch.set_num_threads(1)
    meter = PeakMemory(torch.device("cpu"))
    grad = spec["mode"] != "forward"
    q, k, v = _inputs(spec["T"], spec["hq"], spec["hkv"], spec["d"], grad=grad)

    def call():
        if spec["contender"] == "sdpa":
            o = _sdpa(q, k, v)
        else:
            o = moba_attention(q=q, k=k, v=v, block_size=spec["block_size"], topk=spec["topk"])
        if grad:
            o.float().sum().backward()
        return o

    if grad:
        return meter.measure(call)
    with torch.no_grad():
        return meter.measure(call)


def run_memory(s: EffSettings, progress, over) -> tuple[list[dict], list[str]]:
    rows: list[dict] = []
    skipped: list[str] = []
    hq, hkv = s.heads[0]
    for t in s.memory_lengths:
        covering = -(-t // s.block_size)
        for mode in s.memory_modes:
            for contender, topk in (
                ("sdpa", 0),
                ("moba", s.topk),
                (f"moba topk={covering} (covers T)", covering),
            ):
                label = f"memory {mode} T={t} {contender}"
                if over(0.0):
                    skipped.append(label)
                    continue
                spec = dict(mode=mode, T=t, hq=hq, hkv=hkv, d=s.head_dim, block_size=s.block_size,
                            topk=topk, contender="sdpa" if contender == "sdpa" else "moba")  # fmt: skip
                started = time.perf_counter()
                out = subprocess.run(
                    [sys.executable, __file__, _MEMORY_POINT, json.dumps(spec)],
                    capture_output=True, text=True, check=True, timeout=1800,
                )  # fmt: skip
                mib = float(out.stdout.strip().splitlines()[-1])
                rows.append(dict(mode=mode, T=t, heads=f"{hq}/{hkv}", contender=contender, peak_mib=mib,
                                 seconds=time.perf_counter() - started))  # fmt: skip
                progress(f"{label}: {mib:.0f} MiB")
    for r in rows:
        sdpa = next(
            x for x in rows if x["mode"] == r["mode"] and x["T"] == r["T"] and x["contender"] == "sdpa"
        )
        r["vs_sdpa"] = r["peak_mib"] / sdpa["peak_mib"] if sdpa["peak_mib"] > 0 else float("nan")
    return rows, skipped


# ------------------------------------------------------------------------------------------ decode


class _Attn(torch.nn.Module):
    """Stand-in for a transformers attention module: what the attention functions read from it."""

    is_causal = True

    def __init__(self) -> None:
        super().__init__()
        self.layer_idx = 0
        self.training = False


def _decode_point(
    s: EffSettings, t: int, b: int, fn: Any, module: torch.nn.Module
) -> dict[str, benchkit.Timing]:
    """Time one decode step at cached length ``t``, batch ``b``: the op and the attention functions."""
    from transformers.cache_utils import DynamicLayer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from moba_attn import KeyBlockMeans, moba_attention
    from moba_attn.hf_cache import MoBACacheLayer

    hq, hkv = s.heads[0]
    d, bs = s.head_dim, s.block_size
    scale = d**-0.5
    g = torch.Generator().manual_seed(t + b)
    kc, vc = (torch.randn(b, hkv, t, d, generator=g) for _ in range(2))  # the cache, [B, H, S, D]
    q = torch.randn(b, hq, 1, d, generator=g)
    # the op on a contiguous packed cache [B * S, H, D], with running block means
    kp, vp = (x.transpose(1, 2).reshape(b * t, hkv, d).contiguous() for x in (kc, vc))
    cu_k = torch.arange(b + 1, dtype=torch.int32) * t
    cu_q = torch.arange(b + 1, dtype=torch.int32)
    means = KeyBlockMeans.from_keys(kp, bs, cu_k)
    qp = q[:, :, 0].contiguous()
    # transformers' cache layers, filled with the same keys
    moba_layer, sdpa_layer = MoBACacheLayer(), DynamicLayer()
    mk, mv = moba_layer.update(kc[:, :, :-1].clone(), vc[:, :, :-1].clone())
    mk, mv = moba_layer.update(kc[:, :, -1:], vc[:, :, -1:])
    sk, sv = sdpa_layer.update(kc.clone(), vc.clone())
    with torch.no_grad():
        fn(module, q, mk, mv, None, scaling=scale)  # folds the keys into the layer's running means
        contenders = {
            "sdpa op": lambda: F.scaled_dot_product_attention(q, kc, vc, enable_gqa=hq != hkv),
            "moba op": lambda: moba_attention(q=qp, k=kp, v=vp, cu_seqlens=cu_q, cu_seqlens_k=cu_k,
                                              block_size=bs, topk=s.topk, block_means=means),
            "sdpa attention fn": lambda: sdpa_attention_forward(module, q, sk, sv, None, scaling=scale),
            "MoBAAttention": lambda: fn(module, q, mk, mv, None, scaling=scale),
        }  # fmt: skip
        return benchkit.time_interleaved(contenders, repeats=max(7, s.repeats), warmup=2)


def run_decode(s: EffSettings, progress, over) -> tuple[list[dict], list[str]]:
    """Per-token ms of the op and of the attention functions, one layer, 1 thread."""
    from moba_attn import MoBAAttention, MoBAConfig

    torch.set_num_threads(1)
    hq, hkv = s.heads[0]
    d, bs = s.head_dim, s.block_size
    rows: list[dict] = []
    skipped: list[str] = []
    fn = MoBAAttention(MoBAConfig(block_size=bs, topk=s.topk))
    module = _Attn()
    for t in s.decode_lengths:
        for b in s.decode_batches:
            label = f"decode S={t} B={b}"
            if over(0.0):
                skipped.append(label)
                continue
            timings = _decode_point(s, t, b, fn, module)
            for level, (sd, mb) in {
                "op": ("sdpa op", "moba op"),
                "attention fn": ("sdpa attention fn", "MoBAAttention"),
            }.items():
                rows.append(dict(level=level, S=t, B=b, heads=f"{hq}/{hkv}", sdpa_ms=1e3 * timings[sd].median,
                                 moba_ms=1e3 * timings[mb].median, speedup=timings[sd].median / timings[mb].median,
                                 ideal=ideal_ratio(t, bs, s.topk, d, decode=True)))  # fmt: skip
            progress(
                f"{label}: op {rows[-2]['moba_ms']:.2f} vs {rows[-2]['sdpa_ms']:.2f} ms, "
                f"MoBAAttention {rows[-1]['moba_ms']:.2f} vs {rows[-1]['sdpa_ms']:.2f} ms"
            )
    return rows, skipped


def run_generate(s: EffSettings, progress, over) -> tuple[list[dict], list[str], dict]:
    """generate() tokens/s of a small random Llama from the same prefilled cache: MoBA vs SDPA."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from moba_attn import MoBAConfig, register_moba, set_moba_config
    from moba_attn.hf_cache import MoBACache

    torch.set_num_threads(1)
    hq, hkv = s.heads[0]
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=hq * s.head_dim, intermediate_size=2 * hq * s.head_dim,
        num_hidden_layers=s.model_layers, num_attention_heads=hq, num_key_value_heads=hkv,
        max_position_embeddings=2 * max(s.generate_lengths), tie_word_embeddings=True,
    )  # fmt: skip
    register_moba()
    torch.manual_seed(0)
    # one config object each: _from_config keeps the object, so a shared one would switch both to MoBA
    sdpa_model = LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    moba_model = LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="moba").eval()
    if sdpa_model.config._attn_implementation != "sdpa":
        raise RuntimeError("efficiency: the SDPA model does not run SDPA")
    moba_model.load_state_dict(sdpa_model.state_dict())
    set_moba_config(moba_model, MoBAConfig(block_size=s.block_size, topk=s.topk))
    model_info = dict(layers=s.model_layers, hidden=cfg.hidden_size, heads=f"{hq}/{hkv}", head_dim=s.head_dim,
                      params=sum(p.numel() for p in sdpa_model.parameters()))  # fmt: skip
    rows: list[dict] = []
    skipped: list[str] = []
    n = s.generate_tokens
    for t in s.generate_lengths:
        for b in s.generate_batches:
            label = f"generate S={t} B={b}"
            if over(0.0):
                skipped.append(label)
                continue
            ids = torch.randint(
                1, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(t)
            )  # no pad id (0)
            started = time.perf_counter()
            prefilled = MoBACache(config=cfg)
            with torch.no_grad():  # the prompt but its last token, with MoBA (fast); both decode from it
                moba_model(ids[:, :-1], past_key_values=prefilled, use_cache=True)
            prefill_s = time.perf_counter() - started
            dense = DynamicCache(config=cfg)
            for i, layer in enumerate(prefilled.layers):
                dense.update(layer.keys.clone(), layer.values.clone(), i)

            # interleaved repeats; each copies the prefilled cache first, outside the timed call
            # SDPA twice: with transformers' DynamicCache (a torch.cat of the cache per layer and step) and
            # with the MoBACache's in-place storage (its block means unused), the strongest dense peer
            runs: dict[str, list[float]] = {"sdpa": [], "sdpa in-place cache": [], "moba": []}
            contenders = (("sdpa", sdpa_model, dense), ("sdpa in-place cache", sdpa_model, prefilled),
                          ("moba", moba_model, prefilled))  # fmt: skip
            for rep in range(4):  # the first round is warm-up
                for name, model, cache in contenders:
                    fresh = copy.deepcopy(cache)
                    with torch.no_grad():
                        t0 = time.perf_counter()
                        model.generate(ids, past_key_values=fresh, max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, pad_token_id=0)  # fmt: skip
                        took = time.perf_counter() - t0
                    if rep:
                        runs[name].append(took)
                    del fresh
            timings = {name: benchkit.summarise(xs) for name, xs in runs.items()}
            sd_dyn, mb = timings["sdpa"].median / n, timings["moba"].median / n
            sd = timings["sdpa in-place cache"].median / n
            best = min(sd, sd_dyn)
            rows.append(dict(S=t, B=b, tokens=n, sdpa_ms_per_token=1e3 * best, moba_ms_per_token=1e3 * mb,
                             sdpa_dynamic_cache_ms_per_token=1e3 * sd_dyn, sdpa_inplace_cache_ms_per_token=1e3 * sd,
                             sdpa_tokens_per_s=b / best, moba_tokens_per_s=b / mb, speedup=best / mb,
                             speedup_vs_sdpa_dynamic_cache=sd_dyn / mb, prefill_s=prefill_s))  # fmt: skip
            progress(
                f"{label}: MoBA {1e3 * mb:.1f} ms/token vs SDPA {1e3 * sd:.1f} (in-place cache) / {1e3 * sd_dyn:.1f} "
                f"(DynamicCache) ms: {best / mb:.2f}x vs the faster"
            )
            del prefilled, dense
    return rows, skipped, model_info


def run_efficiency(s: EffSettings, progress, over) -> dict:
    out: dict[str, Any] = {"settings": asdict(s), "skipped": []}
    for name, fn in (("op", run_op), ("memory", run_memory), ("decode", run_decode)):
        rows, skipped = fn(s, progress, over)
        out[name], out["skipped"] = rows, out["skipped"] + skipped
    rows, skipped, info = run_generate(s, progress, over)
    out["generate"], out["model"], out["skipped"] = rows, info, out["skipped"] + skipped
    return out


def plot_efficiency(eff: dict, out_dir: Path, prefix: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for (mode, heads, threads), marker in zip(
        sorted({(r["mode"], r["heads"], r["threads"]) for r in eff["op"]}), "osd^v<>px*"
    ):
        pts = sorted((r["T"], r["speedup_vs_sdpa"]) for r in eff["op"]
                     if (r["mode"], r["heads"], r["threads"], r["contender"]) == (mode, heads, threads, "moba"))  # fmt: skip
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=f"{mode}, H {heads}, {threads} thr")
    ideal = sorted({(r["T"], r["ideal_speedup"]) for r in eff["op"]})
    if ideal:
        ax.plot(*zip(*ideal), "k--", label="ideal (FLOPs)")
    ax.set(
        xscale="log", xlabel="T (tokens)", ylabel="speedup vs SDPA causal", title="MoBA op (fused CPU path)"
    )
    ax.legend(fontsize=7)
    ax = axes[1]
    mem = eff["memory"]
    labels = [f"{r['mode'][:7]}\n{r['T'] // 1024}K {r['contender'].split(' ')[0]}" for r in mem]
    ax.bar(
        range(len(mem)),
        [r["peak_mib"] for r in mem],
        color=["C0" if r["contender"] == "sdpa" else "C1" for r in mem],
    )
    ax.set_xticks(range(len(mem)), labels, fontsize=6)
    ax.set(ylabel="peak extra MiB (fresh process)", title="memory: SDPA (blue) vs MoBA")
    ax = axes[2]
    for level, marker in (("op", "o"), ("attention fn", "s")):
        for b in sorted({r["B"] for r in eff["decode"]}):
            pts = sorted((r["S"], r["speedup"]) for r in eff["decode"] if r["level"] == level and r["B"] == b)
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=f"{level}, B={b}")
    for b in sorted({r["B"] for r in eff["generate"]}):
        pts = sorted((r["S"], r["speedup"]) for r in eff["generate"] if r["B"] == b)
        if pts:
            ax.plot(*zip(*pts), marker="*", markersize=10, label=f"generate(), B={b}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set(
        xscale="log", xlabel="cached context S", ylabel="speedup vs SDPA per token", title="decode, 1 thread"
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out_dir) / f"{prefix}-efficiency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == _MEMORY_POINT:
    print(_memory_point(json.loads(sys.argv[2])))
