"""Training efficiency, Muon vs AdamW: a small GPT on the Python standard library as a byte-level corpus.

The corpus is the running interpreter's stdlib ``*.py`` files (no site-packages), read as bytes
(vocabulary 256), sorted by path; validation = files with ``zlib.crc32(relative path) % 10 == 0``.
Both optimizers see the same batches (same seed), the same model initialisation and token budget, a
10-step linear warm-up then a constant learning rate (so a longer run's curve extends a shorter one's,
and "steps AdamW needs to reach Muon's final loss" can be read off one AdamW run), weight decay 0.1.
Muon follows Moonlight (arXiv 2502.16982): AdamW's lr and wd reused, embeddings/head/norms/biases on
AdamW via ``muon_opt.param_groups``.
"""

from __future__ import annotations

import math
import statistics
import sys
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import benchkit
import torch
from torch import Tensor, nn

import muon_opt


@dataclass
class TrainSettings:
    layers: int = 4
    d_model: int = 128
    heads: int = 4
    context: int = 128
    batch: int = 16
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)  # wide enough that neither best is at an edge
    sweep_steps: int = 100
    muon_steps: int = 200
    adamw_steps: int = 400  # AdamW runs longer so the steps it needs to match Muon can be read off
    seeds: tuple[int, ...] = (0, 1, 2)
    weight_decay: float = 0.1
    eval_every: int = 25
    eval_batches: int = 8
    warmup: int = 10


@dataclass
class Corpus:
    train: Tensor
    val: Tensor
    files: int
    python: str = field(default_factory=lambda: sys.version.split()[0])


