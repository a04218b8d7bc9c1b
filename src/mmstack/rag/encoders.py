"""Unit embeddings of images and texts from a two-tower model, for retrieval and reranking (no gradients)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
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
        chunks = [
            self.embed_images([self.load_image(p) for p in paths[i : i + batch_size]])
            for i in range(0, len(paths), batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.zeros(0, 0)


def known_text(tokenizer: Any, text: str) -> str:
    """The words of ``text`` that ``tokenizer`` maps to something other than its unknown token, joined by
    spaces ("" when only stop words would be left). A tokenizer without an unknown token keeps everything."""
    from mmstack.rag.retrievers import STOP_WORDS

    words = re.findall(r"\w+", text.lower())
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None:
        words = [w for w in words if unk not in tokenizer(w, add_special_tokens=False)["input_ids"]]
    return " ".join(words) if any(w not in STOP_WORDS for w in words) else ""
