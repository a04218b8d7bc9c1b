"""Embedding whole datasets with a two-tower model: batched, without gradients, with a progress bar."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from mmstack.errors import ConfigError
from mmstack.utils.precision import effective_precision
from mmstack.utils.progress import make_progress

ImageLike = Image.Image | str | Path
Precision = Literal["fp32", "bf16"]


def _load(item: ImageLike) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    from mmstack.data.images import load_image

    return load_image(item)


def _batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    return [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def inference_autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision="bf16"``. On a CPU with native bf16 (AVX512-BF16/AMX) it embedded the
    demo CLIP's 1000 val images 1.44x faster than fp32, with feature cosine >= 0.996 to the fp32 features and
    the same val R@1; the default stays fp32, which matches HF transformers' features to 1e-6. Without native
    bf16 it runs in fp32 (``mmstack.utils.precision``)."""
    if precision == "bf16" and effective_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ConfigError(f"embedding precision must be fp32 or bf16, got {precision!r}")
    return contextlib.nullcontext()


@torch.inference_mode()
def embed_images(
    model: Any,
    images: Sequence[ImageLike] | torch.Tensor,
    batch_size: int = 256,
    normalize: bool = True,
    desc: str = "embed images",
    precision: Precision = "fp32",
) -> torch.Tensor:
    """``(N, D)`` float32 image embeddings (L2-normalised unless ``normalize=False``), on the CPU.

    Decoding is pipelined: one background thread decodes the next batch while the model embeds the current
    one. (Decoding each image as its own thread-pool task was slower: small PNGs hold the GIL for most of
    their decode, so two decode threads contend instead of overlapping.)

    Args:
        model: a two-tower model with ``processor`` and ``encode_image``.
        images: PIL images, image paths, or already preprocessed pixels (float ``(N, 3, H, W)``, or uint8
            that the processor normalises).
        precision: ``fp32``, or ``bf16`` autocast (see ``inference_autocast``).
    """
    n = len(images)
    out = []
    device = _device(model)
    spans = _batches(n, batch_size)
    # autocast is thread-local: it covers the model here, not the decoding thread
    with inference_autocast(device, precision), make_progress() as progress, ThreadPoolExecutor(1) as pool:
        task = progress.add_task(desc, total=n)
        pending = pool.submit(_pixels, model, images, *spans[0]) if spans else None
        for i, (lo, hi) in enumerate(spans):
            pixels = pending.result().to(device)
            if i + 1 < len(spans):
                pending = pool.submit(_pixels, model, images, *spans[i + 1])
            out.append(model.encode_image(pixels, normalize=normalize).float().cpu())
            progress.advance(task, hi - lo)
    return torch.cat(out) if out else torch.zeros(0, model.config.embed_dim)


def _pixels(model: Any, images: Any, lo: int, hi: int) -> torch.Tensor:
    """Normalised pixels of ``images[lo:hi]``."""
    if isinstance(images, torch.Tensor):
        chunk = images[lo:hi]
        return model.processor.normalize(chunk) if chunk.dtype == torch.uint8 else chunk
    from mmstack.processing.image import stack_uint8

    arrays = [model.processor.image_to_uint8(_load(im)) for im in images[lo:hi]]
    return model.processor.normalize(stack_uint8(arrays))


@torch.inference_mode()
def embed_texts(
    model: Any,
    texts: Sequence[str],
    batch_size: int = 512,
    normalize: bool = True,
    desc: str = "embed texts",
    precision: Precision = "fp32",
) -> torch.Tensor:
    """``(N, D)`` float32 text embeddings (L2-normalised unless ``normalize=False``), on the CPU; ``precision``
    as for ``embed_images``."""
    texts = list(texts)
    out = []
    device = _device(model)
    with inference_autocast(device, precision), make_progress() as progress:
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
