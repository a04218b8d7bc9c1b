"""Alignment data: preference pairs and prompts -> tokenised, image-bearing batches for the shared trainer.

- ``load_preferences``: ``preferences.jsonl`` (the shapes world's or a user file), filtered by rejection
  kind and limited.
- ``ImageBank``: the images a data set refers to, decoded once (uint8, cached on disk) for the fixed-size
  processor, or loaded per batch for dynamic resolution / tiling.
- ``PreferenceBatches``: pairs encoded through the bridge processor's chat template (the answer is the
  only labelled span); a batch stacks the B chosen rows over the B rejected rows (2B rows, right padding)
  and carries each pair's cached reference log-probs when DPO has set them.
- ``PromptBatches``: the distinct (image, prompt) pairs, left-padded for generation (PPO rollouts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmstack.data.preferences import Preference, read_preferences
from mmstack.errors import DataError
from mmstack.processing.bridge_processor import IMAGE_TOKEN, BridgeProcessor, TemplateIds
from mmstack.processing.image import normalize


def load_preferences(path: str | Path, kinds: Sequence[str] = (), limit: int = 0) -> list[Preference]:
    """Preference pairs of ``path`` (a folder with ``preferences.jsonl`` or a JSONL file).

    ``kinds`` keeps only pairs whose ``rejection`` field is one of them (empty: all); ``limit`` keeps the first N.
    """
    prefs = read_preferences(path)
    if kinds:
        prefs = [p for p in prefs if p.meta.get("rejection") in set(kinds)]
    prefs = prefs[: limit or None]
    if not prefs:
        what = f" of kinds {list(kinds)}" if kinds else ""
        raise DataError(f"{path} has no preference pairs{what}; generate a world or check data.kinds")
    return prefs


def user_turn(prompt: str, has_image: bool) -> dict[str, str]:
    """The human turn as the generation template writes it (the ``<image>`` line first)."""
    text = f"{IMAGE_TOKEN}\n{prompt}" if has_image and IMAGE_TOKEN not in prompt else prompt
    return {"from": "human", "value": text}


class ImageBank:
    """Pixels of a list of image files, by index: ``views(i)`` is image ``i``'s normalised (V, 3, h, w).

    With the fixed-size processor every image is decoded once into a uint8 tensor (cached in ``cache_dir``);
    other image modes (dynamic resolution, tiles) load and preprocess each image when a batch needs it.
    """

    def __init__(self, paths: Sequence[Path], proc: BridgeProcessor, cache_dir: str | Path | None = None) -> None:
        self.paths, self.proc = list(paths), proc
        self.pixels: torch.Tensor | None = None
        if self.paths and proc.config.image_mode == "fixed":
            from mmstack.data.images import load_image
            from mmstack.processing.image import to_uint8
            from mmstack.train.clip_data import cached_pixels

            cfg = proc.config.image
            spec = {"size": list(cfg.size), "resize_mode": cfg.resize_mode, "interpolation": cfg.interpolation}
            self.pixels = cached_pixels(
                self.paths, lambda p: to_uint8(load_image(p), cfg), spec, Path(cache_dir) if cache_dir else None
            )  # (N, 3, H, W) uint8

    def __len__(self) -> int:
        return len(self.paths)

    def views(self, i: int) -> torch.Tensor:
        if self.pixels is not None:
            return normalize(self.pixels[i : i + 1], self.proc.config.image)
        from mmstack.data.images import load_image

        return self.proc.image_views(load_image(self.paths[i]))

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor | list[torch.Tensor] | None, list[int]]:
        """Pixel input for the model (one (B, 3, H, W) tensor when possible) and each image's token count."""
        if not indices:
            return None, []
        if self.pixels is not None:
            views = normalize(self.pixels[list(indices)], self.proc.config.image)  # (B, 3, H, W)
            return views, [self.proc.image_tokens(views[:1])] * len(indices)
        per_image = [self.views(i) for i in indices]
        return per_image, [self.proc.image_tokens(v) for v in per_image]


def _image_index(items: Sequence[Path | None]) -> tuple[list[Path], list[int]]:
    """Distinct image paths and, per item, the index of its image (-1: none)."""
    index: dict[Path, int] = {}
    out = []
    for path in items:
        if path is None:
            out.append(-1)
            continue
        key = Path(path).resolve()
        out.append(index.setdefault(key, len(index)))
    return list(index), out


@dataclass
class EncodedPair:
    """One preference pair through the chat template: both conversations (placeholders unexpanded)."""

    chosen: TemplateIds
    rejected: TemplateIds
    image: int
    kind: str
    name: str


