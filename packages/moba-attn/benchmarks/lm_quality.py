"""Quality at small scale: a tiny byte-level Llama trained with full attention, MoBA and a hybrid.

Corpus: the running interpreter's standard-library ``*.py`` files as bytes (vocabulary 256), sorted by
path; validation = files with ``zlib.crc32(relative path) % 10 == 0``. Text nobody here wrote, and
identical for every contender. Models are transformers ``LlamaForCausalLM`` run through this package's
``attn_implementation="moba"``, so the benchmark exercises the drop-in exactly as a user would.

Reported, per variant and seed (seeds are paired: same init, same batches): validation bits per byte
over whole windows and over the last quarter of positions (the paper's trailing-token loss, section
3.1, where MoBA drops the most keys), plus the cross-evaluations the paper's "seamless transition"
claim is about: the full-attention model evaluated with MoBA switched on, and the MoBA model with full.
"""

from __future__ import annotations

import math
import sysconfig
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moba_attn.hf import MoBAConfig, register_moba, set_moba_config, use_moba


@dataclass
class LMSettings:
    context: int = 512
    batch: int = 8
    steps: int = 120
    lr: float = 2e-3
    warmup: int = 20
    hidden: int = 128
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    block_size: int = 64
    topk: int = 3
    eval_windows: int = 48
    seeds: tuple[int, ...] = (0, 1)


def load_corpus() -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val = [], []
    n_files = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        n_files += 1
        (val if zlib.crc32(rel.encode()) % 10 == 0 else train).append(data)
    tr = torch.frombuffer(bytearray(b"".join(train)), dtype=torch.uint8)
    va = torch.frombuffer(bytearray(b"".join(val)), dtype=torch.uint8)
    info = {"stdlib": str(root), "files": n_files, "train_bytes": tr.numel(), "val_bytes": va.numel()}
    return tr, va, info


