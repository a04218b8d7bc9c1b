"""Contact sheets: a PNG grid of images with their captions underneath (for reports and eyeballing)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from mmstack.utils.atomic import atomic_write_bytes

_PAD = 6
_TEXT = (230, 230, 230)
_SHEET_BG = (40, 40, 44)


def _wrap(text: str, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; explicit newlines start new lines."""
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split():
            trial = f"{line} {word}".strip()
            if line and draw.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def contact_sheet(
    images: Sequence[Image.Image | str | Path],
    captions: Sequence[str],
    path: str | Path,
    cols: int = 6,
    tile: int = 160,
) -> Path:
    """Write a grid of ``images`` (scaled up to ``tile`` px wide, nearest neighbour so pixels stay crisp)
    with each caption wrapped underneath; returns the PNG path. Written atomically."""
    if len(images) != len(captions):
        raise ValueError(
            f"contact_sheet needs one caption per image; got {len(images)} images, {len(captions)} captions"
        )
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    pics = [Image.open(p).convert("RGB") if isinstance(p, (str, Path)) else p.convert("RGB") for p in images]
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(c, probe, font, tile) for c in captions]
    line_h = int(probe.textbbox((0, 0), "Ag", font=font)[3]) + 3
    img_h = max(round(p.height * tile / p.width) for p in pics)
    cell_w, cell_h = tile + 2 * _PAD, img_h + max(len(w) for w in wrapped) * line_h + 3 * _PAD
    cols = max(1, min(cols, len(pics)))
    rows = -(-len(pics) // cols)
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), _SHEET_BG)
    draw = ImageDraw.Draw(sheet)
    for k, (pic, lines) in enumerate(zip(pics, wrapped, strict=True)):
        x, y = (k % cols) * cell_w + _PAD, (k // cols) * cell_h + _PAD
        sheet.paste(pic.resize((tile, round(pic.height * tile / pic.width)), Image.NEAREST), (x, y))
        for i, line in enumerate(lines):
            draw.text((x, y + img_h + _PAD + i * line_h), line, fill=_TEXT, font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
