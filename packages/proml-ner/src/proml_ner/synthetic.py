"""Synthetic few-shot NER data: real-looking sentences from templates and entity lists.

Eight coarse types with 34 fine types named as in Few-NERD (``person-athlete``, ``location-GPE``...), and
the INTRA split of Ding et al. (2021, Sec. 4.1): the fine types of *person, art, product, other* are for
training, *building, event* for development, *organization, location* for testing, so test types are
never seen in training. As in Few-NERD, entities of types outside a split are labelled ``O`` there.

These sentences are synthetic: numbers measured on them show that the code learns and ranks methods on
an unseen label set; they are not Few-NERD results.
"""

from __future__ import annotations

import json
import random
import re
from importlib import resources

from .formats import Sentence
from .words import split_words

__all__ = ["ENTITIES", "SPLITS", "TEMPLATES", "synthetic_corpus", "synthetic_episodes"]


def _load() -> tuple[dict[str, list[str]], list[str]]:
    """Entity lists and templates from ``synthetic_data.json`` beside this module (shipped in the wheel)."""
    raw = json.loads(resources.files("proml_ner").joinpath("synthetic_data.json").read_text(encoding="utf-8"))
    return {k: list(v) for k, v in raw["entities"].items()}, list(raw["templates"])


# type -> entity strings; sentence templates with {type} slots
ENTITIES, TEMPLATES = _load()

SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("person", "art", "product", "other"),
    "dev": ("building", "event"),
    "test": ("organization", "location"),
}

_SLOT = re.compile(r"\{([^}]+)\}")


def split_types(split: str) -> list[str]:
    """Fine types of a split of the INTRA-style partition."""
    if split not in SPLITS:
        raise ValueError(f"synthetic: split={split!r} must be one of {sorted(SPLITS)}")
    return sorted(t for t in ENTITIES if t.split("-")[0] in SPLITS[split])


def _render(template: str, rng: random.Random, keep: set[str]) -> Sentence:
    words: list[str] = []
    labels: list[str] = []
    pos = 0
    for m in _SLOT.finditer(template):
        for w, _, _ in split_words(template[pos : m.start()]):
            words.append(w)
            labels.append("O")
        etype = m.group(1)
        name = rng.choice(ENTITIES[etype])
        for w, _, _ in split_words(name):
            words.append(w)
            labels.append(etype if etype in keep else "O")
        pos = m.end()
    for w, _, _ in split_words(template[pos:]):
        words.append(w)
        labels.append("O")
    return Sentence(words, labels)


def synthetic_corpus(split: str, n_sentences: int, seed: int = 0) -> list[Sentence]:
    """Sentences for one split; every sentence holds at least one entity of the split's types."""
    keep = set(split_types(split))
    templates = [t for t in TEMPLATES if set(_SLOT.findall(t)) & keep]
    rng = random.Random(seed)
    return [_render(rng.choice(templates), rng, keep) for _ in range(n_sentences)]


def synthetic_episodes(
    split: str, n_way: int, k_shot: int, n_episodes: int, seed: int = 0, n_sentences: int | None = None
) -> list:
    """Few-NERD-style episodes (greedy N-way K~2K-shot sampler) over a synthetic split."""
    from .sampler import sample_episodes

    n = n_sentences if n_sentences is not None else max(400, 40 * n_way * k_shot)
    corpus = synthetic_corpus(split, n, seed=seed)
    return sample_episodes(corpus, n_way, k_shot, n_episodes, seed=seed + 1)
