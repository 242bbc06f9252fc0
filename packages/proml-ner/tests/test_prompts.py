"""Golden prompt construction with the real MiniLM WordPiece tokenizer; windows; no gold leakage."""

from __future__ import annotations

import pytest

from proml_ner.encoder import word_pieces
from proml_ner.prompts import PromptContext, PromptSchema, get_schema, plan_windows, register_schema
from proml_ner.verbalizer import Verbalizer, default_verbalization

TYPES = ["person-athlete", "location-island"]
WORDS = ["Serena", "Williams", "visited", "Zanzibar", "."]
LABELS = ["person-athlete", "person-athlete", "O", "location-island", "O"]


@pytest.fixture
def ctx(tokenizer):
    return PromptContext.build(tokenizer, TYPES, Verbalizer().words(TYPES))


def _tokens(tokenizer, schema, labels, ctx):
    p = get_schema(schema).build(word_pieces(tokenizer, WORDS), labels, ctx)
    return tokenizer.convert_ids_to_tokens(p.input_ids), p.positions


def test_golden_option_prefix(tokenizer, ctx):
    toks, pos = _tokens(tokenizer, "option_prefix", LABELS, ctx)
    assert toks == ["[CLS]", "location", "island", ",", "person", "athlete", "[SEP]",
                    "serena", "williams", "visited", "za", "##nz", "##ibar", ".", "[SEP]"]  # fmt: skip
    assert pos == [7, 8, 9, 10, 13]
    assert [toks[i] for i in pos] == ["serena", "williams", "visited", "za", "."]  # first word piece


def test_query_prefix_has_no_gold_leakage(tokenizer, ctx):
    with_entities = get_schema("option_prefix").build(word_pieces(tokenizer, WORDS), LABELS, ctx)
    without = get_schema("option_prefix").build(word_pieces(tokenizer, WORDS), ["O"] * 5, ctx)
    no_labels = get_schema("option_prefix").build(word_pieces(tokenizer, WORDS), None, ctx)
    assert with_entities == without == no_labels
    # the option order is the sorted type list, whatever order the episode lists them in
    other = PromptContext.build(tokenizer, TYPES[::-1], Verbalizer().words(TYPES))
    assert get_schema("option_prefix").build(word_pieces(tokenizer, WORDS), None, other) == no_labels


def test_golden_label_aware(tokenizer, ctx):
    toks, pos = _tokens(tokenizer, "label_aware", LABELS, ctx)
    assert toks == ["[CLS]", "serena", "williams", "(", "person", "athlete", ")", "visited",
                    "za", "##nz", "##ibar", "(", "location", "island", ")", ".", "[SEP]"]  # fmt: skip
    assert [toks[i] for i in pos] == ["serena", "williams", "visited", "za", "."]
    with pytest.raises(ValueError, match="needs gold labels"):
        get_schema("label_aware").build(word_pieces(tokenizer, WORDS), None, ctx)


def test_golden_plain(tokenizer, ctx):
    toks, pos = _tokens(tokenizer, "plain", None, ctx)
    assert toks[0] == "[CLS]" and toks[-1] == "[SEP]" and pos == [1, 2, 3, 4, 7]


def test_label_words_never_unk(tokenizer):
    with pytest.raises(ValueError, match=r"tokenises to \[UNK\]"):
        PromptContext.build(tokenizer, ["x"], {"x": "\u2603\ufffd"})


def test_verbalizer():
    assert default_verbalization("person-artist/author") == "person artist / author"
    assert default_verbalization("GPE") == "geopolitical entity"
    assert default_verbalization("organization-sportsteam") == "organization sportsteam"
    assert Verbalizer({"GPE": "country or city"})("GPE") == "country or city"
    with pytest.raises(ValueError, match="non-empty"):
        Verbalizer({"GPE": " "})


def test_registry():
    with pytest.raises(ValueError, match="unknown schema 'nope'"):
        get_schema("nope")
    with pytest.raises(ValueError, match="already registered"):

        @register_schema("plain")
        class Again(PromptSchema):
            pass


@pytest.mark.parametrize(
    ("costs", "budget", "overlap"),
    [([1] * 10, 4, 0), ([1] * 10, 4, 2), ([3, 1, 2, 5, 1, 1, 9, 2], 6, 1), ([2] * 7, 5, 3), ([1], 3, 2)],
)
def test_windows_cover_and_own_each_word_once(costs, budget, overlap):
    ws = plan_windows(costs, budget, overlap)
    owned = [i for w in ws for i in range(w.own_start, w.own_end)]
    assert owned == list(range(len(costs)))
    for w in ws:
        assert w.start <= w.own_start <= w.own_end <= w.end
        assert w.end - w.start == 1 or sum(min(c, budget) for c in costs[w.start : w.end]) <= budget
    with pytest.raises(ValueError, match="budget=0"):
        plan_windows(costs, 0)
