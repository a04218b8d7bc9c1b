"""Full-text queries for SQLite FTS5 (BM25 ranking), built from user text without FTS5 syntax surprises.

User text is split into words and each word is quoted, so characters FTS5 treats as operators (``-``,
``"``, ``*``, ``:``, ``AND``/``OR``/``NOT`` in capitals) are searched literally. Positive words are OR-ed
(BM25 then ranks documents with more and rarer matching words higher); words of negative query parts
exclude documents that contain them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

_WORD = re.compile(r"[^\W_]+", re.UNICODE)  # as FTS5 unicode61: "_" separates words


def words(text: str) -> list[str]:
    """Lower-cased word tokens of ``text`` (runs of letters and digits, as FTS5 splits them)."""
    return [w.lower() for w in _WORD.findall(text)]


def match_expression(positive: Sequence[str], negative: Sequence[str] = ()) -> str | None:
    """An FTS5 MATCH expression: any positive word, none of the negative words; None if no positive word."""
    pos = list(dict.fromkeys(w for t in positive for w in words(t)))
    neg = list(dict.fromkeys(w for t in negative for w in words(t) if w not in pos))
    if not pos:
        return None
    expr = "(" + " OR ".join(f'"{w}"' for w in pos) + ")"
    if neg:
        expr += " NOT (" + " OR ".join(f'"{w}"' for w in neg) + ")"
    return expr


def searchable_text(path: str, caption: str | None, tags: Sequence[str]) -> str:
    """What BM25 indexes for an item: its caption or chunk text, its file name's words and its tags."""
    stem = Path(path.split("#", 1)[0]).stem.replace("_", " ").replace("-", " ")
    return " ".join(p for p in (caption or "", stem, " ".join(tags)) if p)
