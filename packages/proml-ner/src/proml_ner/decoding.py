"""From support/query distances to IO labels: nearest-neighbour class scores and StructShot Viterbi.

Class scores (ProML Sec. 3.5): a query word's score for class ``c`` (``O`` or an episode type) is minus
the mean distance to its ``k`` closest support words of class ``c`` (``k`` = shots; fewer when the class
has fewer support words). ``k = 1`` is NNShot (Yang & Katiyar, EMNLP 2020). A per-class ``k``, a fixed
fraction of each class's support words, is this package's option (see :func:`class_scores`).

Viterbi (StructShot, Yang & Katiyar 2020, Sec. 3.2): abstract IO transitions ``O->O``, ``O->I``,
``I->O``, ``I->same I``, ``I->other I`` estimated from training label sequences and spread evenly over
the episode's types, combined with per-word log-softmax emissions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor

__all__ = [
    "AbstractTransitions",
    "class_scores",
    "merge_spans",
    "neighbour_scale",
    "squared_euclidean",
    "viterbi_decode",
]


def squared_euclidean(a: Tensor, b: Tensor) -> Tensor:
    """(N, M) squared Euclidean distances, clamped at 0 against rounding."""
    return (a.pow(2).sum(-1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(-1)[None, :]).clamp_min(0.0)


def class_scores(
    dist: Tensor, support_labels: Tensor, n_classes: int, k: int, fraction: float | None = None
) -> Tensor:
    """(Q, C) scores: minus the mean of the ``k`` smallest distances to each class's support words.

    With ``fraction`` each class takes its own ``k``: that fraction of its support words, rounded, at
    least 1 (``fraction=0.5``: the nearest half of the class). A fixed ``k`` lets the class with the most
    support words win on its extreme neighbours: a few-shot support holds ten or more ``O`` words per
    entity word, so the nearest of ~150 ``O`` words is nearer most query words than the nearest of a
    handful of entity words. A class with no support word scores ``-inf``.
    """
    if k < 1:
        raise ValueError(f"class_scores: k={k} must be >= 1")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"class_scores: fraction={fraction} must be in (0, 1] (or None for a fixed k)")
    out = torch.full((dist.shape[0], n_classes), float("-inf"), dtype=dist.dtype, device=dist.device)
    for c in range(n_classes):
        cols = (support_labels == c).nonzero(as_tuple=True)[0]
        if cols.numel() == 0:
            continue
        kk = max(1, round(fraction * cols.numel())) if fraction is not None else min(k, cols.numel())
        near = dist.index_select(1, cols).topk(kk, dim=1, largest=False).values
        out[:, c] = -near.mean(1)
    return out


def neighbour_scale(support_dist: Tensor) -> float:
    """The support's typical neighbour distance: the median, over support words, of the distance to the
    nearest *other* support word (zero distances, i.e. duplicate vectors, left out); 1.0 when there is
    none. ``support_dist`` is the (S, S) distance matrix of the support with itself.

    Class scores divided by it are free of the space's units (squared Euclidean on the encoder, KL on the
    Gaussians): a score gap of one typical neighbour distance is one nat of log-probability.
    """
    if support_dist.ndim != 2 or support_dist.shape[0] != support_dist.shape[1]:
        raise ValueError(
            f"neighbour_scale: support_dist must be square (S, S), got {tuple(support_dist.shape)}"
        )
    n = support_dist.shape[0]
    if n < 2:
        return 1.0
    d = support_dist.detach().float().clone()
    d.fill_diagonal_(float("inf"))
    d = d.masked_fill(d <= 0, float("inf"))
    nearest = d.min(1).values
    nearest = nearest[torch.isfinite(nearest)]
    if nearest.numel() == 0:
        return 1.0
    return float(nearest.median().clamp_min(1e-12))


@dataclass
class AbstractTransitions:
    """Probabilities of the five abstract IO transitions and of starting in O (StructShot)."""

    o_o: float = 0.8
    o_i: float = 0.2
    i_o: float = 0.3
    i_same: float = 0.65
    i_other: float = 0.05
    start_o: float = 0.8

    @classmethod
    def estimate(
        cls, label_sequences: Iterable[Sequence[str]], smoothing: float = 1.0
    ) -> AbstractTransitions:
        """Counts from IO label sequences (e.g. the training episodes), add-``smoothing``."""
        c = dict.fromkeys(("o_o", "o_i", "i_o", "i_same", "i_other", "s_o", "s_i"), smoothing)
        for seq in label_sequences:
            if not seq:
                continue
            c["s_o" if seq[0] == "O" else "s_i"] += 1
            for a, b in pairwise(seq):
                if a == "O":
                    c["o_o" if b == "O" else "o_i"] += 1
                elif b == "O":
                    c["i_o"] += 1
                else:
                    c["i_same" if a == b else "i_other"] += 1
        o = c["o_o"] + c["o_i"]
        i = c["i_o"] + c["i_same"] + c["i_other"]
        return cls(
            o_o=c["o_o"] / o,
            o_i=c["o_i"] / o,
            i_o=c["i_o"] / i,
            i_same=c["i_same"] / i,
            i_other=c["i_other"] / i,
            start_o=c["s_o"] / (c["s_o"] + c["s_i"]),
        )

    def matrix(self, n_types: int) -> tuple[Tensor, Tensor]:
        """Log transition matrix (C, C) and log start (C,) for classes ``[O, type_1, ..., type_N]``."""
        c = n_types + 1
        t = torch.empty(c, c, dtype=torch.float64)
        t[0, 0] = self.o_o
        t[0, 1:] = self.o_i / n_types
        t[1:, 0] = self.i_o
        other = self.i_other / (n_types - 1) if n_types > 1 else 0.0
        t[1:, 1:] = other
        idx = torch.arange(1, c)
        t[idx, idx] = self.i_same if n_types > 1 else self.i_same + self.i_other
        start = torch.full((c,), (1 - self.start_o) / n_types, dtype=torch.float64)
        start[0] = self.start_o
        return t.clamp_min(1e-12).log(), start.clamp_min(1e-12).log()


def viterbi_decode(emissions: Tensor, log_trans: Tensor, log_start: Tensor, weight: float = 1.0) -> list[int]:
    """Best class path for one sentence. emissions: (T, C) log-probabilities; ``weight`` scales the
    transition scores (StructShot's tau)."""
    T = emissions.shape[0]
    if T == 0:
        return []
    em = emissions.to(torch.float64)
    tr = log_trans.to(em.device) * weight
    score = em[0] + log_start.to(em.device) * weight
    back = []
    for t in range(1, T):
        cand = score[:, None] + tr  # (prev, cur)
        best, arg = cand.max(0)
        back.append(arg)
        score = best + em[t]
    path = [int(score.argmax())]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return path[::-1]


def merge_spans(path: Sequence[int], probs: Tensor, ratio: float) -> list[int]:
    """Grow each entity run of ``path`` (class ids, 0 = O) over adjacent ``O`` words that are close to
    its type: a word joins when the run's class is its most likely entity class and
    ``p(class) >= ratio * p(O)``. Repeats until nothing changes, so "Barack [Obama]" becomes one span
    when "Barack" is nearly as close to the person words as to O. ``ratio`` in (0, 1]; 0 turns it off.

    A nearest-neighbour decoder labels each word on its own, and the second word of a name (a surname,
    "London" in "King's College London") is often nearer the support's O words than its first word is.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"merge_spans: ratio={ratio} must be in [0, 1] (0: off)")
    out = list(path)
    if ratio == 0.0 or not out:
        return out
    p = probs.detach().float()
    if p.shape[0] != len(out):
        raise ValueError(f"merge_spans: {len(out)} labels but probs has {p.shape[0]} rows")
    best_entity = p[:, 1:].argmax(1) + 1 if p.shape[1] > 1 else torch.zeros(len(out), dtype=torch.long)
    changed = True
    while changed:
        changed = False
        for i, c in enumerate(out):
            if c != 0:
                continue
            for j in (i - 1, i + 1):
                if 0 <= j < len(out) and out[j] != 0:
                    t = out[j]
                    if int(best_entity[i]) == t and float(p[i, t]) >= ratio * float(p[i, 0]):
                        out[i] = t
                        changed = True
                        break
    return out
