"""Robust image loading: any supported file (or bytes) to an upright 8-bit RGB ``PIL.Image``, or ``ImageError``.

- Formats: JPEG (including camera MPO files, which Pillow opens through its JPEG plugin), PNG, WebP,
  GIF (first frame), BMP and TIFF. Anything else is rejected as "not a supported image".
- Size: the pixel count from the header is checked against ``max_pixels`` *before* decoding, so a tiny
  file that claims a huge size (a decompression bomb) costs nothing. Pillow's own
  ``DecompressionBombWarning``/``Error`` are turned into ``ImageError`` too.
- Integrity: the file is checked (``verify``: chunk CRCs and the end marker for PNG) and then fully
  decoded (``load``), so truncated files fail here rather than inside a training step. We rely on
  ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` being False (Pillow's default).
- Orientation: the EXIF orientation tag is applied (``ImageOps.exif_transpose``).
- Colour: palette images with transparency, colour-keyed grey/RGB PNGs and RGBA/LA are composited on a
  **white** background (the
  usual look of transparent web images and of documents); CMYK uses Pillow's conversion (no ICC colour
  management); 16-bit grey (``I;16*``) is scaled to 8 bits (65535 -> 255, not clipped); 32-bit ``I`` is
  treated as 16-bit when its values fit in 0..65535, else rescaled from its min..max; float ``F`` is
  taken as 0..1 when it fits, else rescaled; ``L`` and ``1`` are replicated to RGB.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmstack.errors import ImageError

DEFAULT_MAX_PIXELS = 64_000_000
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # camera MPO files open through JPEG
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_OPEN_LOCK = threading.Lock()
DATA_URL_MIMES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp", "image/tiff"}


def load_image(
    source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """Decode ``source`` (a path, a ``shard.tar#member`` reference, or encoded bytes) to an 8-bit RGB image.

    Args:
        source: file path, webdataset member reference (see ``mmstack.data.webdataset``) or file bytes.
        max_pixels: largest accepted width * height; checked from the header before decoding.
        name: how to call the image in error messages (defaults to the path, or "<bytes>").

    Returns:
        A fully decoded RGB ``PIL.Image``, EXIF orientation applied, not tied to any open file.

    Raises:
        ImageError: missing, non-image, unsupported, truncated/corrupt or too large input; the message
            names the image and the fix.
    """
    data, name = _read_source(source, name)
    try:
        with _open(data, max_pixels) as im:
            _check_size(im.size, max_pixels, name)
            # verify: chunk structure and checksums (PNG), so a cut-off tail that decoding does not
            # need (end of the zlib stream, IEND) still counts as truncated. It leaves im unusable.
            im.verify()
        with _open(data, max_pixels) as im:
            im.load()  # full decode: truncated or corrupt pixel data surfaces here
            return to_rgb(_upright(im))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(
            f"{name}: not a supported image, or its header is damaged (expected "
            f"{', '.join(s[1:] for s in IMAGE_SUFFIXES)}); check the file type or re-save it as PNG/JPEG"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(
            f"{name}: image too large ({err}); raise max_pixels if the file is trusted, or resize it"
        ) from None
    except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, zlib errors, ... on bad data
        raise ImageError(
            f"{name}: cannot decode image, the file is truncated or corrupt ({type(err).__name__}: {err}); "
            "re-download or re-encode it, or drop it from the data set"
        ) from None


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """``Image.open`` (header only) with Pillow's bomb warning raised as an error, or silenced when the
    caller allows more pixels than Pillow does. Warning filters are process-wide state, so opens are
    serialised; they only parse headers, decoding runs outside the lock."""
    action = "error" if max_pixels <= (Image.MAX_IMAGE_PIXELS or max_pixels) else "ignore"
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter(action, Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data), formats=PIL_FORMATS)


def _read_source(source: str | Path | bytes, name: str | None) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), name or "<bytes>"
    path = Path(source)
    name = name or str(path)
    if path.is_file():
        return path.read_bytes(), name
    from mmstack.data.webdataset import is_member_ref, read_member

    if is_member_ref(path):
        return read_member(path), name
    if path.is_dir():
        raise ImageError(f"{name}: is a folder, expected an image file")
    raise ImageError(f"{name}: image file not found; check the path (relative paths are relative to the data file)")


def _check_size(size: tuple[int, int], max_pixels: int, name: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: invalid image size {width}x{height} in the header; the file is corrupt")
    if width * height > max_pixels:
        raise ImageError(
            f"{name}: image too large ({width}x{height} = {width * height} pixels > max_pixels={max_pixels}); "
            "possibly a decompression bomb; raise max_pixels if the file is trusted, or resize it"
        )


def _upright(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # broken EXIF should not cost the image; it then keeps its stored orientation
        return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (see the module docstring for the rules)."""
    mode = im.mode
    if (mode in ("P", "L", "RGB") and "transparency" in im.info) or mode in ("PA", "RGBA", "LA", "RGBa", "La"):
        return _on_white(im.convert("RGBA"))  # "transparency": a palette index or colour key (PNG tRNS)
    if mode == "RGB":
        return im.copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(im), mode), "L").convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as err:
        raise ImageError(f"cannot convert image mode {mode!r} to RGB ({err}); re-save the image as RGB") from None


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """High bit-depth grey to uint8 by scaling, so bright 16-bit values are not clipped to white."""
    arr = arr.astype(np.float64)
    if mode.startswith("I;16") or (mode == "I" and arr.min() >= 0 and arr.max() <= 65535):
        scaled = arr * (255.0 / 65535.0)
    elif mode == "F" and arr.min() >= 0.0 and arr.max() <= 1.0:
        scaled = arr * 255.0
    else:
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def decode_data_url(url: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a ``data:image/...;base64,...`` URL to an RGB image (as ``load_image``).

    Raises:
        ImageError: not a base64 image data URL, a non-image MIME type, bad base64, or a bad image.
    """
    text = url.strip() if isinstance(url, str) else ""
    header, sep, payload = text.partition(",")
    params = header[5:].split(";") if header.startswith("data:") else []
    if not sep or len(params) < 2 or params[-1].lower() != "base64":
        head = text[:40] + "..." if len(text) > 40 else text
        raise ImageError(f"not a base64 image data URL: {head!r}; expected 'data:image/png;base64,<data>'")
    mime = params[0].lower()
    if mime not in DATA_URL_MIMES:
        raise ImageError(
            f"data URL has MIME type {mime or '(none)'!r}, expected one of {', '.join(sorted(DATA_URL_MIMES))}"
        )
    try:
        data = base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageError(
            f"data URL ({mime}) has invalid base64 data ({err}); encode the file bytes with base64"
        ) from None
    if not data:
        raise ImageError(f"data URL ({mime}) carries no data; put the base64-encoded image after the comma")
    return load_image(data, max_pixels=max_pixels, name=f"data URL ({mime}, {len(data)} bytes)")


def encode_data_url(image: Image.Image, fmt: str = "PNG") -> str:
    """An image as a ``data:image/<fmt>;base64,...`` URL (the inverse of ``decode_data_url``)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"
