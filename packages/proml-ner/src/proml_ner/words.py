"""Splitting raw text into words with character offsets, for ``predict`` on untokenised text.

Words are runs of letters/digits joined by inner hyphens or apostrophes (``Coca-Cola``, ``O'Neil``);
every other non-space character is a word of its own. Offsets index the original string.
"""

from __future__ import annotations

import re

__all__ = ["split_words"]

_WORD = re.compile(r"\w+(?:[-'\u2019.]\w+)*|[^\w\s]")


def split_words(text: str) -> list[tuple[str, int, int]]:
    """``[(word, start, end_exclusive), ...]`` with ``text[start:end] == word``."""
    if not isinstance(text, str):
        raise TypeError(f"split_words: text must be str, got {type(text).__name__}")
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]
