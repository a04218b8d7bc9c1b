"""``TwoTowerProcessor``: a checkpoint's image preprocessing and tokenizer, saved and loaded with it.

On disk (an mmstack checkpoint): ``processor_config.json`` (image preprocessing, context length) and the
tokenizer files (``tokenizer.json``, ``tokenizer_config.json``). From an HF CLIP/SigLIP folder the image
side is read from ``preprocessor_config.json`` and the tokenizer with ``AutoTokenizer``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmstack.config import from_dict, to_dict
from mmstack.errors import ConfigError, ModelError
from mmstack.processing.image import ImageProcessingConfig, normalize, stack_uint8, to_uint8
from mmstack.utils.atomic import atomic_write_json

PROCESSOR_FILE = "processor_config.json"
HF_IMAGE_FILE = "preprocessor_config.json"


class TwoTowerProcessor:
    """Turns PIL images and caption strings into model inputs.

    Args:
        image: image preprocessing (size, mean/std, resize mode, interpolation).
        tokenizer: a ``PreTrainedTokenizerFast`` (e.g. from ``train_caption_tokenizer``).
        max_length: text context length; every text is padded (and truncated) to it, as CLIP and SigLIP
            were trained (SigLIP pools the last position, so fixed-length padding is required).
    """

    def __init__(self, image: ImageProcessingConfig, tokenizer: Any, max_length: int) -> None:
        if max_length < 2:
            raise ConfigError(f"processor max_length must be >= 2, got {max_length}")
        self.image_config = image
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    def __repr__(self) -> str:
        return (
            f"TwoTowerProcessor(image={self.image_config}, vocab={len(self.tokenizer)}, max_length={self.max_length})"
        )

    # -------------------------------------------------------------------------------------- images

    def image_to_uint8(self, img: Image.Image) -> np.ndarray:
        """One image resized/cropped to the model's size: ``(H, W, 3)`` uint8 (cache these)."""
        return to_uint8(img, self.image_config)

    def images_uint8(self, imgs: Sequence[Image.Image]) -> torch.Tensor:
        """``(B, 3, H, W)`` uint8 pixels, not yet normalised."""
        return stack_uint8([self.image_to_uint8(im) for im in imgs])

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` -> normalised float32 model input."""
        return normalize(pixels, self.image_config)

    def images(self, imgs: Sequence[Image.Image]) -> torch.Tensor:
        """Model input for a list of PIL images: float32 ``(B, 3, H, W)``."""
        if isinstance(imgs, Image.Image):
            imgs = [imgs]
        return self.normalize(self.images_uint8(imgs))

    # ---------------------------------------------------------------------------------------- text

    def text(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask``, int64 ``(B, max_length)``."""
        if isinstance(texts, str):
            texts = [texts]
        enc = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def __call__(self, images: Sequence[Image.Image] | None = None, text: Sequence[str] | None = None) -> dict:
        """HF-style call: ``pixel_values`` and/or ``input_ids``/``attention_mask``."""
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            out["pixel_values"] = self.images(images)
        if text is not None:
            out.update(self.text(text))
        return out

    # ---------------------------------------------------------------------------------- save/load

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``processor_config.json`` and the tokenizer files into folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path / PROCESSOR_FILE, {"image": to_dict(self.image_config), "max_length": self.max_length})
        self.tokenizer.save_pretrained(str(path))

    def save_hf(self, path: str | Path) -> None:
        """Write HF files (``preprocessor_config.json`` + tokenizer) that transformers' auto classes load."""
        path = Path(path)
        atomic_write_json(path / HF_IMAGE_FILE, self.image_config.to_hf())
        self.tokenizer.save_pretrained(str(path))

    @classmethod
    def from_pretrained(cls, path: str | Path, max_length: int | None = None) -> TwoTowerProcessor:
        """Load from an mmstack checkpoint folder, or from an HF CLIP/SigLIP folder.

        Args:
            path: the folder.
            max_length: context length for an HF folder (default: the tokenizer's ``model_max_length``,
                else 77); ignored for mmstack folders, which store theirs.
        """
        path = Path(path)
        own = path / PROCESSOR_FILE
        if own.is_file():
            data = _read_json(own)
            image = from_dict(ImageProcessingConfig, data.get("image"), f"{own}: image")
            return cls(image, load_tokenizer(path), int(data.get("max_length", 77)))
        hf = path / HF_IMAGE_FILE
        if not hf.is_file():
            raise ModelError(
                f"{path} has neither {PROCESSOR_FILE} (mmstack) nor {HF_IMAGE_FILE} (HF); "
                "the checkpoint has no preprocessing: re-save it with its processor"
            )
        image = ImageProcessingConfig.from_hf(_read_json(hf), str(hf))
        tokenizer = load_tokenizer(path)
        if max_length is None:
            model_max = getattr(tokenizer, "model_max_length", None) or 0
            max_length = int(model_max) if 0 < model_max < 100_000 else 77
        return cls(image, tokenizer, max_length)


def load_tokenizer(path: str | Path):
    """The tokenizer stored in ``path`` (any HF tokenizer files), or ``ModelError``."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as err:
        raise ModelError(f"cannot load the tokenizer of {path}: {err}; the folder needs tokenizer files") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"{path} is not valid JSON ({err}); the checkpoint is damaged, re-save it") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a JSON object; the checkpoint is damaged, re-save it")
    return data