def load_corpus() -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    train, val = bytearray(), bytearray()
    for p in paths:
        rel = p.relative_to(root).as_posix()
        (val if zlib.crc32(rel.encode()) % 10 == 0 else train).extend(p.read_bytes())
    return Corpus(
        train=torch.frombuffer(train, dtype=torch.uint8),
        val=torch.frombuffer(val, dtype=torch.uint8),
        files=len(paths),
    )


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.out(nn.functional.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """nanoGPT-shaped byte-level LM with a tied output head."""

    def __init__(self, s: TrainSettings) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(256, s.d_model), nn.Embedding(s.context, s.d_model)
        self.blocks = nn.ModuleList(Block(s.d_model, s.heads) for _ in range(s.layers))
        self.ln_f = nn.LayerNorm(s.d_model)
        self.lm_head = nn.Linear(s.d_model, 256, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.ndim == 2:
                nn.init.normal_(
                    p,
                    std=0.02
                    / (math.sqrt(2 * s.layers) if name.endswith(("proj.weight", "out.weight")) else 1),
                )
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _windows(data: Tensor, starts: Tensor, T: int, device: torch.device) -> tuple[Tensor, Tensor]:
    idx = starts[:, None] + torch.arange(T + 1)
    chunk = data[idx].to(device=device, dtype=torch.long)
    return chunk[:, :-1], chunk[:, 1:]


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


@torch.no_grad()
def _eval_bpb(model: nn.Module, corpus: Corpus, s: TrainSettings, device: torch.device) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1234)  # the same validation windows for every run
    starts = torch.randint(0, len(corpus.val) - s.context - 1, (s.eval_batches, s.batch), generator=gen)
    total = sum(_loss(model, *_windows(corpus.val, st, s.context, device)).item() for st in starts)
    model.train()
    return total / s.eval_batches / math.log(2)


def train(opt_name: str, lr: float, steps: int, seed: int, corpus: Corpus, s: TrainSettings,
          device: torch.device) -> list[tuple[int, float]]:  # fmt: skip
    """One run; returns ``[(step, validation bits per byte)]`` every ``eval_every`` steps and at the end."""
    torch.manual_seed(seed)
    model = GPT(s).to(device)
    if opt_name == "muon":
        opt = muon_opt.Muon(muon_opt.param_groups(model), lr=lr, weight_decay=s.weight_decay)
    else:
        opt = torch.optim.AdamW(
            model.parameters(), lr=lr, weight_decay=s.weight_decay, betas=(0.9, 0.95), foreach=True
        )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / s.warmup))
    gen = torch.Generator().manual_seed(10_000 + seed)
    curve = []
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(corpus.train) - s.context - 1, (s.batch,), generator=gen)
        loss = _loss(model, *_windows(corpus.train, starts, s.context, device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % s.eval_every == 0 or step == steps:
            curve.append((step, _eval_bpb(model, corpus, s, device)))
    return curve


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step at which the (linearly interpolated) curve is at or below ``target``; None if never."""
    prev = (0, float("inf"))
    for step, value in curve:
        if value <= target:
            if math.isinf(prev[1]):
                return float(step)
            return prev[0] + (step - prev[0]) * (prev[1] - target) / (prev[1] - value)
        prev = (step, value)
    return None


def ratio_by_muon_step(
    muon: list[list[tuple[int, float]]], adamw: list[list[tuple[int, float]]]
) -> dict[int, list[float | None]]:
    """For every evaluated Muon step k, per seed: steps AdamW needs to reach Muon's step-k loss, over k.

    None where AdamW's run never gets there. Seeds pair Muon and AdamW runs with the same data order.
    """
    out: dict[int, list[float | None]] = {}
    for m_curve, a_curve in zip(muon, adamw, strict=True):
        for step, value in m_curve:
            need = steps_to_reach(a_curve, value)
            out.setdefault(step, []).append(need / step if need is not None else None)
    return out


def _at(curve: list[tuple[int, float]], step: int) -> float:
    return next(v for s_, v in curve if s_ == step)


def run(
    s: TrainSettings, device: torch.device, outdir: Path, prefix: str
) -> tuple[list[benchkit.Section], dict]:
    corpus = load_corpus()
    benchkit.progress(
        f"corpus: {corpus.files} files, train {len(corpus.train):,} B, val {len(corpus.val):,} B"
    )

    # 1. Learning-rate sweep, one seed, shorter runs.
    sweep: dict[str, dict[float, float]] = {"adamw": {}, "muon": {}}
    for lr in s.lrs:
        for name in ("adamw", "muon"):
            benchkit.progress(f"sweep {name} lr={lr:g} ({s.sweep_steps} steps)")
            sweep[name][lr] = train(name, lr, s.sweep_steps, 0, corpus, s, device)[-1][1]
    best = {name: min(sweep[name], key=sweep[name].get) for name in sweep}

    # 2. Seeds at each optimizer's best lr: Muon for muon_steps, AdamW for adamw_steps.
    curves: dict[str, list[list[tuple[int, float]]]] = {"adamw": [], "muon": []}
    for seed in s.seeds:
        for name, steps in (("muon", s.muon_steps), ("adamw", s.adamw_steps)):
            benchkit.progress(f"seed {seed}: {name} lr={best[name]:g} ({steps} steps)")
            curves[name].append(train(name, best[name], steps, seed, corpus, s, device))

    reverse, muon_final, adamw_same = [], [], []
    for m_curve, a_curve in zip(curves["muon"], curves["adamw"], strict=True):
        muon_final.append(m_curve[-1][1])
        adamw_same.append(_at(a_curve, s.muon_steps))
        need_m = steps_to_reach(m_curve, _at(a_curve, s.muon_steps))
        reverse.append(s.muon_steps / need_m if need_m else None)
    by_step = ratio_by_muon_step(curves["muon"], curves["adamw"])
    ratios = by_step[s.muon_steps]  # steps AdamW needs to reach Muon's final loss, over Muon's steps
    reached = [step for step, xs in by_step.items() if all(x is not None for x in xs)]
    headline = max(reached) if reached else None

    def fmt_ratio(xs: list[float | None], missing: str) -> str:
        shown = [f"{x:.2f}" if x is not None else missing for x in xs]
        known = [x for x in xs if x is not None]
        if len(known) == len(xs) and len(xs) > 1:
            return (
                f"{statistics.median(known):.2f} (seeds: {', '.join(shown)}; mean {statistics.mean(known):.2f} "
                f"+- {statistics.stdev(known):.2f} sd, range {min(known):.2f}-{max(known):.2f})"
            )
        return f"seeds: {', '.join(shown)}"

    cap = s.adamw_steps / s.muon_steps
    summary = {
        "best_lr": best,
        "sweep_bpb": {k: {str(lr): v for lr, v in d.items()} for k, d in sweep.items()},
        "muon_final_bpb": muon_final,
        "adamw_bpb_at_same_steps": adamw_same,
        "steps_ratio_adamw_to_reach_muon": ratios,
        "steps_ratio_by_muon_step": {str(k): v for k, v in by_step.items()},
        "headline_muon_step": headline,
        "reverse_ratio": reverse,
        "curves": curves,
        "python": corpus.python,
        "corpus_files": corpus.files,
    }
    muon_at_adamw_lr = sweep["muon"][best["adamw"]]
    transfer = (
        f"AdamW's best lr {best['adamw']:g} {'is' if best['adamw'] == best['muon'] else 'is not'} Muon's best "
        f"({best['muon']:g}); Muon at AdamW's best lr reaches {muon_at_adamw_lr:.3f} bpb vs AdamW's "
        f"{sweep['adamw'][best['adamw']]:.3f} at the same lr and steps "
        f"({'better' if muon_at_adamw_lr < sweep['adamw'][best['adamw']] else 'not better'}). "
        f"Weight decay {s.weight_decay} for both (not swept)."
    )
    mean = statistics.mean
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    rows_sweep = [[f"{lr:g}", round(sweep["adamw"][lr], 3), round(sweep["muon"][lr], 3)] for lr in s.lrs]
    sections = [
        benchkit.Section(
            title="Training efficiency: learning-rate sweep (validation bits per byte)",
            description=(
                f"Small GPT ({s.layers} layers, d_model {s.d_model}, {s.heads} heads, context {s.context}, batch "
                f"{s.batch}) on the Python {corpus.python} standard library as bytes ({corpus.files} files), "
                f"{s.sweep_steps} steps, seed 0, weight decay {s.weight_decay} for both."
            ),
            columns=["lr", "AdamW bpb", "Muon bpb"],
            rows=rows_sweep,
            notes=[transfer],
        ),
        benchkit.Section(
            title="Training efficiency: Muon vs AdamW at each one's best lr",
            description=(
                f"{len(s.seeds)} seeds. Muon trains {s.muon_steps} steps, AdamW {s.adamw_steps}. Steps ratio = "
                f"steps AdamW needs to reach Muon's step-{s.muon_steps} validation loss / {s.muon_steps} (the "
                "paper's ~2x compute-efficiency claim; '>x' = not reached within AdamW's run). Reverse = "
                f"{s.muon_steps} / steps Muon needs to reach AdamW's step-{s.muon_steps} loss."
            ),
            columns=["quantity", "value"],
            rows=[
                ["Muon lr / AdamW lr", f"{best['muon']:g} / {best['adamw']:g}"],
                [f"Muon bpb at step {s.muon_steps}", f"{mean(muon_final):.3f} +- {sd(muon_final):.3f}"],
                [f"AdamW bpb at step {s.muon_steps}", f"{mean(adamw_same):.3f} +- {sd(adamw_same):.3f}"],
                [
                    f"AdamW bpb at step {s.adamw_steps}",
                    f"{mean([c[-1][1] for c in curves['adamw']]):.3f} +- {sd([c[-1][1] for c in curves['adamw']]):.3f}",
                ],
                [
                    "steps ratio (AdamW steps to reach Muon's final loss)"
                    + (" (headline)" if headline == s.muon_steps else ""),
                    fmt_ratio(ratios, f">{cap:.2f}"),
                ],
                *[
                    [
                        f"steps ratio at Muon step {step}" + (" (headline)" if step == headline else ""),
                        fmt_ratio(xs, f">{s.adamw_steps / step:.2f}"),
                    ]
                    for step, xs in by_step.items()
                    if step != s.muon_steps and (step % (2 * s.eval_every) == 0 or step == headline)
                ],
                ["reverse ratio", fmt_ratio(reverse, "not reached")],
            ],
            notes=[
                "The learning rate is constant after warm-up, so Muon's loss at step k of a longer run is its "
                "loss after k steps; 'steps ratio at Muon step k' = steps AdamW needs to reach Muon's step-k "
                "loss / k. The headline is the largest k at which every seed's AdamW run reaches Muon's loss."
            ],
            plots=_plot(curves, sweep, by_step, s, outdir, prefix),
        ),
    ]
    return sections, summary


def _plot(curves: dict, sweep: dict, by_step: dict, s: TrainSettings, outdir: Path, prefix: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4))
    for name, color in (("muon", "tab:red"), ("adamw", "tab:blue")):
        for i, curve in enumerate(curves[name]):
            steps, vals = zip(*curve, strict=True)
            ax1.plot(steps, vals, color=color, alpha=0.7, label=f"{name} (seeds)" if i == 0 else None)
        ax2.plot(
            [str(lr) for lr in s.lrs], [sweep[name][lr] for lr in s.lrs], marker="o", color=color, label=name
        )
    ax1.set_xlabel("step")
    ax1.set_ylabel("validation bits per byte")
    ax1.set_ylim(top=min(5.0, ax1.get_ylim()[1]))
    ax1.set_title("Validation loss, each optimizer at its best lr")
    ax1.legend()
    ax2.set_xlabel("learning rate")
    ax2.set_ylabel(f"bpb after {s.sweep_steps} steps")
    ax2.set_title("Learning-rate sweep (seed 0)")
    ax2.legend()
    n_seeds = len(curves["muon"])
    for i in range(n_seeds):
        pts = [(k, xs[i]) for k, xs in by_step.items() if xs[i] is not None]
        if pts:
            ax3.plot(*zip(*pts, strict=True), marker="o", alpha=0.7, label=f"seed {s.seeds[i]}")
    ax3.axhline(2.0, color="grey", linestyle="--", label="paper: ~2x")
    ax3.set_xlabel("Muon step k")
    ax3.set_ylabel("AdamW steps to reach Muon's step-k loss / k")
    ax3.set_title("Steps ratio (missing = AdamW never got there)")
    ax3.legend()
    fig.tight_layout()
    name = f"{prefix}-training.png"
    fig.savefig(outdir / name, dpi=120)
    plt.close(fig)
    return [name]
