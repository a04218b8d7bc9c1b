"""Deterministic stand-ins for index tests: a colour embedder and small image/document folders.

``ColourEmbedder`` maps an image to the share of its pixels close to each shapes-world colour and a text
to the colour words it names, so "red" retrieves red images exactly and the expected ranking of any
weighted or negative query can be worked out by hand.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (30, 70, 230),
    "yellow": (235, 230, 40),
}
NAMES = list(COLOURS)


class ColourEmbedder:
    """Images -> colour shares, texts -> colour words; one extra dimension keeps vectors non-zero."""

    supports_images = True

    def __init__(self, dim: int = 8, model_id: str = "fake-colour-v1") -> None:
        assert dim >= len(NAMES) + 1
        self.dim, self.model_id = dim, model_id
        self.calls = 0

    def _unit(self, v: np.ndarray) -> np.ndarray:
        return (v / np.linalg.norm(v)).astype(np.float32)

    def prepare_image(self, image: Image.Image) -> np.ndarray:
        px = np.asarray(image.convert("RGB").resize((16, 16), Image.Resampling.NEAREST), np.float32).reshape(-1, 3)
        v = np.zeros(self.dim, np.float32)
        for i, rgb in enumerate(COLOURS.values()):
            v[i] = float((np.abs(px - np.array(rgb, np.float32)).sum(1) < 60).mean())
        v[-1] = 0.05
        return v

    def embed_prepared(self, prepared: Sequence[np.ndarray]) -> np.ndarray:
        self.calls += 1
        return np.stack([self._unit(p) for p in prepared]) if prepared else np.zeros((0, self.dim), np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        out = []
        for t in texts:
            v = np.zeros(self.dim, np.float32)
            for w in t.lower().split():
                if w in COLOURS:
                    v[NAMES.index(w)] += 1.0
            v[-1] = 0.05
            out.append(self._unit(v))
        return np.stack(out) if out else np.zeros((0, self.dim), np.float32)


class HashTextEmbedder(ColourEmbedder):
    """A text-only encoder (bag of hashed words) for the ``text`` space."""

    supports_images = False

    def __init__(self, dim: int = 16) -> None:
        super().__init__(dim, "fake-words-v1")

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        out = []
        for t in texts:
            v = np.full(self.dim, 0.01, np.float32)
            for w in t.lower().split():
                v[int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1.0
            out.append(self._unit(v))
        return np.stack(out)


def colour_image(path: Path, colours: Sequence[str], size: int = 32) -> Path:
    """A PNG split into vertical bands of the given colours on white."""
    arr = np.full((size, size, 3), 255, np.uint8)
    band = size // max(1, len(colours))
    for i, c in enumerate(colours):
        arr[:, i * band : (i + 1) * band] = COLOURS[c]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def photo_folder(root: Path) -> Path:
    """A small folder: single-colour and two-colour images, one captioned image, two documents."""
    colour_image(root / "red.png", ["red"])
    colour_image(root / "blue.png", ["blue"])
    colour_image(root / "green.png", ["green"])
    colour_image(root / "red_blue.png", ["red", "blue"])
    colour_image(root / "sub" / "yellow.png", ["yellow"])
    colour_image(root / "sub" / "red_green.png", ["red", "green"])
    (root / "sub" / "red_green.txt").write_text("a tomato beside a leaf\n")
    (root / "notes.md").write_text("Holiday notes.\n\nWe saw a lighthouse and a harbour at dusk.\n")
    (root / "recipe.txt").write_text("Tomato soup: tomatoes, basil, salt.\n")
    return root


def save_micro_two_tower(folder: Path, embed_dim: int = 32) -> Path:
    """A random ``shapes-micro`` two-tower checkpoint (32 px, one layer per tower) saved to ``folder``."""
    import torch

    from mmstack.models.two_tower import TwoTowerConfig, TwoTowerModel, default_processor
    from mmstack.processing import train_caption_tokenizer

    words = [
        f"a {c} {s} left right above below small large moves" for c in (*COLOURS, "pink") for s in ("circle", "cross")
    ]
    tok = train_caption_tokenizer(words, max_length=16)
    cfg = TwoTowerConfig.from_preset("shapes-micro", {"embed_dim": embed_dim})
    torch.manual_seed(0)
    TwoTowerModel.from_config(cfg, default_processor(cfg, tok)).save_pretrained(folder)
    return folder
