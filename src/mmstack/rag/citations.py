"""Citations in generated answers: ``[2]``, ``[1, 3]``, ``[1][3]`` (and ``[ 2 ]``, as word-level
tokenizers decode them), parsed, removed from the answer text and mapped back to the prompt's sources."""

from __future__ import annotations

import re
from collections.abc import Sequence

from mmstack.rag.types import Source

_CITATION = re.compile(r"\[\s*(\d+(?:\s*[,;]\s*\d+)*)\s*\]")


def parse_citations(text: str) -> list[int]:
    """The cited numbers in order of first mention, without repeats."""
    out: list[int] = []
    for match in _CITATION.finditer(text):
        for part in re.split(r"[,;]", match.group(1)):
            n = int(part)
            if n not in out:
                out.append(n)
    return out


def strip_citations(text: str) -> str:
    """``text`` without its citation markers (spaces tidied, no space left before punctuation)."""
    text = _CITATION.sub(" ", text)
    text = re.sub(r"\s+([.,;:!?])", r"\1", text)
    return " ".join(text.split())


def map_citations(numbers: Sequence[int], sources: Sequence[Source]) -> tuple[list[int], list[int]]:
    """Split cited numbers into (valid, invalid): valid ones name a source that was in the prompt."""
    in_prompt = {s.number for s in sources if s.number > 0}
    valid = [n for n in numbers if n in in_prompt]
    invalid = [n for n in numbers if n not in in_prompt]
    return valid, invalid
