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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from proml_ner.baselines import PrototypeNer
from proml_ner.formats import ReadReport, Sentence, read_conll
from proml_ner.metrics import EntityCounts, entity_spans, mean_std, score, score_flattened
from proml_ner.model import ProML
from proml_ner.pipeline import PREDICT_SPAN_MERGE, ProMLNer
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
KS = ("1", "shots", "half")  # k = 1, k = the support's K, k = the nearest half of each class
LAMBDAS = (0.3, 0.5, 0.7)  # the authors' grid
# decoders: per-word argmax, argmax + span merging (ratio 0.5), StructShot Viterbi
DECODERS = ("argmax", "merge", "viterbi")
MERGE_RATIO = 0.5
# ProML is trained with the authors' lambda; the sweep varies lambda at inference only
TRAIN_LAMBDA = 0.7


def settings() -> list[str]:
    return [f"{s}/k={k}/lambda={lam}/{d}" for s in SPACES for k in KS for lam in LAMBDAS for d in DECODERS]


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

    def extend(self, other: Tally) -> None:
        """Pool another run's episodes (another split of the same seed) into this one."""
        self.per_episode += other.per_episode
        self.flattened += other.flattened

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
        "top_k": None if k == "k=half" else "shots" if k == "k=shots" else int(k.split("=")[1]),
        "k_fraction": 0.5 if k == "k=half" else None,
        "fusion_lambda": float(lam.split("=")[1]),
        "viterbi": dec == "viterbi",
        "span_merge": MERGE_RATIO if dec == "merge" else 0.0,
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


@dataclass(frozen=True)
class Job:
    """One (seed, split) run of every method: what a worker process needs, all picklable."""

    encoder: str
    seed: int
    split: str
    steps: int
    eval_every: int
    test_episodes: int
    methods: tuple[str, ...]
    train_config: dict
    model_config: dict
    threads: int = 1
    device: str = "cpu"


def run_job(job: Job) -> dict:
    """Train and score every method of one (seed, split) on the same episodes; returns its tallies
    (``(row, step) -> {seed: Tally}``), the training seconds per episode of each method and the wall time.
    A module-level function so that worker processes can run it."""
    t0 = time.perf_counter()
    torch.set_num_threads(job.threads)
    train_corpus, _ = read_split("train")
    test_corpus, _ = read_split("test")
    held = list(SPLITS[job.split])
    kept = [t for t in TYPES if t not in held]
    train_eps = sample_episodes(train_corpus, N_WAY, K_SHOT, max(job.steps, 1), seed=job.seed, types=kept)
    test_eps = sample_episodes(
        test_corpus, N_WAY, K_SHOT, job.test_episodes, seed=10_000 + job.seed, types=held
    )
    tallies: dict = {}
    seconds: dict[str, float] = {}
    for method in job.methods:
        seed_everything(job.seed)
        model = build(method, job.encoder, job.model_config).to(job.device)
        score_checkpoint(method, model, test_eps, tallies, 0, job.seed)
        if job.steps:
            cfg = TrainConfig(steps=job.steps, eval_every=job.eval_every, seed=job.seed, **job.train_config)
            res = train(
                model,
                train_eps,
                config=cfg,
                checkpoint=lambda s, m=method, mod=model: score_checkpoint(
                    m, mod, test_eps, tallies, s, job.seed, full_sweep=s == job.steps
                ),
            )
            seconds[method] = res.seconds_per_episode
    return {
        "seed": job.seed,
        "split": job.split,
        "tallies": tallies,
        "seconds": seconds,
        "wall": time.perf_counter() - t0,
    }


