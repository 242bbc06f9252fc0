"""Episodes from a :class:`~proml_ner.experiment.RunConfig`, per evaluation protocol.

``episodes`` (Few-NERD, Ding et al. 2021): episode files read as they are, or N-way K~2K-shot episodes
sampled from a flat corpus. ``full_test`` (OntoNotes tag extension and domain transfer; Yang and Katiyar
2020, Das et al. 2022): K~2K support sets over every test type, the rest of the test corpus as query;
score it with the mean F1 over support sets (:attr:`proml_ner.train.EvalResult.mean_f1`), as the
authors report, or pooled.
"""

from __future__ import annotations

import random

from .experiment import RunConfig
from .formats import Episode, Sentence

__all__ = ["build_episodes"]


def _restrict(sentences: list[Sentence], keep: list[str]) -> list[Sentence]:
    if not keep:
        return sentences
    allowed = set(keep)
    return [Sentence(s.words, [x if x in allowed else "O" for x in s.labels]) for s in sentences]


def _read_sentences(cfg: RunConfig, path: str) -> list[Sentence]:
    """A flat corpus file in the config's ``data.format`` (CoNLL columns or Few-NERD flat)."""
    from .formats import read_conll, read_fewnerd_flat

    if cfg.data.format == "conll":
        return read_conll(path, cfg.data.token_column, cfg.data.tag_column)
    return read_fewnerd_flat(path)


def _read_corpus(cfg: RunConfig, which: str, keep: list[str], seed: int) -> list[Sentence]:
    from .synthetic import synthetic_corpus

    path = cfg.data.path(which)
    if path.startswith("synthetic"):
        split = path.split(":", 1)[1] if ":" in path else ("train" if which == "train" else "test")
        n = max(400, 40 * cfg.episodes.n_way * cfg.episodes.k_shot)
        sents = synthetic_corpus(split, n, seed=seed)
    else:
        sents = _read_sentences(cfg, path)
    return _restrict(sents, keep)


def build_episodes(cfg: RunConfig, split: str) -> list[Episode]:
    """Episodes of ``split`` (``train``/``dev``/``test``) as the config's protocol defines them.

    Seeds: train episodes use ``seed``, dev ``seed + 1``, test ``seed + 2`` (recorded in results).
    """
    from .formats import read_fewnerd_episodes
    from .sampler import sample_episodes

    if split not in ("train", "dev", "test"):
        raise ValueError(f"build_episodes: split={split!r} must be 'train', 'dev' or 'test'")
    ep = cfg.episodes
    seed = cfg.seed + {"train": 0, "dev": 1, "test": 2}[split]
    count = getattr(ep, split)
    path = cfg.data.path(split)
    n_way, k_shot = ep.n_way, ep.k_shot
    if split in ("train", "dev"):
        # dev episodes select the checkpoint the way training sees data: N-way K~2K-shot episodes
        n_way, k_shot = ep.train_n_way or n_way, ep.train_k_shot or k_shot
    if cfg.data.format == "fewnerd-episodes" and not path.startswith("synthetic"):
        return read_fewnerd_episodes(path)[:count] if count else read_fewnerd_episodes(path)
    keep = cfg.data.train_types if split == "train" else cfg.data.test_types
    corpus = _read_corpus(cfg, split, keep, seed)
    if split != "test" or ep.protocol == "episodes":
        return sample_episodes(corpus, n_way, k_shot, count, seed=seed + 1000)
    return _full_test_episodes(cfg, corpus, seed)


def _full_test_episodes(cfg: RunConfig, corpus: list[Sentence], seed: int) -> list[Episode]:
    """Support sets of every type of the test corpus (K~2K each), the rest of the corpus as query.

    The protocol of the OntoNotes tag-extension and domain-transfer settings (Das et al. 2022; ProML
    experiments): ``support_files`` when given, else ``support_sets`` greedy samples over all types.
    """
    from .sampler import sample_support

    types = sorted({t for s in corpus for t in s.types})
    if not types:
        raise ValueError("full_test: the test corpus has no entity of the kept types (data.test_types)")
    supports: list[list[Sentence]] = []
    if cfg.data.support_files:
        keep = cfg.data.test_types
        supports = [_restrict(_read_sentences(cfg, cfg.data.path(f)), keep) for f in cfg.data.support_files]
    else:
        rng = random.Random(seed)
        for _ in range(cfg.episodes.support_sets):
            supports.append(sample_support(corpus, types, cfg.episodes.k_shot, rng))
    episodes = []
    for support in supports:
        used = {id(s) for s in support}
        query = [s for s in corpus if id(s) not in used]
        extra = sorted({t for s in support for t in s.types} - set(types))
        if extra:
            raise ValueError(f"full_test: support files hold types {extra} absent from the test corpus")
        episodes.append(Episode(types, support, query))
    return episodes
