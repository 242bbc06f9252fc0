"""Few-NERD greedy N-way K~2K-shot sampler: invariants and determinism."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from proml_ner.metrics import entity_spans
from proml_ner.sampler import sample_episode, sample_episodes, sample_support
from proml_ner.synthetic import split_types, synthetic_corpus


def _counts(sents):
    return Counter(t for s in sents for _, _, t in entity_spans(s.labels))


@pytest.mark.parametrize(("n", "k"), [(5, 1), (5, 5), (3, 2), (10, 1)])
def test_invariants(n, k):
    corpus = synthetic_corpus("train", 600, seed=3)
    for ep in sample_episodes(corpus, n, k, 8, seed=11):
        assert len(ep.types) == n and ep.types == sorted(ep.types)
        for side in (ep.support, ep.query):
            c = _counts(side)
            assert set(c) == set(ep.types)
            assert all(k <= c[t] <= 2 * k for t in ep.types), c
            assert all(s.types and s.types <= set(ep.types) for s in side)
        assert not {id(s) for s in ep.support} & {id(s) for s in ep.query}


def test_seeded():
    corpus = synthetic_corpus("test", 400, seed=0)
    a = [e.to_json() for e in sample_episodes(corpus, 5, 2, 4, seed=7)]
    b = [e.to_json() for e in sample_episodes(corpus, 5, 2, 4, seed=7)]
    c = [e.to_json() for e in sample_episodes(corpus, 5, 2, 4, seed=8)]
    assert a == b and a != c


def test_errors():
    corpus = synthetic_corpus("test", 50, seed=0)
    with pytest.raises(ValueError, match="only 10 entity types"):
        sample_episode(corpus, 11, 1, random.Random(0))
    with pytest.raises(RuntimeError, match="too small"):
        sample_episode(corpus[:3], 2, 5, random.Random(0), max_tries=5)
    with pytest.raises(ValueError, match="n_way=0"):
        sample_episode(corpus, 0, 1, random.Random(0))


def test_synthetic_split_is_intra():
    train, test = set(split_types("train")), set(split_types("test"))
    coarse = {t.split("-")[0] for t in train | test | set(split_types("dev"))}
    assert len(coarse) >= 8 and not train & test
    for s in synthetic_corpus("test", 100, seed=1):
        assert s.types and s.types <= test


@pytest.mark.parametrize("k", [1, 3])
def test_support_over_all_types(k):
    """The full-test protocol's support: every requested type K~2K times, no other type."""
    corpus = synthetic_corpus("test", 300, seed=2)
    types = sorted({t for s in corpus for t in s.types})
    support = sample_support(corpus, types, k, random.Random(4))
    c = _counts(support)
    assert set(c) == set(types) and all(k <= c[t] <= 2 * k for t in types), c
    some = types[:3]
    part = sample_support(corpus, some, k, random.Random(4))
    assert all(s.types and s.types <= set(some) for s in part)
    with pytest.raises(RuntimeError, match="too few entities"):
        sample_support(corpus[:2], types, 5, random.Random(0), max_tries=3)
    with pytest.raises(ValueError, match="k_shot=0"):
        sample_support(corpus, types, 0, random.Random(0))
