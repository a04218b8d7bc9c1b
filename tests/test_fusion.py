"""Reciprocal rank fusion against hand-computed numbers, and FTS5 query building."""

from __future__ import annotations

import pytest

from mmstack.index.fts import match_expression, searchable_text, words
from mmstack.index.fusion import reciprocal_rank_fusion


def test_rrf_matches_a_hand_computed_example():
    dense = ["a", "b", "c"]
    bm25 = ["c", "a", "d"]
    fused = reciprocal_rank_fusion([dense, bm25], k=60)
    # a: 1/61 + 1/62 = 0.032522, c: 1/63 + 1/61 = 0.032266, b: 1/62 = 0.016129, d: 1/63 = 0.015873
    assert [d for d, _ in fused] == ["a", "c", "b", "d"]
    assert [round(s, 6) for _, s in fused] == [0.032522, 0.032266, 0.016129, 0.015873]
    assert dict(fused)["a"] == pytest.approx(1 / 61 + 1 / 62)


def test_rrf_k_weights_duplicates_and_ties():
    # k = 0: 1/rank exactly; a duplicate inside one ranking counts once, at its best rank
    assert reciprocal_rank_fusion([[1, 2, 1]], k=0) == [(1, 1.0), (2, 0.5)]
    weighted = dict(reciprocal_rank_fusion([[1, 2], [2, 1]], k=0, weights=[2.0, 1.0]))
    assert weighted == {1: 2.0 + 0.5, 2: 1.0 + 1.0}
    # x (ranks 1, 3) and y (3, 1) tie at 1/61 + 1/63 = 0.032266 > z's 2/62 = 0.032258; the tie goes to the
    # id seen first
    tie = reciprocal_rank_fusion([["x", "z", "y"], ["y", "z", "x"]], k=60)
    assert [d for d, _ in tie] == ["x", "y", "z"]
    scores = dict(tie)
    assert scores["x"] == scores["y"] == pytest.approx(1 / 61 + 1 / 63)
    assert scores["z"] == pytest.approx(2 / 62)
    with pytest.raises(ValueError, match="weights"):
        reciprocal_rank_fusion([[1]], weights=[1.0, 2.0])
    assert reciprocal_rank_fusion([]) == []


def test_match_expression_quotes_words_and_excludes_negatives():
    assert match_expression(["red circle"], ["blue"]) == '("red" OR "circle") NOT ("blue")'
    assert match_expression(['AND "x" -y*'], []) == '("and" OR "x" OR "y")'  # operators searched literally
    assert match_expression([], ["blue"]) is None
    assert match_expression(["red"], ["red"]) == '("red")'  # a word cannot be both wanted and excluded
    assert words("beach_sunset-2024.jpg") == ["beach", "sunset", "2024", "jpg"]
    assert searchable_text("/p/beach_sunset.jpg", "a view", ["trip"]) == "a view beach sunset trip"
