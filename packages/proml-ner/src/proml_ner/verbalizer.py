"""Label words for entity types: what the prompts write where a type is named (ProML, Sec. 3.2).

The default turns a type string into words: Few-NERD's ``person-artist/author`` becomes
``"person artist / author"``, and common abbreviations (OntoNotes, CoNLL, WNUT) are spelt out. Users
override any type with a name or a short description.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

__all__ = ["ABBREVIATIONS", "Verbalizer", "default_verbalization"]

ABBREVIATIONS: dict[str, str] = {
    "PER": "person",
    "PERSON": "person",
    "LOC": "location",
    "ORG": "organization",
    "MISC": "miscellaneous",
    "GPE": "geopolitical entity",
    "NORP": "nationality religious political group",
    "FAC": "facility",
    "WORK_OF_ART": "work of art",
    "LAW": "law",
    "LANGUAGE": "language",
    "DATE": "date",
    "TIME": "time",
    "PERCENT": "percent",
    "MONEY": "money",
    "QUANTITY": "quantity",
    "ORDINAL": "ordinal",
    "CARDINAL": "cardinal",
    "EVENT": "event",
    "PRODUCT": "product",
    "CORP": "corporation",
    "GRP": "group",
    "CW": "creative work",
    "PROD": "product",
}


def default_verbalization(label: str) -> str:
    """Words for a type string: abbreviations spelt out, ``-``/``_`` to spaces, ``/`` kept as a word."""
    if label in ABBREVIATIONS:
        return ABBREVIATIONS[label]
    if label.upper() in ABBREVIATIONS and label.isupper():
        return ABBREVIATIONS[label.upper()]
    words = re.sub(r"[-_]+", " ", label)
    words = re.sub(r"\s*/\s*", " / ", words)
    words = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", words)  # camelCase
    return " ".join(words.split()).lower()


class Verbalizer:
    """Maps entity types to label words; ``overrides`` wins over :func:`default_verbalization`."""

    def __init__(self, overrides: Mapping[str, str] | None = None) -> None:
        self.overrides = dict(overrides or {})
        for k, v in self.overrides.items():
            if not isinstance(v, str) or not v.strip():
                raise ValueError(
                    f"Verbalizer: the label words for {k!r} must be a non-empty string, got {v!r}"
                )

    def __call__(self, label: str) -> str:
        return self.overrides.get(label) or default_verbalization(label)

    def words(self, labels: Sequence[str]) -> dict[str, str]:
        return {lab: self(lab) for lab in labels}
