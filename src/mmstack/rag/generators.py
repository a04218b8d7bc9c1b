"""Generators for the RAG pipeline: the bridge VLM answering a prompt that holds several images.

The bridge processor's ``prompts`` takes one image per prompt; a RAG prompt holds the query image and one
image per source, so this adapter builds the inputs from the processor's own steps (template, placeholder
expansion to each image's token count, left padding) and the model scatters the visual tokens of all
images, in order, into the placeholders.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from mmstack.errors import ModelError


class BridgeGenerator:
    """``generate(prompt, images) -> str`` with a ``BridgeModel`` (greedy by default).

    Args:
        model: a bridge model with its processor attached (as ``from_pretrained`` returns it).
        max_new_tokens: longest answer.
        config: a ``GenerationConfig`` (sampling etc.); its eos/pad ids come from the processor.
    """

    def __init__(self, model: Any, max_new_tokens: int = 24, config: Any = None) -> None:
        from mmstack.models.bridge_generate import GenerationConfig

        if getattr(model, "processor", None) is None:
            raise ModelError("the bridge model has no processor attached; load it from a checkpoint folder")
        self.model = model.eval()
        proc = model.processor
        base = config or GenerationConfig(max_new_tokens=max_new_tokens)
        base.eos_token_ids = proc.stop_token_ids()
        base.pad_token_id = proc.pad_token_id
        self.config = base

    @classmethod
    def from_pretrained(cls, path: str | Path, max_new_tokens: int = 24, device: str = "cpu") -> BridgeGenerator:
        from mmstack.models.bridge import BridgeModel

        return cls(BridgeModel.from_pretrained(path).to(device), max_new_tokens)

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.language_model.config, "max_position_embeddings", None)

    def encode(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> dict[str, Any]:
        """Left-padded model inputs for prompts with any number of images each."""
        from mmstack.processing.bridge_processor import IGNORE_INDEX

        proc = self.model.processor
        rows, views = [], []
        for i, (prompt, imgs) in enumerate(zip(prompts, images, strict=True)):
            tpl = proc.encode_turns(
                [{"from": "human", "value": prompt}], add_generation_prompt=True, name=f"prompt {i}"
            )
            per_image = [proc.image_views(img) for img in imgs]
            ids, _ = proc.expand(tpl, [proc.image_tokens(v) for v in per_image], train=False, name=f"prompt {i}")
            limit = self.max_positions
            if limit is not None and len(ids) >= limit:
                raise ModelError(
                    f"the RAG prompt is {len(ids)} tokens ({len(imgs)} images) but the model holds at most "
                    f"{limit} positions; lower rag.max_images or rag.context_k"
                )
            rows.append((ids, [IGNORE_INDEX] * len(ids)))
            views.extend(per_image)
        batch = proc.pad(rows, padding_side="left")
        batch.pop("labels")
        batch["pixel_values"] = views or None
        return batch

    def generate_batch(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> list[str]:
        """Answers to several prompts at once (one forward pass per decoding step)."""
        import torch

        from mmstack.models.bridge_generate import generate

        batch = self.encode(prompts, images)
        device = next(self.model.parameters()).device
        batch = {k: _to(v, device) for k, v in batch.items()}
        with torch.inference_mode():
            tokens = generate(self.model, config=self.config, **batch)
        eos = set(self.config.eos_token_ids)
        out = []
        for row in tokens.tolist():
            cut = next((j for j, t in enumerate(row) if t in eos), len(row))
            out.append(self.model.processor.decode(row[:cut]))
        return out

    def generate(self, prompt: str, images: Sequence[Image.Image]) -> str:
        return self.generate_batch([prompt], [list(images)])[0]


def _to(value: Any, device: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, list):
        return [v.to(device) for v in value]
    return value.to(device)
