"""Prompt schemas of ProML (Chen, Zheng, Yang, Findings of ACL 2023, Sec. 3.2), mask-reducible.

A schema turns a window of words into encoder input ids and records, for every word, the position of its
first word piece: the word's vector is read back at its own position and the prompt tokens are masked out
of the output ("mask-reducible"), so every schema yields one vector per original word and the schemas can
be fused word by word (:mod:`proml_ner.fusion`).

Schemas (all start with the tokenizer's real ``[CLS]`` and end with its ``[SEP]``):

* ``option_prefix`` (support and query): the episode's label words, in one fixed order (sorted type
  strings) that never depends on a sentence's gold labels, listed before the sentence:
  ``[CLS] person athlete , location island , ... [SEP] w1 w2 ... [SEP]``. A query sentence's input is
  the same whether or not it holds entities: nothing of its gold labels reaches the encoder.
* ``label_aware`` (support only): each gold entity is followed inline by its label words in parentheses:
  ``[CLS] serena williams ( person athlete ) won ... [SEP]``.
* ``plain``: the sentence alone (the baselines, and the query side when ``option_prefix`` is ablated).

Label words go through the tokenizer (no ``[UNK]`` label words). Sentences longer than the encoder's
budget are split into overlapping word windows *before* the prompt is added (:func:`plan_windows`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "SCHEMAS",
    "LabelAwarePrompt",
    "OptionPrefixPrompt",
    "PlainPrompt",
    "PromptContext",
    "PromptSchema",
    "Prompted",
    "Window",
    "get_schema",
    "plan_windows",
    "register_schema",
]


@dataclass(frozen=True)
class Prompted:
    """Encoder input for one window: ``input_ids`` and each window word's first-piece ``positions``."""

    input_ids: list[int]
    positions: list[int]


@dataclass(frozen=True)
class Window:
    """Words ``[start, end)`` are encoded together; words ``[own_start, own_end)`` take their vectors
    from this window (the overlap is split at its middle)."""

    start: int
    end: int
    own_start: int
    own_end: int


@dataclass
class PromptContext:
    """What every schema of one episode shares: special ids and the tokenised label words."""

    cls_id: int
    sep_id: int
    label_ids: dict[str, list[int]]  # type -> label-word ids
    order: list[str]  # fixed type order for the option prefix
    comma_ids: list[int]
    open_ids: list[int]
    close_ids: list[int]

    @classmethod
    def build(
        cls,
        tokenizer,
        types: Sequence[str],
        label_words: dict[str, str],
        outside_words: str | None = None,
    ) -> PromptContext:
        """``outside_words`` (e.g. ``"none"``) also lists ``O`` in the option prefix, after the types, as
        the authors' code does; None leaves it out."""
        cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        if cls_id is None or sep_id is None:
            raise ValueError("prompts: the tokenizer has neither cls/sep nor bos/eos tokens")

        def ids(text: str, what: str) -> list[int]:
            out = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not out:
                raise ValueError(f"prompts: {what} {text!r} tokenises to nothing")
            unk = tokenizer.unk_token_id
            if unk is not None and unk in out:
                raise ValueError(
                    f"prompts: {what} {text!r} tokenises to [UNK]; give label words the tokenizer knows "
                    "(Verbalizer overrides / label_words=)"
                )
            return out

        order = sorted(types)
        label_ids = {t: ids(label_words[t], f"the label words of {t!r}") for t in order}
        if outside_words is not None:
            label_ids["O"] = ids(outside_words, "the label words of O")
            order = [*order, "O"]
        return cls(
            cls_id=cls_id,
            sep_id=sep_id,
            label_ids=label_ids,
            order=order,
            comma_ids=ids(",", "the separator"),
            open_ids=ids("(", "the bracket"),
            close_ids=ids(")", "the bracket"),
        )


class PromptSchema:
    """A mask-reducible prompt. Subclasses set ``name``, ``needs_labels`` and implement the two hooks."""

    name: str = ""
    needs_labels: bool = False  # True: usable only where gold labels are given (the support)

    def overhead(self, ctx: PromptContext) -> int:
        """Tokens the prompt adds around a window (specials included)."""
        raise NotImplementedError

    def inline_cost(self, labels: Sequence[str] | None, ctx: PromptContext) -> list[int]:
        """Tokens the prompt inserts after each word (0 for most words)."""
        return [0] * (len(labels) if labels is not None else 0)

    def build(
        self, pieces: Sequence[Sequence[int]], labels: Sequence[str] | None, ctx: PromptContext
    ) -> Prompted:
        raise NotImplementedError


