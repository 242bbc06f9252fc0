"""Readers and writers for the few-shot NER formats ProML is evaluated on.

Everything is converted to the Few-NERD convention (Ding et al., ACL 2021, Sec. 4): one label per word,
IO scheme, ``"O"`` or the entity type string (``person-artist/author``). Episodes follow Few-NERD's
JSONL layout: ``{"support": {"word": [[...]], "label": [[...]]}, "query": {...}, "types": [...]}``.

Every reader raises :class:`FormatError` naming the file and the 1-based line where the input went wrong.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Literal

__all__ = [
    "Episode",
    "FormatError",
    "ReadReport",
    "Scheme",
    "Sentence",
    "detect_scheme",
    "read_conll",
    "read_fewnerd_episodes",
    "read_fewnerd_flat",
    "read_gliner_json",
    "read_hou_json",
    "to_io",
    "write_conll",
    "write_fewnerd_episodes",
    "write_fewnerd_flat",
    "write_gliner_json",
]

Scheme = Literal["IO", "BIO", "IOBES"]
OUTSIDE = "O"


class FormatError(ValueError):
    """Malformed input; the message names the file and the 1-based line."""

    def __init__(self, path: str | Path, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


@dataclass
class Sentence:
    """A tokenised sentence with one IO label per word (``"O"`` or the entity type)."""

    words: list[str]
    labels: list[str]

    def __post_init__(self) -> None:
        if len(self.words) != len(self.labels):
            raise ValueError(
                f"Sentence: words ({len(self.words)}) and labels ({len(self.labels)}) must have equal length"
            )

    @property
    def types(self) -> set[str]:
        return {label for label in self.labels if label != OUTSIDE}


@dataclass
class Episode:
    """An N-way K-shot episode: a labelled support set, a query set and the N entity types."""

    types: list[str]
    support: list[Sentence]
    query: list[Sentence] = field(default_factory=list)

    def __post_init__(self) -> None:
        allowed = set(self.types)
        for side, sents in (("support", self.support), ("query", self.query)):
            for i, s in enumerate(sents):
                extra = s.types - allowed
                if extra:
                    raise ValueError(
                        f"Episode: {side} sentence {i} has labels {sorted(extra)} that are not in "
                        f"types={self.types}; add them to types or relabel them 'O'"
                    )

    def to_json(self) -> dict:
        return {
            "support": {"word": [s.words for s in self.support], "label": [s.labels for s in self.support]},
            "query": {"word": [s.words for s in self.query], "label": [s.labels for s in self.query]},
            "types": list(self.types),
        }


# ----------------------------------------------------------------------------------------------- schemes


def detect_scheme(tag_sequences: Iterable[Sequence[str]]) -> Scheme:
    """Which tagging scheme a corpus uses: IOBES if any ``E-``/``S-`` tag, BIO if any ``B-``, else IO.

    Bare IO corpora (Few-NERD) carry no prefix at all; ``I-X`` alone is also IO.
    """
    prefixes = set()
    for tags in tag_sequences:
        for tag in tags:
            if len(tag) > 2 and tag[1] == "-" and tag[0] in "BIESL":
                prefixes.add(tag[0])
    if prefixes & {"E", "S", "L"}:
        return "IOBES"
    if "B" in prefixes:
        return "BIO"
    return "IO"


def _strip(tag: str) -> str:
    if tag == OUTSIDE or tag == "":
        return OUTSIDE
    if len(tag) > 2 and tag[1] == "-" and tag[0] in "BIESLU":
        return tag[2:]
    return tag


def to_io(tags: Sequence[str], scheme: Scheme | None = None) -> list[str]:
    """Convert BIO/IOBES/IO tags to Few-NERD IO labels (the bare type string, or ``"O"``).

    Two adjacent entities of the same type collapse into one IO run: that is the information IO cannot
    hold, and the reason Few-NERD's metric counts maximal runs (Ding et al. 2021, Sec. 5.1).
    """
    if scheme is not None and scheme not in ("IO", "BIO", "IOBES"):
        raise ValueError(f"to_io: scheme={scheme!r} must be 'IO', 'BIO' or 'IOBES'")
    out = []
    for i, tag in enumerate(tags):
        if not isinstance(tag, str):
            raise ValueError(f"to_io: tag {i} is {type(tag).__name__}, expected str")
        out.append(_strip(tag))
    return out


# ----------------------------------------------------------------------------------------------- readers


def _sentences_from_json(path: Path, line: int, obj: object, side: str) -> list[Sentence]:
    if not isinstance(obj, dict) or "word" not in obj or "label" not in obj:
        raise FormatError(path, line, f"'{side}' must be an object with 'word' and 'label' lists")
    words, labels = obj["word"], obj["label"]
    if not isinstance(words, list) or not isinstance(labels, list) or len(words) != len(labels):
        raise FormatError(path, line, f"'{side}.word' and '{side}.label' must be lists of equal length")
    out = []
    for j, (w, lab) in enumerate(zip(words, labels)):
        if not isinstance(w, list) or not isinstance(lab, list) or len(w) != len(lab):
            raise FormatError(
                path, line, f"{side} sentence {j}: 'word' and 'label' must be lists of equal length"
            )
        if not all(isinstance(x, str) for x in w + lab):
            raise FormatError(path, line, f"{side} sentence {j}: words and labels must be strings")
        out.append(Sentence(list(w), to_io(lab)))
    return out


def read_fewnerd_episodes(path: str | Path) -> list[Episode]:
    """Few-NERD episode JSONL (one episode per line, IO labels); blank lines are skipped."""
    path = Path(path)
    episodes = []
    with path.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as err:
                raise FormatError(path, lineno, f"invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise FormatError(path, lineno, "an episode must be a JSON object")
            missing = [k for k in ("support", "query", "types") if k not in obj]
            if missing:
                raise FormatError(path, lineno, f"episode is missing {missing}")
            types = obj["types"]
            if not isinstance(types, list) or not all(isinstance(t, str) for t in types) or not types:
                raise FormatError(path, lineno, "'types' must be a non-empty list of strings")
            support = _sentences_from_json(path, lineno, obj["support"], "support")
            query = _sentences_from_json(path, lineno, obj["query"], "query")
            try:
                episodes.append(Episode(list(types), support, query))
            except ValueError as err:
                raise FormatError(path, lineno, str(err)) from None
    return episodes


def _read_columns(path: Path, sep: str | None) -> list[tuple[list[list[str]], int]]:
    """Blocks of whitespace/TAB separated rows, each with the line number where it starts."""
    blocks: list[tuple[list[list[str]], int]] = []
    rows: list[list[str]] = []
    start = 1
    with path.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\n").rstrip("\r")
            if not line.strip() or line.startswith("-DOCSTART-"):
                if rows:
                    blocks.append((rows, start))
                rows = []
                continue
            if not rows:
                start = lineno
            cols = line.split(sep) if sep else line.split()
            rows.append([*cols, str(lineno)])
    if rows:
        blocks.append((rows, start))
    return blocks


def read_fewnerd_flat(path: str | Path) -> list[Sentence]:
    """Few-NERD flat files (``supervised/train.txt``): ``word<TAB>label`` per line, blank line between."""
    path = Path(path)
    out = []
    for rows, _ in _read_columns(path, "\t"):
        words, labels = [], []
        for cols in rows:
            lineno = int(cols[-1])
            if len(cols) - 1 != 2:
                raise FormatError(path, lineno, f"expected 'word<TAB>label', got {len(cols) - 1} columns")
            words.append(cols[0])
            labels.append(_strip(cols[1]))
        out.append(Sentence(words, labels))
    return out


_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))  # zero-width, BOM, soft hyphen


@dataclass
class ReadReport:
    """What :func:`read_conll` did not take verbatim, so a messy corpus is read knowingly.

    separator_lines: lines holding only whitespace (WNUT-17's train split ends sentences with a TAB),
    read as sentence breaks. docstart: ``-DOCSTART-`` lines skipped. cleaned: (line, token) pairs whose
    invisible characters (zero-width space, BOM, soft hyphen) were removed. skipped: (line, reason) for
    rows that were dropped (an empty token, a missing tag). no_tab: lines of a TAB-separated file read by
    splitting on other whitespace. merged: adjacent same-type entities (``B-x B-x``) that the IO scheme
    joins into one.
    """

    path: str = ""
    sentences: int = 0
    tokens: int = 0
    separator_lines: int = 0
    docstart: int = 0
    cleaned: list[tuple[int, str]] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)
    no_tab: list[int] = field(default_factory=list)
    merged: int = 0

    def summary(self) -> str:
        parts = [f"{self.path}: {self.sentences} sentences, {self.tokens} tokens"]
        if self.separator_lines:
            parts.append(f"{self.separator_lines} whitespace-only lines read as sentence breaks")
        if self.docstart:
            parts.append(f"{self.docstart} -DOCSTART- lines skipped")
        if self.cleaned:
            parts.append(
                f"invisible characters removed from {len(self.cleaned)} tokens (lines "
                + ", ".join(str(n) for n, _ in self.cleaned[:5])
                + ("..." if len(self.cleaned) > 5 else "")
                + ")"
            )
        if self.no_tab:
            parts.append(f"{len(self.no_tab)} rows without a TAB split on whitespace")
        if self.skipped:
            parts.append(
                f"{len(self.skipped)} rows skipped ("
                + "; ".join(f"line {n}: {why}" for n, why in self.skipped[:5])
                + ("..." if len(self.skipped) > 5 else "")
                + ")"
            )
        if self.merged:
            parts.append(f"{self.merged} adjacent same-type entities merged by the IO scheme")
        return "; ".join(parts)


def _prefix_error(tags: Sequence[str], scheme: Scheme) -> tuple[int, str] | None:
    """(position, message) of the first tag that is not valid for ``scheme``, else None."""
    allowed = "BI" if scheme == "BIO" else "BIESLU"
    for i, tag in enumerate(tags):
        if tag == OUTSIDE or scheme == "IO":
            continue
        head, dash, _ = tag.partition("-")
        if not dash or not head:
            return i, f"tag {tag!r} has no {scheme} prefix (the file was detected as {scheme})"
        if head not in allowed:
            return i, (
                f"tag {tag!r} has the unknown prefix {head + '-'!r}; {scheme} tags start with "
                + " or ".join(f"{c}-" for c in allowed)
            )
    return None


def read_conll(
    path: str | Path,
    token_column: int = 0,
    tag_column: int = -1,
    report: ReadReport | None = None,
) -> list[Sentence]:
    """CoNLL column files; the tag scheme (BIO, IOBES or IO) is detected and converted to IO.

    A file with a TAB on any row is split on TABs only, so a tag (or token) holding spaces is kept
    whole; other files are split on any whitespace. Lines of only whitespace end a sentence,
    ``-DOCSTART-`` lines are skipped, invisible characters (zero-width space, BOM) are removed from tokens,
    rows whose token is then empty or whose tag is missing are dropped; ``report`` (a
    :class:`ReadReport`) receives all of it. A tag with an unknown prefix (``X-person`` in a BIO file) is
    a :class:`FormatError` naming the file and line.
    """
    path = Path(path)
    rep = report if report is not None else ReadReport()
    rep.path = str(path)
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    tab = any("\t" in line and line.strip() for line in lines)
    parsed: list[tuple[list[str], list[str], list[int]]] = []
    words: list[str] = []
    tags: list[str] = []
    rows: list[int] = []

    def flush() -> None:
        nonlocal words, tags, rows
        if words:
            parsed.append((words, tags, rows))
        words, tags, rows = [], [], []

    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            if raw:
                rep.separator_lines += 1
            flush()
            continue
        if raw.startswith("-DOCSTART-"):
            rep.docstart += 1
            flush()
            continue
        if tab and "\t" in raw:
            cols = raw.split("\t")
        else:
            cols = raw.split()
            if tab:
                rep.no_tab.append(lineno)
        if len(cols) < 2:
            rep.skipped.append((lineno, f"no tag column in {raw!r}"))
            continue
        try:
            word, tag = cols[token_column], cols[tag_column].strip()
        except IndexError:
            raise FormatError(
                path, lineno, f"no column {token_column} or {tag_column} in a row of {len(cols)}"
            ) from None
        clean = word.translate(_INVISIBLE).strip()
        if clean != word:
            rep.cleaned.append((lineno, word))
        if not clean:
            rep.skipped.append((lineno, f"empty token {word!r}"))
            continue
        if not tag:
            rep.skipped.append((lineno, f"empty tag for token {clean!r}"))
            continue
        words.append(clean)
        tags.append(tag)
        rows.append(lineno)
    flush()
    scheme = detect_scheme(t for _, t, _ in parsed)
    out = []
    for words, tags, rows in parsed:
        bad = _prefix_error(tags, scheme)
        if bad is not None:
            raise FormatError(path, rows[bad[0]], bad[1])
        if scheme != "IO":
            rep.merged += sum(
                1
                for a, b in pairwise(tags)
                if b[0] in "BS" and a != OUTSIDE and a[0] in "BIES" and a[2:] == b[2:]
            )
        out.append(Sentence(words, to_io(tags, scheme)))
    rep.sentences = len(out)
    rep.tokens = sum(len(s.words) for s in out)
    return out


def read_hou_json(path: str | Path) -> dict[str, list[Episode]]:
    """Hou et al. (ACL 2020) few-shot slot-tagging JSON: ``{domain: [{"support": {"seq_ins", "seq_outs"},
    "batch" | "query": {...}}]}`` with BIO tags; returns episodes per domain with IO labels.

    The file is one JSON document, so errors name the domain and episode index (and line 1).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FormatError(path, err.lineno, f"invalid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise FormatError(path, 1, "top level must be an object {domain: [episodes]}")
    out: dict[str, list[Episode]] = {}
    for domain, eps in data.items():
        if not isinstance(eps, list):
            raise FormatError(path, None, f"domain {domain!r} must hold a list of episodes")
        out[domain] = []
        for i, ep in enumerate(eps):
            where = f"domain {domain!r} episode {i}"
            if not isinstance(ep, dict) or "support" not in ep or not ({"batch", "query"} & set(ep)):
                raise FormatError(path, None, f"{where}: needs 'support' and 'batch' (or 'query')")
            sides = []
            for key in ("support", "batch" if "batch" in ep else "query"):
                side = ep[key]
                if not isinstance(side, dict) or "seq_ins" not in side or "seq_outs" not in side:
                    raise FormatError(path, None, f"{where}: '{key}' needs 'seq_ins' and 'seq_outs'")
                sents = []
                for j, (w, t) in enumerate(zip(side["seq_ins"], side["seq_outs"])):
                    if len(w) != len(t):
                        raise FormatError(path, None, f"{where} {key} sentence {j}: lengths differ")
                    sents.append(Sentence(list(w), to_io(t)))
                sides.append(sents)
            types = sorted({x for s in sides[0] + sides[1] for x in s.types})
            out[domain].append(Episode(types, sides[0], sides[1]))
    return out


def read_gliner_json(path: str | Path) -> list[Sentence]:
    """GLiNER training JSON: a list of ``{"tokenized_text": [...], "ner": [[start, end, label], ...]}``
    with inclusive word indices. Overlapping spans keep the first one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FormatError(path, err.lineno, f"invalid JSON ({err.msg})") from None
    if not isinstance(data, list):
        raise FormatError(path, 1, "top level must be a list of records")
    out = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or "tokenized_text" not in rec or "ner" not in rec:
            raise FormatError(path, None, f"record {i}: needs 'tokenized_text' and 'ner'")
        words = list(rec["tokenized_text"])
        labels = [OUTSIDE] * len(words)
        for span in rec["ner"]:
            if len(span) != 3:
                raise FormatError(path, None, f"record {i}: span {span!r} must be [start, end, label]")
            s, e, lab = int(span[0]), int(span[1]), str(span[2])
            if not (0 <= s <= e < len(words)):
                raise FormatError(path, None, f"record {i}: span {span!r} outside {len(words)} words")
            if all(labels[k] == OUTSIDE for k in range(s, e + 1)):
                for k in range(s, e + 1):
                    labels[k] = lab
        out.append(Sentence(words, labels))
    return out


# ----------------------------------------------------------------------------------------------- writers


def write_fewnerd_episodes(path: str | Path, episodes: Iterable[Episode]) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for ep in episodes:
            f.write(json.dumps(ep.to_json(), ensure_ascii=False) + "\n")


def write_fewnerd_flat(path: str | Path, sentences: Iterable[Sentence]) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for s in sentences:
            for w, lab in zip(s.words, s.labels):
                f.write(f"{w}\t{lab}\n")
            f.write("\n")


def _io_to_bio(labels: Sequence[str]) -> list[str]:
    out, prev = [], OUTSIDE
    for lab in labels:
        out.append(OUTSIDE if lab == OUTSIDE else (f"I-{lab}" if lab == prev else f"B-{lab}"))
        prev = lab
    return out


def write_conll(path: str | Path, sentences: Iterable[Sentence]) -> None:
    """CoNLL two-column BIO (each maximal IO run becomes one B-/I- entity)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for s in sentences:
            for w, t in zip(s.words, _io_to_bio(s.labels)):
                f.write(f"{w} {t}\n")
            f.write("\n")


def write_gliner_json(path: str | Path, sentences: Iterable[Sentence]) -> None:
    from .metrics import entity_spans

    records = [
        {"tokenized_text": s.words, "ner": [[a, b - 1, t] for a, b, t in entity_spans(s.labels)]}
        for s in sentences
    ]
    Path(path).write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
