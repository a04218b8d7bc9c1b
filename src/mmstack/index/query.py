"""Query parsing: weighted sums of texts, images and stored items, with negatives.

    "red circle"                      one text
    "2:red circle" + ./img.png - blue  2 x text + image - text (rclip / clip-retrieval style arithmetic)
    img:photos/cat.jpg  id:1234       an image by path; a stored item's vector ("more like this")

Tokens are the shell words of a command line (or ``shlex.split`` of one string). ``+`` and ``-`` stand alone
or prefix a term (``-blue``) and separate terms: consecutive words are one phrase (``red circle - blue`` is
two terms). A term may start with ``W:`` for a weight (a number). A term is an image when
it has the prefix ``img:``/``image:``, or an image suffix and either exists or contains a ``/``; an item
when it has the prefix ``id:``; otherwise text.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mmstack.data.images import IMAGE_SUFFIXES
from mmstack.errors import CollectionError

_WEIGHT = re.compile(r"^(\d+(?:\.\d*)?|\.\d+):(.*)$", re.DOTALL)


@dataclass(frozen=True)
class QueryPart:
    """One term of a query: ``kind`` is ``text``, ``image`` (a path) or ``item`` (a stored id)."""

    kind: str
    value: str | int
    weight: float = 1.0


def parse_query(
    query: str | Sequence[str] | None = None, images: Sequence[str | Path] = (), like: Sequence[int] = ()
) -> list[QueryPart]:
    """Parse query tokens (or one string, split like a shell) plus extra images and item ids.

    Raises:
        CollectionError: an empty query, a dangling ``+``/``-``, a bad weight or a missing image.
    """
    tokens = shlex.split(query) if isinstance(query, str) else list(query or [])
    parts: list[QueryPart] = []
    sign: float | None = None
    for tok in tokens:
        if tok in ("+", "-"):
            if sign is not None:
                raise CollectionError(f"query: two operators in a row before {tok!r}; write `a + b - c`")
            sign = 1.0 if tok == "+" else -1.0
            continue
        if len(tok) > 1 and tok[0] in "+-" and sign is None:
            sign, tok = (1.0 if tok[0] == "+" else -1.0), tok[1:]
        part = _term(tok, 1.0 if sign is None else sign)
        if sign is None and part.kind == "text" and part.weight == 1.0 and parts and parts[-1].kind == "text":
            parts[-1] = QueryPart("text", f"{parts[-1].value} {part.value}", parts[-1].weight)  # words of one phrase
        else:
            parts.append(part)
        sign = None
    if sign is not None:
        raise CollectionError("query: it ends with an operator; add a term after the last + or -")
    parts += [_image_part(str(p), 1.0) for p in images]
    parts += [QueryPart("item", int(i), 1.0) for i in like]
    if not parts:
        raise CollectionError("empty query: give a text, --image PATH or --like ID")
    if not any(p.weight > 0 for p in parts):
        raise CollectionError("query has only negative terms; add something to look for")
    return parts


def _term(tok: str, sign: float) -> QueryPart:
    weight, m = 1.0, _WEIGHT.match(tok)
    if m:
        weight, tok = float(m.group(1)), m.group(2)
    tok = tok.strip()
    if not tok:
        raise CollectionError("query: empty term (a weight with nothing after the colon?)")
    lower = tok.lower()
    if lower.startswith(("img:", "image:")):
        return _image_part(tok.split(":", 1)[1], sign * weight)
    if lower.startswith("id:"):
        try:
            return QueryPart("item", int(tok[3:]), sign * weight)
        except ValueError:
            raise CollectionError(f"query: {tok!r} is not an item id; write id:<number>") from None
    if Path(lower).suffix in IMAGE_SUFFIXES and (Path(tok).expanduser().exists() or "/" in tok):
        return _image_part(tok, sign * weight)
    return QueryPart("text", tok, sign * weight)


def _image_part(path: str, weight: float) -> QueryPart:
    p = Path(path).expanduser()
    if not p.is_file():
        raise CollectionError(f"query image not found: {path}; check the path")
    return QueryPart("image", str(p.resolve()), weight)


def text_terms(parts: Sequence[QueryPart]) -> tuple[list[str], list[str]]:
    """``(positive texts, negative texts)`` of a query, for full-text search."""
    pos = [str(p.value) for p in parts if p.kind == "text" and p.weight > 0]
    neg = [str(p.value) for p in parts if p.kind == "text" and p.weight < 0]
    return pos, neg
