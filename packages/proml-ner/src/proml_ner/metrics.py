"""Few-NERD evaluation: micro precision/recall/F1 over entities, per-episode CSV, seeds, error analysis.

Few-NERD (Ding et al., ACL 2021, Sec. 5.1) labels words in the IO scheme; an entity is a maximal run of
words with one label, and a prediction counts when span and type both match. Counts are summed over all
episodes before P/R/F1 are formed (micro average). Writing IO labels as ``I-<type>`` makes seqeval's
default mode compute exactly the same numbers; ``tests/test_metrics.py`` checks that on random sequences.

Two other aggregations are offered because the literature uses them:

* :func:`mean_f1`: the mean of per-support-set F1 (the full-test protocol of the OntoNotes tag-extension
  and domain-transfer tables, Das et al. 2022; ProML reports the mean over 10 support sets);
* :func:`score_flattened`: Few-NERD's released evaluation, which concatenates the label sequences of an
  episode's query sentences into one before extracting runs, so same-type entities at the end of one
  sentence and the start of the next count as one entity.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "EntityCounts",
    "ErrorAnalysis",
    "entity_spans",
    "error_analysis",
    "mean_f1",
    "mean_std",
    "score",
    "score_flattened",
    "seqeval_score",
    "to_seqeval_tags",
    "write_episode_csv",
]


def entity_spans(labels: Sequence[str]) -> list[tuple[int, int, str]]:
    """Maximal runs of one non-``O`` label as ``(start, end_exclusive, type)``."""
    spans = []
    i, n = 0, len(labels)
    while i < n:
        if labels[i] == "O":
            i += 1
            continue
        j = i + 1
        while j < n and labels[j] == labels[i]:
            j += 1
        spans.append((i, j, labels[i]))
        i = j
    return spans


@dataclass
class EntityCounts:
    """Gold, predicted and correct entity counts; add them across sentences and episodes (micro)."""

    gold: int = 0
    pred: int = 0
    correct: int = 0

    def add(self, gold: Sequence[str], pred: Sequence[str]) -> EntityCounts:
        if len(gold) != len(pred):
            raise ValueError(f"score: gold ({len(gold)}) and pred ({len(pred)}) label lists differ in length")
        g, p = set(entity_spans(gold)), set(entity_spans(pred))
        self.gold += len(g)
        self.pred += len(p)
        self.correct += len(g & p)
        return self

    def __iadd__(self, other: EntityCounts) -> EntityCounts:
        self.gold += other.gold
        self.pred += other.pred
        self.correct += other.correct
        return self

    @property
    def precision(self) -> float:
        return self.correct / self.pred if self.pred else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.gold if self.gold else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def score(gold: Iterable[Sequence[str]], pred: Iterable[Sequence[str]]) -> EntityCounts:
    """Micro counts over sentences of IO labels (``"O"`` or type)."""
    counts = EntityCounts()
    for g, p in zip(gold, pred, strict=True):
        counts.add(g, p)
    return counts


def score_flattened(gold: Iterable[Sequence[str]], pred: Iterable[Sequence[str]]) -> EntityCounts:
    """Few-NERD's flattened counts: the sentences of one batch (an episode's query) joined end to end
    into a single label sequence, then runs counted as in :func:`score` (Ding et al. 2021 code,
    ``util/framework.py``: spans are taken from the concatenated label list)."""
    g_flat: list[str] = []
    p_flat: list[str] = []
    for g, p in zip(gold, pred, strict=True):
        if len(g) != len(p):
            raise ValueError(
                f"score_flattened: gold ({len(g)}) and pred ({len(p)}) label lists differ in length"
            )
        g_flat.extend(g)
        p_flat.extend(p)
    return EntityCounts().add(g_flat, p_flat)


def mean_f1(per_support: Sequence[EntityCounts]) -> float:
    """The mean of each support set's (or episode's) micro F1: the full-test protocol's aggregate."""
    if not per_support:
        raise ValueError("mean_f1: per_support is empty")
    return sum(c.f1 for c in per_support) / len(per_support)


def to_seqeval_tags(labels: Sequence[str]) -> list[str]:
    """IO labels as ``I-<type>``: the form seqeval reads correctly (bare types it misreads)."""
    return ["O" if lab == "O" else f"I-{lab}" for lab in labels]


def seqeval_score(gold: Iterable[Sequence[str]], pred: Iterable[Sequence[str]]) -> tuple[float, float, float]:
    """(precision, recall, F1) from seqeval's default mode, for cross-checking :func:`score`."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    g = [to_seqeval_tags(x) for x in gold]
    p = [to_seqeval_tags(x) for x in pred]
    kw = {"average": "micro", "zero_division": 0}
    return precision_score(g, p, **kw), recall_score(g, p, **kw), f1_score(g, p, **kw)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), as reported over seeds."""
    if not values:
        raise ValueError("mean_std: values is empty")
    m = sum(values) / len(values)
    if len(values) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def write_episode_csv(path: str | Path, per_episode: Sequence[EntityCounts]) -> None:
    """One row per episode: gold, pred, correct, precision, recall, F1."""
    with Path(path).open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["episode", "gold", "pred", "correct", "precision", "recall", "f1"])
        for i, c in enumerate(per_episode):
            w.writerow([i, c.gold, c.pred, c.correct, f"{c.precision:.6f}", f"{c.recall:.6f}", f"{c.f1:.6f}"])


@dataclass
class ErrorAnalysis:
    """Few-NERD's error split: false positives with a wrong span (``fp_span``: no gold entity with the
    same boundaries) or a right span and wrong type (``fp_type``); false negatives (gold entities whose
    span was not predicted at all)."""

    fp_span: int = 0
    fp_type: int = 0
    fn: int = 0
    within: dict[str, int] = field(default_factory=dict)


def error_analysis(gold: Iterable[Sequence[str]], pred: Iterable[Sequence[str]]) -> ErrorAnalysis:
    out = ErrorAnalysis()
    for g, p in zip(gold, pred, strict=True):
        gs, ps = set(entity_spans(g)), set(entity_spans(p))
        gold_bounds = {(a, b): t for a, b, t in gs}
        pred_bounds = {(a, b) for a, b, _ in ps}
        for a, b, t in ps - gs:
            if (a, b) in gold_bounds:
                out.fp_type += 1
                key = f"{gold_bounds[(a, b)]} -> {t}"
                out.within[key] = out.within.get(key, 0) + 1
            else:
                out.fp_span += 1
        out.fn += sum(1 for a, b, _ in gs if (a, b) not in pred_bounds)
    return out
