"""Second-stage reranking of fused sources by the two-tower (CLIP/SigLIP) score.

The fused list mixes ranks from retrievers whose scores are not comparable; the reranker scores every
candidate against the query in one embedding space: the query image against source images when the
question has an image (image-image), otherwise the question text against source images (text-image) or
source texts (text-text, for documents without an image).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from mmstack.rag.encoders import TwoTowerEncoder
from mmstack.rag.types import Query, Source


class TwoTowerReranker:
    """Re-sorts sources by cosine similarity under a two-tower model; sets ``Source.rerank_score``.

    Args:
        model: a ``TwoTowerModel`` with its processor attached.
        load_image: reads a source image from its path (default: ``mmstack.data.images.load_image``).
    """

    def __init__(self, model: Any, load_image: Callable[[str], Image.Image] | None = None) -> None:
        self.encoder = TwoTowerEncoder(model, load_image)
        self._image_cache: dict[str, torch.Tensor] = {}

    def _source_vectors(self, sources: list[Source]) -> torch.Tensor:
        """One unit vector per source: its image's (cached by path) or, without an image, its text's."""
        missing = list(dict.fromkeys(s.path for s in sources if s.path and s.path not in self._image_cache))
        for path, vec in zip(missing, self.encoder.embed_paths(missing), strict=True):
            self._image_cache[path] = vec
        texts = [s.text or s.id for s in sources if not s.path]
        text_vecs = iter(self.encoder.embed_texts(texts)) if texts else iter(())
        return torch.stack([self._image_cache[s.path] if s.path else next(text_vecs) for s in sources])  # (N, D)

    def rerank(self, query: Query, sources: list[Source]) -> list[Source]:
        """``sources`` sorted by similarity to the query (stable for ties)."""
        if not sources:
            return []
        enc = self.encoder
        if query.image is not None:
            q = enc.embed_images([query.image])[0]
        else:
            q = enc.embed_texts([enc.known_text(query.text) or query.text])[0]
        scores = (self._source_vectors(sources) @ q).tolist()  # (N,)
        for src, score in zip(sources, scores, strict=True):
            src.rerank_score = float(score)
        return sorted(sources, key=lambda s: -(s.rerank_score or 0.0))
