"""Embedding whole datasets with a two-tower model: batched, without gradients, with a progress bar."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mmstack.utils.progress import make_progress

ImageLike = Image.Image | str | Path


def _load(item: ImageLike) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    from mmstack.data.images import load_image

    return load_image(item)


def _batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    return [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def embed_images(
    model: Any,
    images: Sequence[ImageLike] | torch.Tensor,
    batch_size: int = 256,
    normalize: bool = True,
    desc: str = "embed images",
) -> torch.Tensor:
    """``(N, D)`` float32 image embeddings (L2-normalised unless ``normalize=False``), on the CPU.

    Args:
        model: a two-tower model with ``processor`` and ``encode_image``.
        images: PIL images, image paths, or already preprocessed pixels (float ``(N, 3, H, W)``, or uint8
            that the processor normalises).
    """
    n = len(images)
    out = []
    device = _device(model)
    with make_progress() as progress, ThreadPoolExecutor(max_workers=2) as pool:
        task = progress.add_task(desc, total=n)
        for lo, hi in _batches(n, batch_size):
            pixels = _pixels(model, images, lo, hi, pool).to(device)
            out.append(model.encode_image(pixels, normalize=normalize).float().cpu())
            progress.advance(task, hi - lo)
    return torch.cat(out) if out else torch.zeros(0, model.config.embed_dim)


def _pixels(model: Any, images: Any, lo: int, hi: int, pool: ThreadPoolExecutor) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        chunk = images[lo:hi]
        return model.processor.normalize(chunk) if chunk.dtype == torch.uint8 else chunk
    arrays = list(pool.map(lambda im: model.processor.image_to_uint8(_load(im)), images[lo:hi]))
    from mmstack.processing.image import stack_uint8

    return model.processor.normalize(stack_uint8(arrays))


@torch.inference_mode()
def embed_texts(
    model: Any, texts: Sequence[str], batch_size: int = 512, normalize: bool = True, desc: str = "embed texts"
) -> torch.Tensor:
    """``(N, D)`` float32 text embeddings (L2-normalised unless ``normalize=False``), on the CPU."""
    texts = list(texts)
    out = []
    device = _device(model)
    with make_progress() as progress:
        task = progress.add_task(desc, total=len(texts))
        for lo, hi in _batches(len(texts), batch_size):
            enc = model.processor.text(texts[lo:hi])
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            out.append(model.encode_text(ids, mask, normalize=normalize).float().cpu())
            progress.advance(task, hi - lo)
    return torch.cat(out) if out else torch.zeros(0, model.config.embed_dim)


def load_pixels(model: Any, images: Sequence[ImageLike], desc: str = "load images") -> torch.Tensor:
    """Decode and resize images once with the model's processor: uint8 ``(N, 3, H, W)``."""
    from mmstack.processing.image import stack_uint8

    with make_progress() as progress, ThreadPoolExecutor(max_workers=2) as pool:
        task = progress.add_task(desc, total=len(images))
        arrays = []
        for arr in pool.map(lambda im: model.processor.image_to_uint8(_load(im)), images):
            arrays.append(arr)
            progress.advance(task)
    if not arrays:
        h, w = model.processor.image_config.size
        return torch.zeros(0, 3, h, w, dtype=torch.uint8)
    return stack_uint8(arrays)
