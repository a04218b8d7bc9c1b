"""A picture of text-to-image retrieval: each text query with its top-k gallery images."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from mmstack.eval.embed import ImageLike, _load, embed_images, embed_texts
from mmstack.utils.atomic import atomic_write_bytes

HIT, MISS, INK, PAPER = (40, 160, 60), (200, 50, 50), (20, 20, 20), (255, 255, 255)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def retrieval_grid_png(
    model: Any,
    queries: Sequence[str],
    gallery_images: Sequence[ImageLike],
    path: str | Path,
    k: int = 5,
    relevant: Sequence[set[int]] | None = None,
    cell: int = 96,
) -> dict[str, Any]:
    """Write a PNG with one row per text query: the query, then its top-``k`` gallery images and scores.

    Args:
        model: a two-tower model.
        queries: text queries.
        gallery_images: PIL images or paths to search.
        path: the PNG to write (atomically).
        k: images per query.
        relevant: per query, the gallery indices that are correct answers; hits get a green frame, misses red.
        cell: pixel size of each shown image.

    Returns:
        ``{"path", "top": [[gallery index, ...] per query], "scores": [[cosine, ...] per query]}``.
    """
    k = min(k, len(gallery_images))
    img = embed_images(model, gallery_images, desc="embed gallery")
    txt = embed_texts(model, list(queries), desc="embed queries")
    scores, top = (txt @ img.T).topk(k, dim=1)  # (Q, k)
    pad, text_w, label_h = 8, 260, 18
    row_h = cell + label_h + pad
    canvas = Image.new("RGB", (text_w + k * (cell + pad) + pad, pad + len(queries) * row_h), PAPER)
    draw = ImageDraw.Draw(canvas)
    font, small = _font(14), _font(12)
    for q, query in enumerate(queries):
        y = pad + q * row_h
        draw.multiline_text((pad, y), "\n".join(textwrap.wrap(query, 32)[:6]), fill=INK, font=font, spacing=2)
        for j in range(k):
            g = int(top[q, j])
            x = text_w + j * (cell + pad)
            thumb = _load(gallery_images[g]).convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(thumb, (x, y))
            if relevant is not None:
                colour = HIT if g in relevant[q] else MISS
                draw.rectangle((x - 2, y - 2, x + cell + 1, y + cell + 1), outline=colour, width=3)
            draw.text((x, y + cell + 3), f"#{j + 1}  {float(scores[q, j]):.3f}", fill=INK, font=small)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return {"path": str(path), "top": top.tolist(), "scores": [[round(float(s), 4) for s in r] for r in scores]}