SCHEMAS: dict[str, type[PromptSchema]] = {}


def register_schema(name: str) -> Callable[[type[PromptSchema]], type[PromptSchema]]:
    """Class decorator: make a schema available by ``name`` (in configs and :func:`get_schema`)."""

    def deco(cls: type[PromptSchema]) -> type[PromptSchema]:
        if name in SCHEMAS:
            raise ValueError(f"register_schema: {name!r} is already registered")
        cls.name = name
        SCHEMAS[name] = cls
        return cls

    return deco


def get_schema(name: str) -> PromptSchema:
    if name not in SCHEMAS:
        raise ValueError(f"prompts: unknown schema {name!r}; registered: {sorted(SCHEMAS)}")
    return SCHEMAS[name]()


def _body(pieces: Sequence[Sequence[int]], start: int, after: Sequence[list[int]] | None = None):
    ids: list[int] = []
    positions: list[int] = []
    for i, p in enumerate(pieces):
        positions.append(start + len(ids))
        ids.extend(p)
        if after is not None and after[i]:
            ids.extend(after[i])
    return ids, positions


@register_schema("plain")
class PlainPrompt(PromptSchema):
    def overhead(self, ctx: PromptContext) -> int:
        return 2

    def build(self, pieces, labels, ctx):
        ids, pos = _body(pieces, 1)
        return Prompted([ctx.cls_id, *ids, ctx.sep_id], pos)


@register_schema("option_prefix")
class OptionPrefixPrompt(PromptSchema):
    def _prefix(self, ctx: PromptContext) -> list[int]:
        out: list[int] = []
        for i, t in enumerate(ctx.order):
            if i:
                out.extend(ctx.comma_ids)
            out.extend(ctx.label_ids[t])
        return out

    def overhead(self, ctx: PromptContext) -> int:
        return 3 + len(self._prefix(ctx))

    def build(self, pieces, labels, ctx):
        # labels are deliberately ignored: the query prefix must not depend on gold labels.
        prefix = [ctx.cls_id, *self._prefix(ctx), ctx.sep_id]
        ids, pos = _body(pieces, len(prefix))
        return Prompted([*prefix, *ids, ctx.sep_id], pos)


@register_schema("label_aware")
class LabelAwarePrompt(PromptSchema):
    needs_labels = True

    def _inserts(self, labels: Sequence[str], ctx: PromptContext) -> list[list[int]]:
        out: list[list[int]] = []
        for i, lab in enumerate(labels):
            run_ends = lab != "O" and (i + 1 == len(labels) or labels[i + 1] != lab)
            out.append([*ctx.open_ids, *ctx.label_ids[lab], *ctx.close_ids] if run_ends else [])
        return out

    def overhead(self, ctx: PromptContext) -> int:
        return 2

    def inline_cost(self, labels, ctx):
        if labels is None:
            raise ValueError("label_aware prompt: needs gold labels (it is a support-side schema)")
        return [len(x) for x in self._inserts(labels, ctx)]

    def build(self, pieces, labels, ctx):
        if labels is None:
            raise ValueError("label_aware prompt: needs gold labels (it is a support-side schema)")
        ids, pos = _body(pieces, 1, self._inserts(labels, ctx))
        return Prompted([ctx.cls_id, *ids, ctx.sep_id], pos)


def plan_windows(costs: Sequence[int], budget: int, overlap: int = 0) -> list[Window]:
    """Split words with token ``costs`` into windows of total cost <= ``budget``.

    Consecutive windows share up to ``overlap`` words (never all of a window); each word is owned by
    exactly one window, the overlap split at its middle, so every word is read with context on both sides.
    """
    if budget < 1:
        raise ValueError(
            f"plan_windows: budget={budget} leaves no room for words; raise max_length or use shorter labels"
        )
    n = len(costs)
    if n == 0:
        return [Window(0, 0, 0, 0)]
    spans: list[tuple[int, int]] = []
    start = 0
    while True:
        end, total = start, 0
        while end < n and (end == start or total + min(costs[end], budget) <= budget):
            total += min(costs[end], budget)
            end += 1
        spans.append((start, end))
        if end >= n:
            break
        start = max(end - overlap, start + 1)
    windows = []
    for i, (s, e) in enumerate(spans):
        own_s = s if i == 0 else (s + spans[i - 1][1] + 1) // 2
        own_e = e if i == len(spans) - 1 else (spans[i + 1][0] + e + 1) // 2
        own_s = max(own_s, windows[-1].own_end if windows else 0)
        windows.append(Window(s, e, own_s, max(own_e, own_s)))
    return windows
