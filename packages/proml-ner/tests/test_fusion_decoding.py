"""Masked weighted fusion, nearest-neighbour class scores, and Viterbi against brute force."""

from __future__ import annotations

import itertools

import pytest
import torch

from proml_ner.decoding import AbstractTransitions, class_scores, squared_euclidean, viterbi_decode
from proml_ner.fusion import MultiPromptFusion, masked_weighted_average


def test_masked_weighted_average_is_convex_and_masks():
    reps = torch.randn(2, 3, 4, dtype=torch.float64)
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    out = masked_weighted_average(reps, w, mask)
    torch.testing.assert_close(out[0], 0.3 * reps[0, 0] + 0.7 * reps[1, 0])
    torch.testing.assert_close(out[1], reps[0, 1])  # second schema masked: renormalised
    torch.testing.assert_close(out[2], reps[1, 2])
    with pytest.raises(ValueError, match="no schema present"):
        masked_weighted_average(reps, w, torch.zeros(2, 3))


def test_fusion_lambda_fixed_learned_and_ablated():
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    fixed = MultiPromptFusion(0.3)
    out = fixed({"option_prefix": a, "label_aware": b}, ["option_prefix", "label_aware"])
    torch.testing.assert_close(out, 0.3 * a + 0.7 * b)
    torch.testing.assert_close(fixed({"option_prefix": a, "label_aware": b}, ["label_aware"]), b)
    learned = MultiPromptFusion(0.7, learn_lambda=True)
    assert learned.fusion_lambda.item() == pytest.approx(0.7, abs=1e-6)
    learned({"option_prefix": a, "label_aware": b}, ["option_prefix", "label_aware"]).sum().backward()
    assert learned.lambda_logit.grad is not None and learned.lambda_logit.grad.abs() > 0
    with pytest.raises(ValueError, match=r"fusion_lambda=1\.5"):
        MultiPromptFusion(1.5)


def test_class_scores_topk_mean():
    dist = torch.tensor([[1.0, 4.0, 2.0, 9.0, 3.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    s = class_scores(dist, labels, 3, k=2)
    assert s[0, 0].item() == pytest.approx(-2.5)  # mean of 1, 4
    assert s[0, 1].item() == pytest.approx(-2.5)  # mean of 2, 3
    assert s[0, 2].item() == float("-inf")  # class without support words
    s1 = class_scores(dist, labels, 3, k=1)
    assert s1[0, :2].tolist() == [-1.0, -2.0]
    torch.testing.assert_close(squared_euclidean(torch.eye(2), torch.eye(2)), 2 - 2 * torch.eye(2))


def test_class_scores_fraction_takes_each_class_own_k():
    # O has 6 support words, the entity 2: fraction 0.5 averages the nearest 3 O words and the nearest 1
    # entity word; a fixed k = 1 lets O win on its single extreme neighbour
    dist = torch.tensor([[0.5, 5.0, 6.0, 7.0, 8.0, 9.0, 1.0, 4.0]])
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    fixed = class_scores(dist, labels, 2, k=1)
    assert fixed[0].tolist() == [-0.5, -1.0] and fixed[0].argmax() == 0
    half = class_scores(dist, labels, 2, k=1, fraction=0.5)
    assert half[0, 0].item() == pytest.approx(-(0.5 + 5 + 6) / 3)
    assert half[0, 1].item() == pytest.approx(-1.0) and half[0].argmax() == 1
    whole = class_scores(dist, labels, 2, k=1, fraction=1.0)  # mean distance to every word of a class
    assert whole[0].tolist() == pytest.approx([-(0.5 + 5 + 6 + 7 + 8 + 9) / 6, -2.5])
    tiny = class_scores(dist, labels, 2, k=1, fraction=0.01)  # rounds to 0 words: at least 1
    assert tiny[0].tolist() == fixed[0].tolist()
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="fraction"):
            class_scores(dist, labels, 2, k=1, fraction=bad)


@pytest.mark.parametrize("seed", range(4))
def test_viterbi_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    T, n_types = 5, 2
    em = torch.log_softmax(torch.randn(T, n_types + 1, generator=g, dtype=torch.float64), -1)
    tr, st = AbstractTransitions().matrix(n_types)
    best, best_path = -float("inf"), None
    for path in itertools.product(range(n_types + 1), repeat=T):
        s = (
            st[path[0]]
            + em[0, path[0]]
            + sum(tr[a, b] + em[t + 1, b] for t, (a, b) in enumerate(itertools.pairwise(path)))
        )
        if s > best:
            best, best_path = float(s), list(path)
    assert viterbi_decode(em, tr, st) == best_path


def test_transitions_estimate_and_rows_normalised():
    t = AbstractTransitions.estimate([["O", "a", "a", "O", "b"], ["b", "a"]], smoothing=0.0)
    assert t.o_o == 0 and t.o_i == 1 and t.i_same == pytest.approx(1 / 3) and t.start_o == 0.5
    log_t, log_s = AbstractTransitions().matrix(3)
    torch.testing.assert_close(log_t.exp().sum(1), torch.ones(4, dtype=torch.float64))
    assert log_s.exp().sum().item() == pytest.approx(1.0)


def test_merge_spans_grows_entities_over_close_words():
    from proml_ner.decoding import merge_spans

    # "Barack Obama visited": Obama is a little closer to O (0.55) than to person (0.4)
    probs = torch.tensor([[0.1, 0.9, 0.0], [0.55, 0.4, 0.05], [0.9, 0.05, 0.05]])
    path = probs.argmax(-1).tolist()
    assert path == [1, 0, 0]
    assert merge_spans(path, probs, 0.0) == [1, 0, 0]  # off
    assert merge_spans(path, probs, 0.5) == [1, 1, 0]  # 0.4 >= 0.5 * 0.55
    assert merge_spans(path, probs, 0.8) == [1, 0, 0]  # 0.4 < 0.8 * 0.55
    # a word whose best entity class is another type never joins
    probs2 = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]])
    assert merge_spans([1, 0], probs2, 0.1) == [1, 0]
    # growth repeats: "King 's College London" cut to "London"
    probs3 = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.6, 0.4], [0.2, 0.8]])
    assert merge_spans([0, 0, 0, 1], probs3, 0.5) == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="ratio=2"):
        merge_spans([0], probs3[:1], 2)


def test_neighbour_scale_is_the_median_nearest_other_distance():
    from proml_ner.decoding import neighbour_scale

    d = torch.tensor([[0.0, 1.0, 4.0], [1.0, 0.0, 9.0], [4.0, 9.0, 0.0]])
    assert neighbour_scale(d) == pytest.approx(1.0)  # nearest others: 1, 1, 4
    assert neighbour_scale(2 * d) == pytest.approx(2.0)  # follows the space's units
    assert neighbour_scale(torch.zeros(1, 1)) == 1.0
    with pytest.raises(ValueError, match="square"):
        neighbour_scale(torch.zeros(2, 3))
