"""Few-NERD micro P/R/F1 equals seqeval (tags written I-<type>, default mode) on random sequences."""

from __future__ import annotations

import random

import pytest

from proml_ner.metrics import (
    EntityCounts,
    entity_spans,
    error_analysis,
    mean_std,
    score,
    seqeval_score,
    write_episode_csv,
)


def test_entity_spans_are_maximal_runs():
    assert entity_spans(["O", "a", "a", "b", "O", "a"]) == [(1, 3, "a"), (3, 4, "b"), (5, 6, "a")]
    assert entity_spans([]) == []


@pytest.mark.parametrize("seed", range(5))
def test_metric_equals_seqeval(seed):
    rng = random.Random(seed)
    labels = ["O", "O", "O", "person-actor", "location-GPE", "art-film"]
    gold, pred = [], []
    for _ in range(60):
        n = rng.randint(1, 15)
        g = [rng.choice(labels) for _ in range(n)]
        p = [x if rng.random() < 0.7 else rng.choice(labels) for x in g]
        gold.append(g)
        pred.append(p)
    c = score(gold, pred)
    sp, sr, sf = seqeval_score(gold, pred)
    assert c.gold > 0 and c.correct > 0 and c.correct < c.pred
    assert c.precision == pytest.approx(sp, abs=1e-12)
    assert c.recall == pytest.approx(sr, abs=1e-12)
    assert c.f1 == pytest.approx(sf, abs=1e-12)


def test_micro_over_episodes_and_csv(tmp_path):
    a = EntityCounts().add(["x", "O"], ["x", "O"])
    b = EntityCounts().add(["y", "y", "O"], ["y", "O", "O"])
    total = EntityCounts()
    total += a
    total += b
    assert (total.gold, total.pred, total.correct) == (2, 2, 1)
    assert total.f1 == pytest.approx(0.5)
    write_episode_csv(tmp_path / "e.csv", [a, b])
    rows = (tmp_path / "e.csv").read_text().splitlines()
    assert rows[0].startswith("episode,gold") and rows[2].startswith("1,1,1,0")


def test_error_analysis():
    gold = [["a", "a", "O", "b", "O", "c"]]
    pred = [["a", "a", "O", "c", "c", "O"]]
    e = error_analysis(gold, pred)
    # (3,4,b) predicted as (3,5,c): wrong span; (5,6,c) missed; (3,4) not predicted with those bounds
    assert (e.fp_span, e.fp_type, e.fn) == (1, 0, 2)
    e = error_analysis([["a", "O"]], [["b", "O"]])
    assert (e.fp_span, e.fp_type, e.fn) == (0, 1, 0) and e.within == {"a -> b": 1}


def test_mean_std():
    assert mean_std([1.0]) == (1.0, 0.0)
    m, s = mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)
    with pytest.raises(ValueError, match="empty"):
        mean_std([])


def test_flattened_metric_merges_entities_across_sentence_edges():
    """Few-NERD's released metric joins a batch's sentences: a PER ending one sentence and a PER
    starting the next are one entity there, two in the per-sentence count."""
    from proml_ner.metrics import mean_f1, score_flattened

    gold = [["O", "PER"], ["PER", "O"], ["LOC"]]
    pred = [["O", "PER"], ["PER", "O"], ["O"]]
    per_sentence = score(gold, pred)
    flat = score_flattened(gold, pred)
    assert (per_sentence.gold, per_sentence.pred, per_sentence.correct) == (3, 2, 2)
    assert (flat.gold, flat.pred, flat.correct) == (2, 1, 1)
    # a prediction that ends a sentence's entity early still merges with the next sentence's
    assert score_flattened([["PER"], ["PER"]], [["PER"], ["O"]]).correct == 0
    # mean over support sets is the plain mean of each set's F1, not the pooled F1
    a, b = score([["PER"]], [["PER"]]), score([["PER", "O", "LOC"]], [["O", "O", "O"]])
    assert mean_f1([a, b]) == pytest.approx(0.5)
    pooled = EntityCounts()
    pooled += a
    pooled += b
    assert pooled.f1 == pytest.approx(2 * 1.0 * (1 / 3) / (1 + 1 / 3))
    with pytest.raises(ValueError, match="differ in length"):
        score_flattened([["O"]], [["O", "O"]])
