"""Unit embeddings of images and texts from a two-tower model, for retrieval and reranking (no gradients)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image


class TwoTowerEncoder:
    """Wraps a ``TwoTowerModel`` (processor attached): PIL images / strings -> (N, D) unit vectors on CPU.

    Args:
        model: the two-tower model.
        load_image: reads an image path (default: ``mmstack.data.images.load_image``).
    """

    def __init__(self, model: Any, load_image: Callable[[str], Image.Image] | None = None) -> None:
        from mmstack.data.images import load_image as default_load

        self.model = model.eval()
        self.load_image = load_image or default_load
        self.device = next(model.parameters()).device

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        with torch.inference_mode():
            pixels = self.model.processor.images(list(images)).to(self.device)
            return self.model.encode_image(pixels, normalize=True).float().cpu()  # (N, D)

    @property
    def dense(self) -> bool:
        """Whether the image tower's patch tokens were trained to match texts (the two-tower trainer's
        region-text term, recorded in the checkpoint's card): only then are patch scores worth adding."""
        loss = self.model.card.get("training", {}).get("config", {}).get("loss", {})
        return float(loss.get("region_weight") or 0.0) > 0.0

    def embed_images_dense(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, D)`` unit image embeddings and ``(N, T, D)`` unit patch-token embeddings (one tower pass)."""
        with torch.inference_mode():
            pixels = self.model.processor.images(list(images)).to(self.device)
            pooled, patches = self.model.encode_image_tokens(pixels)
            return F.normalize(pooled.float(), dim=-1).cpu(), F.normalize(patches.float(), dim=-1).cpu()

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        with torch.inference_mode():
            enc = {k: v.to(self.device) for k, v in self.model.processor.text(list(texts)).items()}
            return self.model.encode_text(enc["input_ids"], enc["attention_mask"], normalize=True).float().cpu()

    def known_text(self, text: str) -> str:
        """``text`` without the words the text tower's tokenizer cannot represent (unknown tokens carry no
        meaning but still move the pooled embedding); "" when no word but stop words is left."""
        return known_text(self.model.processor.tokenizer, text)

    def embed_paths(self, paths: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Image embeddings of files, ``batch_size`` at a time; (0, D) for no paths."""
        chunks = self._over_files(paths, self.embed_images, batch_size)
        return torch.cat(chunks) if chunks else torch.zeros(0, 0)

    def embed_paths_dense(self, paths: Sequence[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """``embed_images_dense`` of files, ``batch_size`` at a time; (0, D) and (0, 0, D) for no paths."""
        chunks = self._over_files(paths, self.embed_images_dense, batch_size)
        if not chunks:
            return torch.zeros(0, 0), torch.zeros(0, 0, 0)
        return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])

    def _over_files(self, paths: Sequence[str], embed: Callable[[list[Image.Image]], Any], batch_size: int) -> list:
        """``embed`` applied to the images of ``paths``, ``batch_size`` files at a time."""
        return [
            embed([self.load_image(p) for p in paths[i : i + batch_size]]) for i in range(0, len(paths), batch_size)
        ]


ARTICLES = frozenset({"a", "an"})


def known_text(tokenizer: Any, text: str) -> str:
    """A caption-like query for the text tower: the words of ``text`` that ``tokenizer`` maps to something
    other than its unknown token, from the first content word (with its article) to the last, joined by
    spaces; "" when no word but stop words is left. A tokenizer without an unknown token keeps every word.

    Unknown tokens carry no meaning but still move the pooled embedding; a question's leading function words
    do the same to a tower trained on captions: "In which hall is the exhibit with a purple star?" reads
    "in is the with a purple star" to a world CLIP, and "a purple star" after the trim. Words between content
    words stay ("a blue square left of a green star"). On the world RAG benchmark (seed 0, 50 exhibits, the
    session-11 demo CLIP) fact questions' text -> image recall@5 rises 0.43 -> 0.70.
    """
    from mmstack.rag.retrievers import STOP_WORDS

    words = re.findall(r"\w+", text.lower())
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None:
        words = [w for w in words if unk not in tokenizer(w, add_special_tokens=False)["input_ids"]]
    content = [i for i, w in enumerate(words) if w not in STOP_WORDS]
    if not content:
        return ""
    start = content[0] - 1 if content[0] > 0 and words[content[0] - 1] in ARTICLES else content[0]
    return " ".join(words[start : content[-1] + 1])