def _model(s: LMSettings, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=s.hidden,
        intermediate_size=3 * s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=s.context,
        tie_word_embeddings=True,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def _configure(model: Any, variant: str, s: LMSettings) -> None:
    """variant: "full" (SDPA), "moba", or "hybrid" (MoBA with the last layer on full attention)."""
    if variant == "full":
        use_moba(model, False)
        return
    layers = (-1,) if variant == "hybrid" else ()
    set_moba_config(model, MoBAConfig(block_size=s.block_size, topk=s.topk, full_attention_layers=layers))
    use_moba(model, True)


def _batches(data: torch.Tensor, s: LMSettings, seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - s.context - 1, (n, s.batch), generator=g)
    idx = starts[..., None] + torch.arange(s.context + 1)
    return data[idx].long()


@torch.no_grad()
def evaluate(model: Any, windows: torch.Tensor, s: LMSettings) -> dict[str, float]:
    """Mean bits per byte over all predicted positions and over the last quarter of each window."""
    model.eval()
    total = torch.zeros(s.context)
    for i in range(0, windows.shape[0], s.batch):
        w = windows[i : i + s.batch]
        logits = model(w[:, :-1]).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none")
        total += nll.sum(0)
    per_pos = total / windows.shape[0] / math.log(2)
    q = s.context // 4
    model.train()
    return {
        "bpb": per_pos.mean().item(),
        "bpb_last_quarter": per_pos[-q:].mean().item(),
        "bpb_first_quarter": per_pos[:q].mean().item(),
    }


def train(model: Any, data: torch.Tensor, s: LMSettings, seed: int, log: Callable[[str], None]) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_at(step: int) -> float:
        if step < s.warmup:
            return (step + 1) / s.warmup
        p = (step - s.warmup) / max(1, s.steps - s.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    batches = _batches(data, s, 1000 + seed, s.steps)  # paired: every variant sees the same batches
    model.train()
    t0 = time.perf_counter()
    for step in range(s.steps):
        b = batches[step]
        loss = _loss(model, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == s.steps - 1:
            log(f"  step {step:4d} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)")
    return time.perf_counter() - t0


def _loss(model: Any, b: torch.Tensor) -> torch.Tensor:
    logits = model(b[:, :-1]).logits
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), b[:, 1:].reshape(-1)
    )


def run_quality(
    s: LMSettings, log: Callable[[str], None], over: Callable[[float], bool] = lambda cost: False
) -> dict[str, Any]:
    """Train and evaluate every variant for each paired seed; a seed that would pass the section's
    budget (``over(cost of the last seed)``) is not started, and the seeds done are reported."""
    register_moba()
    train_data, val_data, corpus = load_corpus()
    log(f"corpus: {corpus}")
    windows = _batches(val_data, LMSettings(**{**s.__dict__, "batch": 1}), 7, s.eval_windows)[:, 0]
    results: list[dict[str, Any]] = []
    variants = ("full", "moba", "hybrid")
    seeds_done: list[int] = []
    last_seed_s = 0.0
    for seed in s.seeds:
        if seeds_done and over(last_seed_s):
            log(
                f"stopping before seed {seed}: another seed ({last_seed_s:.0f}s) would pass the section budget"
            )
            break
        t_seed = time.perf_counter()
        for variant in variants:
            model = _model(s, seed)
            _configure(model, variant, s)
            log(f"train {variant} seed {seed}")
            secs = train(model, train_data, s, seed, log)
            row = {
                "variant": variant,
                "seed": seed,
                "train_s": secs,
                "eval_with": variant,
                **evaluate(model, windows, s),
            }
            results.append(row)
            cross = {"full": "moba", "moba": "full"}.get(variant)
            if cross is not None:  # the seamless-transition check: same weights, other attention
                _configure(model, cross, s)
                results.append(
                    {
                        "variant": variant,
                        "seed": seed,
                        "train_s": 0.0,
                        "eval_with": cross,
                        **evaluate(model, windows, s),
                    }
                )
            del model
        seeds_done.append(seed)
        last_seed_s = time.perf_counter() - t_seed
    return {"corpus": corpus, "rows": results, "params": _param_count(s), "seeds_done": seeds_done}


def _param_count(s: LMSettings) -> int:
    return sum(p.numel() for p in _model(s, 0).parameters())


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (trained, evaluated) pair: mean over seeds, and the paired ratio to full attention."""
    out = []
    keys = list(dict.fromkeys((r["variant"], r["eval_with"]) for r in rows))
    base = {
        (r["seed"], m): r[m]
        for r in rows
        if r["variant"] == "full" and r["eval_with"] == "full"
        for m in ("bpb", "bpb_last_quarter")
    }
    for variant, ev in keys:
        sub = [r for r in rows if r["variant"] == variant and r["eval_with"] == ev]
        rec: dict[str, Any] = {"trained": variant, "evaluated": ev, "seeds": len(sub)}
        for m in ("bpb", "bpb_last_quarter", "bpb_first_quarter"):
            xs = [r[m] for r in sub]
            rec[m] = sum(xs) / len(xs)
            rec[m + "_spread"] = (max(xs) - min(xs)) / 2 if len(xs) > 1 else float("nan")
        for m in ("bpb", "bpb_last_quarter"):
            ratios = [r[m] / base[(r["seed"], m)] - 1 for r in sub]
            rec[m + "_vs_full_pct"] = 100 * sum(ratios) / len(ratios)
            rec[m + "_vs_full_pct_range"] = [100 * min(ratios), 100 * max(ratios)]
        out.append(rec)
    return out


def plot_quality(summary: list[dict[str, Any]], out_dir: Path, prefix: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['trained']}\n(eval {r['evaluated']})" for r in summary]
    x = range(len(summary))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    w = 0.38
    for off, m, name in ((-w / 2, "bpb", "all positions"), (w / 2, "bpb_last_quarter", "last quarter")):
        ys = [r[m] for r in summary]
        errs = [0 if math.isnan(r[m + "_spread"]) else r[m + "_spread"] for r in summary]
        ax.bar([i + off for i in x], ys, w, yerr=errs, capsize=3, label=name)
    lo = min(min(r["bpb"], r["bpb_last_quarter"]) for r in summary)
    hi = max(max(r["bpb"], r["bpb_last_quarter"]) for r in summary)
    ax.set_ylim(lo - 0.15 * (hi - lo) - 0.02, hi + 0.15 * (hi - lo) + 0.02)
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("validation bits per byte (lower is better)")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fname = f"{prefix}-quality.png"
    fig.savefig(out_dir / fname, dpi=110)
    plt.close(fig)
    return fname
