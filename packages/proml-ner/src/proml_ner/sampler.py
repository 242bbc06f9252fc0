"""Few-NERD's greedy N-way K~2K-shot episode sampler (Ding et al., ACL 2021, Sec. 4.2, Algorithm 1).

For each episode, N types are drawn; only sentences whose entities all belong to those N types are
candidates. Sentences are added greedily, in random order, while (a) every type in the set stays at or
below 2K entities and (b) the sentence brings at least one type still below K. The support stops when
every type has at least K entities; the query is then drawn the same way from the remaining candidates.
Entity counts are maximal runs of one IO label (:func:`proml_ner.metrics.entity_spans`).

Invariants (tested): every type of the episode has between K and 2K entities in the support and in the
query, no sentence carries another type, support and query share no sentence, and a seed fixes the output.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

from .formats import Episode, Sentence
from .metrics import entity_spans

__all__ = ["sample_episode", "sample_episodes", "sample_support"]


def _type_counts(sentence: Sentence) -> Counter[str]:
    return Counter(t for _, _, t in entity_spans(sentence.labels))


def _greedy(
    candidates: list[int],
    counts: list[Counter[str]],
    types: Sequence[str],
    k: int,
    exclude: set[int],
    rng: random.Random,
) -> list[int] | None:
    have: Counter[str] = Counter()
    chosen: list[int] = []
    order = [i for i in candidates if i not in exclude]
    rng.shuffle(order)
    for idx in order:
        if all(have[t] >= k for t in types):
            break
        c = counts[idx]
        if any(have[t] + n > 2 * k for t, n in c.items()):
            continue
        if not any(have[t] < k for t in c):
            continue
        chosen.append(idx)
        have.update(c)
    if all(have[t] >= k for t in types):
        return chosen
    return None


def sample_episode(
    sentences: Sequence[Sentence],
    n_way: int,
    k_shot: int,
    rng: random.Random,
    types: Sequence[str] | None = None,
    max_tries: int = 100,
    counts: list[Counter[str]] | None = None,
) -> Episode:
    """One N-way K~2K-shot episode (support and query), drawn greedily from ``sentences``."""
    if n_way < 1 or k_shot < 1:
        raise ValueError(f"sample_episode: n_way={n_way} and k_shot={k_shot} must both be >= 1")
    counts = counts if counts is not None else [_type_counts(s) for s in sentences]
    all_types = sorted(set().union(*counts)) if counts else []
    pool = list(types) if types is not None else all_types
    if len(pool) < n_way:
        raise ValueError(
            f"sample_episode: n_way={n_way} but the corpus has only {len(pool)} entity types {pool}"
        )
    for _ in range(max_tries):
        chosen_types = sorted(rng.sample(pool, n_way))
        allowed = set(chosen_types)
        candidates = [i for i, c in enumerate(counts) if c and set(c) <= allowed]
        support = _greedy(candidates, counts, chosen_types, k_shot, set(), rng)
        if support is None:
            continue
        query = _greedy(candidates, counts, chosen_types, k_shot, set(support), rng)
        if query is None:
            continue
        return Episode(
            chosen_types,
            [sentences[i] for i in support],
            [sentences[i] for i in query],
        )
    raise RuntimeError(
        f"sample_episode: no {n_way}-way {k_shot}~{2 * k_shot}-shot episode found in {max_tries} tries; "
        "the corpus is too small or too mixed for this setting (lower n_way/k_shot or add sentences)"
    )


def sample_episodes(
    sentences: Sequence[Sentence],
    n_way: int,
    k_shot: int,
    n_episodes: int,
    seed: int = 0,
    types: Sequence[str] | None = None,
) -> list[Episode]:
    """``n_episodes`` episodes from one seeded :class:`random.Random` (same seed, same episodes)."""
    rng = random.Random(seed)
    counts = [_type_counts(s) for s in sentences]
    return [sample_episode(sentences, n_way, k_shot, rng, types, counts=counts) for _ in range(n_episodes)]


def sample_support(
    sentences: Sequence[Sentence], types: Sequence[str], k_shot: int, rng: random.Random, max_tries: int = 100
) -> list[Sentence]:
    """A K~2K-shot support set over exactly ``types`` (every type at least K, at most 2K entities).

    The support side of :func:`sample_episode` alone, for the full-test protocol (support sets of all
    test types, the rest of the test corpus as query; Yang and Katiyar 2020, Das et al. 2022).
    """
    if k_shot < 1 or not types:
        raise ValueError(f"sample_support: k_shot={k_shot} must be >= 1 and types must be non-empty")
    counts = [_type_counts(s) for s in sentences]
    allowed = set(types)
    candidates = [i for i, c in enumerate(counts) if c and set(c) <= allowed]
    for _ in range(max_tries):
        chosen = _greedy(candidates, counts, list(types), k_shot, set(), rng)
        if chosen is not None:
            return [sentences[i] for i in chosen]
    raise RuntimeError(
        f"sample_support: no {k_shot}~{2 * k_shot}-shot support over {len(types)} types found in "
        f"{max_tries} tries; the corpus has too few entities of some type"
    )
