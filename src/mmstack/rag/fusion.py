"""Fusing the retrievers' ranked lists into one list of sources.

The scores come from ``mmstack.index.fusion.reciprocal_rank_fusion`` (k = 60, ranks from 1, keyed on item
id; written once, in the index package); this module only carries each item's path, snippet and the
rank every retriever gave it through the fusion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mmstack.rag.types import Hit, Source

RRF_K = 60


def fuse_hits(lists: Mapping[str, Sequence[Hit]], k: int = RRF_K) -> list[Source]:
    """One list of sources from each retriever's ranked hits (name -> hits, best first), by RRF score.

    An item found by several retrievers keeps the first non-empty path and text seen (retrievers in
    ``lists`` order) and records its rank in each.
    """
    from mmstack.index.fusion import reciprocal_rank_fusion

    names = [name for name, hits in lists.items() if hits]
    rankings = [[h.id for h in lists[name]] for name in names]
    fused = reciprocal_rank_fusion(rankings, k=k)
    first: dict[str, Source] = {}
    for name in names:
        for rank, hit in enumerate(lists[name], start=1):
            src = first.setdefault(hit.id, Source(id=hit.id, score=0.0))
            src.retrievers.setdefault(name, rank)
            src.path = src.path or hit.path
            src.text = src.text or hit.text
            for key, value in hit.metadata.items():
                src.metadata.setdefault(key, value)
    out = []
    for item_id, score in fused:
        src = first[item_id]
        src.score = float(score)
        out.append(src)
    return out
