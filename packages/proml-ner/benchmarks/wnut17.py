"""WNUT-17 cross-type few-shot benchmark: does ProML's training help on real, human-annotated text?

    python benchmarks/wnut17.py --steps 80 --eval-every 20 --test-episodes 12 --seeds 0 1 2 --out wnut.json

Protocol (tag extension / cross-type, as in the OntoNotes setting of Das et al. 2022 and ProML Sec. 4.4):
the six WNUT-17 types are split three ways; in each split two types are held out. Training episodes are
2-way 2~4-shot episodes over the four other types, drawn by the package's Few-NERD sampler
(:func:`proml_ner.sampler.sample_episodes`) from the *train* split; sentences that hold a held-out type
are never drawn (the sampler only takes sentences whose types are all in the episode). Test episodes are
2-way 2~4-shot episodes over the two held-out types from the *test* split. ProML, ProtoBERT and NNShot
train on the same episodes in the same order with the package defaults (``TrainConfig()``: lr 3e-5 for
encoder and head, 10 % warm-up); all are scored on the same test episodes at every checkpoint, step 0
being the untrained encoder. For ProML every checkpoint is also decoded under each inference setting
(space x k x lambda x Viterbi) from one encoding of the episode.

Reported per method and setting: pooled micro F1 (Few-NERD's protocol), the mean F1 over support sets
(episodes), and Few-NERD's flattened variant (an episode's query sentences joined end to end). Spread:
each seed's figure pools its three type splits; mean and sample std are over seeds.

Data: ``benchmarks/data/wnut17`` (WNUT-17 Emerging Entities, CC-BY 4.0, notice in its README).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from proml_ner.baselines import PrototypeNer
from proml_ner.formats import ReadReport, Sentence, read_conll
from proml_ner.metrics import EntityCounts, entity_spans, mean_std, score, score_flattened
from proml_ner.model import ProML, ProMLConfig
from proml_ner.pipeline import ProMLNer
from proml_ner.sampler import sample_episodes
from proml_ner.train import TrainConfig, evaluate, seed_everything, train

DATA = Path(__file__).resolve().parent / "data" / "wnut17"
FILES = {"train": "wnut17train.conll", "dev": "emerging.dev.conll", "test": "emerging.test.annotated"}
TYPES = ("corporation", "creative-work", "group", "location", "person", "product")
# held-out (test) types of each split; every type is held out once
SPLITS: dict[str, tuple[str, ...]] = {
    "A": ("person", "product"),
    "B": ("creative-work", "location"),
    "C": ("corporation", "group"),
}
N_WAY, K_SHOT = 2, 2
METHODS = ("proml", "protobert", "nnshot")
NAMES = {"proml": "ProML", "protobert": "ProtoBERT", "nnshot": "NNShot"}
SPACES = ("encoder", "gaussian")
KS = ("1", "shots")
LAMBDAS = (0.3, 0.5, 0.7)  # the authors' grid
VITERBI = (False, True)
# ProML is trained with the authors' lambda; the sweep varies lambda at inference only
TRAIN_LAMBDA = 0.7


def settings() -> list[str]:
    return [
        f"{s}/k={k}/lambda={lam}/{'viterbi' if v else 'argmax'}"
        for s in SPACES
        for k in KS
        for lam in LAMBDAS
        for v in VITERBI
    ]


def read_split(which: str) -> tuple[list[Sentence], ReadReport]:
    rep = ReadReport()
    path = DATA / FILES[which]
    if not path.is_file():
        raise SystemExit(f"wnut17: {path} is missing; the benchmark data ship in benchmarks/data/wnut17")
    return read_conll(path, report=rep), rep


@dataclass
class Tally:
    """Counts of one (method/setting, checkpoint, seed): per episode, and flattened per episode."""

    per_episode: list[EntityCounts] = field(default_factory=list)
    flattened: EntityCounts = field(default_factory=EntityCounts)

    def add(self, gold: list[list[str]], pred: list[list[str]]) -> None:
        self.per_episode.append(score(gold, pred))
        self.flattened += score_flattened(gold, pred)

    def pooled(self) -> EntityCounts:
        out = EntityCounts()
        for c in self.per_episode:
            out += c
        return out

    def mean_f1(self) -> float:
        return sum(c.f1 for c in self.per_episode) / max(1, len(self.per_episode))


def build(method: str, encoder: str, model_config: dict | None = None):
    if method == "proml":
        return ProML.from_encoder(encoder, **{"fusion_lambda": TRAIN_LAMBDA, **(model_config or {})})
    return PrototypeNer.from_encoder(encoder, "proto" if method == "protobert" else "nnshot")


def _setting_args(name: str) -> dict:
    space, k, lam, dec = name.split("/")
    return {
        "space": space,
        "top_k": "shots" if k == "k=shots" else int(k.split("=")[1]),
        "fusion_lambda": float(lam.split("=")[1]),
        "viterbi": dec == "viterbi",
    }


def score_checkpoint(
    method: str, model, test_eps, tallies: dict, step: int, seed: int, full_sweep: bool = True
) -> None:
    """Score one checkpoint; ProML under every setting (``full_sweep``) or every argmax setting (the
    Viterbi pass is a Python loop per word, too slow for every checkpoint on a CPU)."""
    gold = [[s.labels for s in ep.query] for ep in test_eps]
    if method != "proml":
        res = evaluate(model, test_eps)
        t = tallies.setdefault((NAMES[method], step), {}).setdefault(seed, Tally())
        for g, p in zip(gold, res.predictions):
            t.add(g, p)
        return
    model.eval()
    views = [model.episode_views(ep) for ep in test_eps]
    for name in settings():
        if not full_sweep and name.endswith("/viterbi"):
            continue
        t = tallies.setdefault((f"ProML {name}", step), {}).setdefault(seed, Tally())
        kw = _setting_args(name)
        for g, v in zip(gold, views):
            t.add(g, model.predict_views(v, **kw))


def run(
    encoder: str,
    steps: int,
    eval_every: int,
    test_episodes: int,
    seeds: list[int],
    splits: list[str],
    methods: tuple[str, ...] = METHODS,
    over: Callable[[float], bool] | None = None,
    progress: Callable[[str], None] | None = None,
    train_config: dict | None = None,
    model_config: dict | None = None,
) -> dict:
    """The whole protocol; returns tallies and provenance. ``over(next_cost)`` (a budget) is asked before
    each (seed, split) run with the slowest run's time so far; runs go seed by seed so a stopped run
    still has every split of the seeds it finished."""
    say = progress or (lambda m: None)
    train_corpus, train_rep = read_split("train")
    test_corpus, test_rep = read_split("test")
    tallies: dict = {}
    done, slowest, stopped = [], 0.0, None
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    for seed in seeds:
        for split in splits:
            if over is not None and done and over(slowest):
                stopped = f"{len(done)} of {len(seeds) * len(splits)} (seed, split) runs fitted the budget"
                break
            t0 = time.perf_counter()
            held = list(SPLITS[split])
            kept = [t for t in TYPES if t not in held]
            train_eps = sample_episodes(train_corpus, N_WAY, K_SHOT, max(steps, 1), seed=seed, types=kept)
            test_eps = sample_episodes(
                test_corpus, N_WAY, K_SHOT, test_episodes, seed=10_000 + seed, types=held
            )
            for method in methods:
                seed_everything(seed)
                model = build(method, encoder, model_config)
                score_checkpoint(method, model, test_eps, tallies, 0, seed)
                if steps:
                    cfg = TrainConfig(steps=steps, eval_every=eval_every, seed=seed, **(train_config or {}))
                    res = train(
                        model,
                        train_eps,
                        config=cfg,
                        checkpoint=lambda s, m=method, mod=model, eps=test_eps, sd=seed: score_checkpoint(
                            m, mod, eps, tallies, s, sd, full_sweep=s == steps
                        ),
                    )
                    seconds[method].append(res.seconds_per_episode)
                say(f"seed {seed} split {split} ({'/'.join(held)} held out): {NAMES[method]} done")
            done.append((seed, split))
            slowest = max(slowest, time.perf_counter() - t0)
        if stopped:
            break
    return {
        "tallies": tallies,
        "runs": done,
        "stopped": stopped,
        "seconds_per_training_episode": {m: sum(v) / len(v) for m, v in seconds.items() if v},
        "reports": {"train": train_rep.summary(), "test": test_rep.summary()},
    }


def summarise(tallies: dict, runs: list) -> dict:
    """(row name, step) -> mean/std over seeds of pooled F1, mean-over-supports F1 and flattened F1."""
    seeds = sorted({s for s, _ in runs})
    out = {}
    for (name, step), by_seed in tallies.items():
        vals = {"pooled": [], "mean_over_supports": [], "flattened": []}
        for s in seeds:
            if s not in by_seed:
                continue
            t = by_seed[s]
            vals["pooled"].append(t.pooled().f1)
            vals["mean_over_supports"].append(t.mean_f1())
            vals["flattened"].append(t.flattened.f1)
        out[(name, step)] = {k: mean_std(v) if v else (float("nan"), 0.0) for k, v in vals.items()}
        out[(name, step)]["per_seed"] = {
            k: dict(zip([s for s in seeds if s in by_seed], v)) for k, v in vals.items()
        }
        out[(name, step)]["seeds"] = len(vals["pooled"])
        out[(name, step)]["episodes"] = sum(len(by_seed[s].per_episode) for s in seeds if s in by_seed)
    return out


# ------------------------------------------------------------------------------------------ predict()
def ten_sentence_support(corpus: list[Sentence], size: int, seed: int) -> list[Sentence]:
    """``size`` train sentences covering every type (greedy cover first, then random sentences with
    entities), from a seeded shuffle."""
    rng = random.Random(seed)
    pool = [s for s in corpus if s.types]
    rng.shuffle(pool)
    chosen, missing = [], set(TYPES)
    for s in pool:
        if s.types & missing:
            chosen.append(s)
            missing -= s.types
        if not missing:
            break
    for s in pool:
        if len(chosen) >= size:
            break
        if s not in chosen:
            chosen.append(s)
    return chosen


def char_spans(sent: Sentence) -> tuple[str, set[tuple[int, int, str]]]:
    """The sentence as text (words joined by single spaces) and its gold entities as character spans."""
    starts, pos = [], 0
    for w in sent.words:
        starts.append(pos)
        pos += len(w) + 1
    text = " ".join(sent.words)
    spans = {(starts[a], starts[b - 1] + len(sent.words[b - 1]), t) for a, b, t in entity_spans(sent.labels)}
    return text, spans


def predict_out_of_the_box(encoder: str, queries: int, seed: int, configs: dict[str, dict]) -> dict:
    """Span F1 of ``ProMLNer.predict`` on WNUT-17 test sentences (as text) with an untrained ProML on the
    plain encoder and a 10-sentence train support, for each ProMLConfig override in ``configs``."""
    train_corpus, _ = read_split("train")
    test_corpus, _ = read_split("test")
    support = ten_sentence_support(train_corpus, 10, seed)
    rng = random.Random(seed + 1)
    sample = rng.sample(test_corpus, min(queries, len(test_corpus)))
    texts, gold = zip(*(char_spans(s) for s in sample))
    out = {}
    for name, over in configs.items():
        torch.manual_seed(seed)
        ner = ProMLNer(ProML.from_encoder(encoder, ProMLConfig(encoder=encoder, **over)))
        index = ner.support(support, labels=list(TYPES))
        pred = ner.predict(list(texts), support=index)
        counts, scores, multi_pred = EntityCounts(), [], 0
        for g, p in zip(gold, pred):
            ps = {(e["start"], e["end"], e["label"]) for e in p}
            counts.gold += len(g)
            counts.pred += len(ps)
            counts.correct += len(g & ps)
            scores += [e["score"] for e in p]
            multi_pred += sum(1 for e in p if " " in e["text"])
        gold_multi = sum(1 for t, g in zip(texts, gold) for a, b, _ in g if " " in t[a:b])
        correct_multi = sum(
            1
            for t, g, p in zip(texts, gold, pred)
            for a, b, lab in g
            if " " in t[a:b] and any((e["start"], e["end"], e["label"]) == (a, b, lab) for e in p)
        )
        out[name] = {
            "f1": counts.f1,
            "precision": counts.precision,
            "recall": counts.recall,
            "predicted": counts.pred,
            "gold": counts.gold,
            "multi_word_predicted": multi_pred,
            "multi_word_gold": gold_multi,
            "multi_word_recall": correct_multi / gold_multi if gold_multi else 0.0,
            "score_min": min(scores) if scores else None,
            "score_max": max(scores) if scores else None,
            "score_std": float(torch.tensor(scores).std()) if len(scores) > 1 else 0.0,
            "config": over,
        }
    return {"support_sentences": len(support), "queries": len(texts), "settings": out}


def main() -> None:
    from fewshot_synthetic import encoder_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--test-episodes", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--encoder", default=None, help="encoder folder (default: the offline MiniLM)")
    ap.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides, e.g. head_lr=1e-3")
    ap.add_argument("--model-set", nargs="*", default=[], help="ProMLConfig overrides, e.g. kl_scale=0.5")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tc = {k: json.loads(v) for k, v in (x.split("=", 1) for x in args.set)}
    res = run(
        args.encoder or encoder_path(),
        args.steps,
        args.eval_every,
        args.test_episodes,
        args.seeds,
        args.splits,
        tuple(args.methods),
        progress=lambda m: print(m, flush=True),
        train_config=tc,
        model_config={k: json.loads(v) for k, v in (x.split("=", 1) for x in args.model_set)},
    )
    summ = summarise(res["tallies"], res["runs"])
    rows = [
        {"row": n, "step": s, **{k: v for k, v in d.items()}} for (n, s), d in sorted(summ.items(), key=str)
    ]
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1))
    for r in rows:
        if r["step"] == args.steps:
            print(f"{r['row']:55s} pooled {r['pooled'][0]:.3f}+-{r['pooled'][1]:.3f}")


if __name__ == "__main__":
    main()
