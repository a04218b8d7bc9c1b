"""Reciprocal rank fusion (Cormack, Clarke and Buettcher, SIGIR 2009), written out so its rules are ours.

``score(d) = sum over rankings r of weight_r / (k + rank_r(d))`` with ranks counted from 1 and ``k = 60``
(the paper's value); a document missing from a ranking adds nothing for it. Items are keyed on their id,
so the same item found by dense search and by BM25 adds up.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

RRF_K = 60


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[Hashable]], k: int = RRF_K, weights: Sequence[float] | None = None
) -> list[tuple[Hashable, float]]:
    """Fuse best-first rankings of ids into one ``[(id, score)]`` list, best first.

    Args:
        rankings: each a best-first sequence of ids (duplicates within a ranking count once, at their
            best rank).
        k: the RRF constant; larger values flatten the difference between top and lower ranks.
        weights: one per ranking (default 1.0 each).

    Ties are broken by the best rank any ranking gave the id, then by the order of first appearance,
    so the result is deterministic.
    """
    if weights is None:
        weights = [1.0] * len(rankings)
    if len(weights) != len(rankings):
        raise ValueError(f"got {len(weights)} weights for {len(rankings)} rankings")
    scores: dict[Hashable, float] = {}
    best: dict[Hashable, int] = {}
    for ranking, weight in zip(rankings, weights, strict=True):
        seen: set[Hashable] = set()
        for rank, doc in enumerate(ranking, start=1):
            if doc in seen:
                continue
            seen.add(doc)
            scores[doc] = scores.get(doc, 0.0) + weight / (k + rank)
            best[doc] = min(best.get(doc, rank), rank)
    order = {doc: i for i, doc in enumerate(scores)}
    return sorted(scores.items(), key=lambda kv: (-kv[1], best[kv[0]], order[kv[0]]))