class PreferenceBatches:
    """A ``BatchSource`` of preference pairs (see the module docstring).

    Args:
        prefs: the pairs.
        proc: the processor of the model being trained (template, image token counts).
        cache_dir: where decoded pixels are cached (None: not cached).
    """

    def __init__(self, prefs: Sequence[Preference], proc: BridgeProcessor, cache_dir: str | Path | None = None) -> None:
        self.prefs, self.proc = list(prefs), proc
        paths, image_of = _image_index([p.image for p in self.prefs])
        self.images = ImageBank(paths, proc, cache_dir)
        self.pairs = [self._encode(p, image_of[i], i) for i, p in enumerate(self.prefs)]
        self.ref_chosen: torch.Tensor | None = None
        self.ref_rejected: torch.Tensor | None = None
        self._validate()

    def _encode(self, pref: Preference, image: int, i: int) -> EncodedPair:
        name = f"pair {pref.id or i}"
        user = user_turn(pref.prompt, image >= 0)
        chosen = self.proc.encode_turns([user, {"from": "gpt", "value": pref.chosen}], name=name)
        rejected = self.proc.encode_turns([user, {"from": "gpt", "value": pref.rejected}], name=name)
        return EncodedPair(chosen, rejected, image, str(pref.meta.get("rejection", "all")), name)

    def _validate(self) -> None:
        """Expand every pair once, so truncation into an image or into nothing fails before training."""
        tokens = self.proc.image_tokens(self.images.views(0)) if self.images.paths else 0
        for pair in self.pairs:
            n = [tokens] * pair.chosen.n_images
            self.proc.expand(pair.chosen, n, train=True, name=pair.name)
            self.proc.expand(pair.rejected, n, train=True, name=pair.name)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def kinds(self) -> list[str]:
        return [p.kind for p in self.pairs]

    def set_reference(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """Attach the reference model's log-probs of every pair (computed once, before training)."""
        if chosen.shape != (len(self),) or rejected.shape != (len(self),):
            raise ValueError(f"reference log-probs must have shape ({len(self)},)")
        self.ref_chosen, self.ref_rejected = chosen.float(), rejected.float()

    def batch(self, indices: torch.Tensor) -> dict[str, Any]:
        """Chosen rows 0..B-1, rejected rows B..2B-1 (right padding); ``index`` says which pairs they are."""
        idx = [int(i) for i in indices.tolist()] if isinstance(indices, torch.Tensor) else [int(i) for i in indices]
        pairs = [self.pairs[i] for i in idx]
        with_image = [p.image for p in pairs if p.image >= 0 and p.chosen.n_images]
        pixels, tokens = self.images.batch(with_image)
        counts = iter(tokens)
        per_pair = [[next(counts)] if (p.image >= 0 and p.chosen.n_images) else [] for p in pairs]
        rows = [self.proc.expand(p.chosen, n, train=True, name=p.name) for p, n in zip(pairs, per_pair, strict=True)]
        rows += [self.proc.expand(p.rejected, n, train=True, name=p.name) for p, n in zip(pairs, per_pair, strict=True)]
        batch: dict[str, Any] = self.proc.pad(rows, "right")
        batch["pixel_values"] = _twice(pixels)
        batch["index"] = torch.tensor(idx, dtype=torch.long)
        if self.ref_chosen is not None and self.ref_rejected is not None:
            batch["ref_chosen"], batch["ref_rejected"] = self.ref_chosen[idx], self.ref_rejected[idx]
        return batch


def _twice(pixels: torch.Tensor | list[torch.Tensor] | None):
    """The images of the chosen rows followed by the same images for the rejected rows."""
    if pixels is None:
        return None
    if isinstance(pixels, torch.Tensor):
        return torch.cat([pixels, pixels], dim=0)  # (2B, 3, H, W)
    return [*pixels, *pixels]


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keys of a batch that the models take (drops labels, indices and cached reference values)."""
    return {k: batch.get(k) for k in ("input_ids", "attention_mask", "pixel_values")}


def reward_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """``model_inputs`` plus the reward model's ``answer_mask`` (the tokens that carry labels)."""
    return {**model_inputs(batch), "answer_mask": batch["labels"] != -100}


class PromptBatches:
    """A ``BatchSource`` of the distinct (image, prompt) pairs of a preference set, for generation.

    ``batch`` returns left-padded prompts (ending with the template's ``ASSISTANT:``) and their pixels.
    """

    def __init__(self, prefs: Sequence[Preference], proc: BridgeProcessor, cache_dir: str | Path | None = None) -> None:
        seen: dict[tuple[str, str], Preference] = {}
        for p in prefs:
            seen.setdefault((str(p.image), p.prompt), p)
        self.items = list(seen.values())
        self.proc = proc
        paths, self.image_of = _image_index([p.image for p in self.items])
        self.images = ImageBank(paths, proc, cache_dir)
        self.templates = [
            proc.encode_turns([user_turn(p.prompt, self.image_of[i] >= 0)], add_generation_prompt=True, name=p.prompt)
            for i, p in enumerate(self.items)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, indices: torch.Tensor) -> dict[str, Any]:
        idx = [int(i) for i in indices.tolist()] if isinstance(indices, torch.Tensor) else [int(i) for i in indices]
        with_image = [self.image_of[i] for i in idx if self.image_of[i] >= 0]
        pixels, tokens = self.images.batch(with_image)
        counts = iter(tokens)
        rows = []
        for i in idx:
            n = [next(counts)] if self.image_of[i] >= 0 else []
            rows.append(self.proc.expand(self.templates[i], n, train=False, name=self.items[i].prompt))
        batch = self.proc.pad(rows, "left")
        batch.pop("labels")
        batch["pixel_values"] = pixels
        batch["index"] = torch.tensor(idx, dtype=torch.long)
        return batch