def _merge(into: dict, tallies: dict) -> None:
    """Add one run's tallies to the running ones; a seed's splits pool into one Tally."""
    for key, by_seed in tallies.items():
        for seed, t in by_seed.items():
            into.setdefault(key, {}).setdefault(seed, Tally()).extend(t)


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
    workers: int = 1,
    device: str = "cpu",
) -> dict:
    """The whole protocol; returns tallies and provenance.

    The (seed, split) runs are independent: ``workers`` > 1 runs them in that many processes of one
    torch thread each (on a 2-core CPU two processes do the work of two threads without the OpenMP
    threads' starvation). Runs start seed by seed; ``over(next_cost)`` (a budget) is asked before each
    run starts with the slowest run's wall time so far, and a stopped benchmark keeps only the seeds
    whose every split finished (``runs``), so each seed's figure pools the same splits.
    """
    say = progress or (lambda m: None)
    _, train_rep = read_split("train")
    _, test_rep = read_split("test")
    todo = [
        Job(
            encoder,
            seed,
            split,
            steps,
            eval_every,
            test_episodes,
            tuple(methods),
            dict(train_config or {}),
            dict(model_config or {}),
            device=device,
        )
        for seed in seeds
        for split in splits
    ]
    tallies: dict = {}
    finished: list[tuple[int, str]] = []
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    slowest, stopped = 0.0, None

    def collect(out: dict) -> None:
        nonlocal slowest
        _merge(tallies, out["tallies"])
        for m, v in out["seconds"].items():
            seconds[m].append(v)
        finished.append((out["seed"], out["split"]))
        slowest = max(slowest, out["wall"])
        held = "/".join(SPLITS[out["split"]])
        say(f"seed {out['seed']} split {out['split']} ({held} held out) done in {out['wall']:.0f} s")

    def may_start(started: int) -> bool:
        nonlocal stopped
        if over is not None and started and over(slowest):
            stopped = f"{len(todo) - started} of {len(todo)} (seed, split) runs did not fit the budget"
            return False
        return True

    if workers <= 1:
        for i, job in enumerate(todo):
            if not may_start(i):
                break
            collect(run_job(job))
    else:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        # spawn, not fork: the parent has torch's thread pools running
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            pending, started = set(), 0
            while True:
                while len(pending) < workers and started < len(todo) and not stopped:
                    if not may_start(started):
                        break
                    pending.add(pool.submit(run_job, todo[started]))
                    started += 1
                if not pending:
                    break
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    collect(f.result())
    complete = [s for s in seeds if all((s, sp) in finished for sp in splits)]
    runs = [(s, sp) for s in complete for sp in splits]
    if len(runs) < len(finished):
        partial = sorted({s for s, _ in finished} - set(complete))
        note = f"seeds {partial} finished only some splits and are left out"
        stopped = f"{stopped}; {note}" if stopped else note
    return {
        "tallies": tallies,
        "runs": runs,
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


# ProMLConfig fields read when decoding, not when encoding the support index
DECODE_TIME = frozenset({"inference_space", "top_k", "k_fraction", "span_merge", "viterbi"})
# predict() settings compared out of the box (explicit, so a row means the same whatever the defaults)
OOTB_CONFIGS: dict[str, dict] = {
    "before issue 17 (k = shots)": {"top_k": "shots", "span_merge": 0.0},
    "k = 1": {"top_k": 1, "span_merge": 0.0},
    "k = 1 + span merging 0.5": {"top_k": 1, "span_merge": 0.5},
    "k = nearest half of each class": {"top_k": None, "k_fraction": 0.5, "span_merge": 0.0},
    "k = half + span merging 0.5": {"top_k": None, "k_fraction": 0.5, "span_merge": 0.5},
    "k = half + merging, Gaussian space (untrained head)": {
        "top_k": None,
        "k_fraction": 0.5,
        "span_merge": 0.5,
        "inference_space": "gaussian",
    },
    "package default": {},
}


def predict_out_of_the_box(
    encoder: str,
    queries: int,
    seeds: Sequence[int],
    configs: dict[str, dict],
    split: str = "test",
    over: Callable[[float], bool] | None = None,
) -> dict:
    """Span F1 of ``ProMLNer.predict`` on WNUT-17 sentences of ``split`` (as text) with an untrained ProML
    on the plain encoder and a 10-sentence train support, for each ProMLConfig override in ``configs``;
    one support set (and query sample) per seed, mean and sample std over them. ``split="dev"`` is for
    choosing defaults, ``"test"`` for reporting them. ``over(next_cost)`` is asked before each support
    set with the slowest one's time so far."""
    train_corpus, _ = read_split("train")
    query_corpus, _ = read_split(split)
    per_seed: dict[str, list[dict]] = {name: [] for name in configs}
    done, slowest = [], 0.0
    for seed in seeds:
        if over is not None and done and over(slowest):
            break
        t0 = time.perf_counter()
        support = ten_sentence_support(train_corpus, 10, seed)
        sample = random.Random(seed + 1).sample(query_corpus, min(queries, len(query_corpus)))
        texts, gold = zip(*(char_spans(s) for s in sample))
        torch.manual_seed(seed)
        ner = ProMLNer(ProML.from_encoder(encoder))
        base = ner.model.config
        index = ner.support(support, labels=list(TYPES))  # the settings compared are all decode-time
        for name, over_cfg in configs.items():
            if set(over_cfg) - DECODE_TIME:
                raise ValueError(f"predict_out_of_the_box: {name}: only {sorted(DECODE_TIME)} may vary")
            ner.model.config = replace(base, **over_cfg)
            # a row that names span_merge sets it; the others keep ProMLNer's predict() default
            ner.span_merge = None if "span_merge" in over_cfg else PREDICT_SPAN_MERGE
            per_seed[name].append(_span_scores(texts, gold, ner.predict(list(texts), support=index)))
        ner.model.config = base
        done.append(seed)
        slowest = max(slowest, time.perf_counter() - t0)
    out = {}
    for name, runs in per_seed.items():
        if not runs:
            continue
        agg = {k: mean_std([r[k] for r in runs]) for k in ("f1", "precision", "recall", "multi_word_recall")}
        agg |= {k: sum(r[k] for r in runs) / len(runs) for k in ("predicted", "gold", "multi_word_predicted")}
        scores = [x for r in runs for x in r["scores"]]
        agg["score_min"] = min(scores) if scores else None
        agg["score_max"] = max(scores) if scores else None
        agg["score_std"] = float(torch.tensor(scores).std()) if len(scores) > 1 else 0.0
        agg["per_seed_f1"] = [r["f1"] for r in runs]
        agg["config"] = configs[name]
        out[name] = agg
    return {"split": split, "support_sentences": 10, "queries": queries, "seeds": done, "settings": out}


def _span_scores(texts, gold, pred) -> dict:
    """Exact character-span counts of one predict() call, with the multi-word spans counted apart."""
    counts, scores, multi_pred = EntityCounts(), [], 0
    gold_multi = correct_multi = 0
    for t, g, p in zip(texts, gold, pred):
        ps = {(e["start"], e["end"], e["label"]) for e in p}
        counts.gold += len(g)
        counts.pred += len(ps)
        counts.correct += len(g & ps)
        scores += [e["score"] for e in p]
        multi_pred += sum(1 for e in p if " " in e["text"])
        for a, b, lab in g:
            if " " in t[a:b]:
                gold_multi += 1
                correct_multi += (a, b, lab) in ps
    return {
        "f1": counts.f1,
        "precision": counts.precision,
        "recall": counts.recall,
        "predicted": counts.pred,
        "gold": counts.gold,
        "multi_word_predicted": multi_pred,
        "multi_word_gold": gold_multi,
        "multi_word_recall": correct_multi / gold_multi if gold_multi else 0.0,
        "scores": scores,
    }


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
    ap.add_argument("--workers", type=int, default=1, help="processes for the (seed, split) runs")
    ap.add_argument(
        "--predict-out-of-the-box",
        choices=["dev", "test"],
        default=None,
        help="only the predict() comparison (OOTB_CONFIGS), on this split, one support set per seed",
    )
    ap.add_argument("--queries", type=int, default=200, help="sentences per support set (predict mode)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tc = {k: json.loads(v) for k, v in (x.split("=", 1) for x in args.set)}
    if args.predict_out_of_the_box:
        r = predict_out_of_the_box(
            args.encoder or encoder_path(),
            args.queries,
            args.seeds,
            OOTB_CONFIGS,
            args.predict_out_of_the_box,
        )
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, **r}, indent=1))
        for name, d in r["settings"].items():
            print(
                f"{name:45s} F1 {d['f1'][0]:.3f}+-{d['f1'][1]:.3f} P {d['precision'][0]:.3f} "
                f"R {d['recall'][0]:.3f} spans {d['predicted']:.0f} multi-word R {d['multi_word_recall'][0]:.3f}"
            )
        return
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
        workers=args.workers,
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
