"""People's labels for captured predictions: which labels are valid, and which one counts.

A label is one of the model's labels, by its common or scientific name (case and surrounding spaces do
not matter; it is stored as the common name), or one of two answers outside the label set:
``not_an_animal`` and ``unknown_species``. A prediction may get several labels; the one that counts (the
*resolved* label) is the latest from the most trusted source, trust going expert > reviewer > user. So an
expert's label stands until another expert relabels, whatever users say after it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .store import InvalidFeedbackLabel

__all__ = ["SPECIAL_LABELS", "TRUST", "LabelSet", "resolve_label", "resolved", "MAX_COMMENT_CHARS"]

NOT_AN_ANIMAL = "not_an_animal"
UNKNOWN_SPECIES = "unknown_species"
SPECIAL_LABELS = (NOT_AN_ANIMAL, UNKNOWN_SPECIES)
TRUST: Mapping[str, int] = {"expert": 3, "reviewer": 2, "user": 1}
MAX_COMMENT_CHARS = 2000


def _key(name: str) -> str:
    return " ".join(name.split()).casefold()


class LabelSet:
    """The names feedback may use: each label's common and scientific name, mapped to the common name.

    Built from label names (str), :class:`~speciesclf.bundles.bundle.Label` objects (``name``,
    ``scientific_name``) or ``(name, scientific_name)`` pairs."""

    def __init__(self, labels: Iterable[Any]):
        self._by_key: dict[str, str] = {}
        self._shown: list[str] = []
        for item in labels:
            if isinstance(item, str):
                names = (item, None)
            elif isinstance(item, Sequence) and len(item) == 2:
                names = (item[0], item[1])
            else:
                names = (getattr(item, "name"), getattr(item, "scientific_name", None))
            common, scientific = names
            for name in (common, scientific):
                if name:
                    self._by_key.setdefault(_key(name), common)
                    self._shown.append(name)
        for special in SPECIAL_LABELS:
            self._by_key[special] = special

    def __len__(self) -> int:
        return len(self._shown)

    def resolve(self, label: object) -> str:
        if not isinstance(label, str) or not label.strip():
            raise InvalidFeedbackLabel(f"label must be a non-empty string, got {label!r}")
        found = self._by_key.get(_key(label))
        if found is not None:
            return found
        pool = {_key(n): n for n in (*self._shown, *SPECIAL_LABELS)}
        closest = [pool[k] for k in difflib.get_close_matches(_key(label), list(pool), n=5, cutoff=0.6)]
        hint = f"; closest: {', '.join(closest)}" if closest else ""
        raise InvalidFeedbackLabel(
            f"label {label!r} is not one of the model's labels (common or scientific name) nor "
            f"{' / '.join(SPECIAL_LABELS)}{hint}", closest)


def resolve_label(label: object, labels: Iterable[Any]) -> str:
    """``label`` as stored (the common name, or a special label); InvalidFeedbackLabel with the closest
    names when it is none of them."""
    return LabelSet(labels).resolve(label)


def check_source(source: object) -> str:
    if source not in TRUST:
        raise InvalidFeedbackLabel(f"source must be one of {', '.join(TRUST)}, got {source!r}")
    return source  # type: ignore[return-value]


def check_comment(comment: object) -> str | None:
    if comment is None:
        return None
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT_CHARS:
        raise InvalidFeedbackLabel(f"comment must be a string of at most {MAX_COMMENT_CHARS} characters")
    return comment


def resolved(entries: Iterable[Mapping[str, Any]]) -> str | None:
    """The label that counts among feedback entries (``label``, ``source``, ``time``, ``id``): the latest
    from the most trusted source; None without entries."""
    best = max(entries, key=lambda e: (TRUST.get(e["source"], 0), e["time"], e["id"]), default=None)
    return None if best is None else best["label"]


def is_correct(model_label: str | None, feedback_label: str) -> bool:
    """Whether the model's answer agrees with a person's: the same label, or "unknown" (no label) for an
    image a person calls not an animal or a species outside the label set."""
    if feedback_label in SPECIAL_LABELS:
        return model_label is None
    return model_label == feedback_label
