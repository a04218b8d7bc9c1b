"""Images named in requests: ``data:`` URLs, ``file://`` under configured roots, and (only when enabled)
``http(s)://`` from allow-listed hosts. Sizes are checked before any decoding; decoding itself is
``mmstack.data.images`` (header pixel count checked first, full decode, EXIF orientation, RGB).

These functions block (file reads, downloads, decoding): call them through ``off_loop``, which sends them to a
worker thread unless every image is a small data URL (``is_small_data_url``): a 64 px PNG decodes in about
0.1 ms, less than the hop to a thread and back, which on a 2-core server cost the image-embeddings endpoint
a fifth of its batched throughput (BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from PIL import Image

from mmstack.data.images import decode_data_url, load_image
from mmstack.serve.config import MediaConfig
from mmstack.serve.errors import APIError

T = TypeVar("T")
INLINE_BODY_BYTES = 32 * 1024  # a request body this small ...
INLINE_PIXELS = 160 * 160  # ... whose images are data URLs declaring at most this many pixels works on the loop


def is_small_data_url(url: Any) -> bool:
    """Whether ``url`` is a base64 image data URL whose header (read without decoding) declares at most
    ``INLINE_PIXELS`` pixels. Anything odd answers False: the worker-thread path then reports it properly."""
    if not isinstance(url, str) or len(url) > 2 * INLINE_BODY_BYTES or not url.startswith("data:"):
        return False
    try:
        with Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2], validate=True))) as im:
            width, height = im.size
    except (binascii.Error, ValueError, OSError, SyntaxError, Image.DecompressionBombError):
        return False
    return 0 < width * height <= INLINE_PIXELS


async def off_loop(fn: Callable[..., T], *args: Any, body_bytes: int | None, urls: Iterable[Any] = ()) -> T:
    """``fn(*args)`` in a worker thread, or right here when the request is small (``body_bytes``, e.g. its
    Content-Length, at most ``INLINE_BODY_BYTES``) and the image ``urls`` it will decode are all small data
    URLs (see the module docstring)."""
    if body_bytes is not None and body_bytes <= INLINE_BODY_BYTES and all(is_small_data_url(u) for u in urls):
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def body_bytes(headers: Any) -> int | None:
    """The request's declared body size (``Content-Length``), None when absent or malformed."""
    value = headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def load_image_url(url: str, media: MediaConfig, param: str = "image_url") -> Image.Image:
    """Decode the image that ``url`` names, within the limits of ``media``.

    Raises:
        APIError: 400 for a forbidden or malformed URL or a bad image, 413 for an image over the byte limit.
    """
    if not isinstance(url, str) or not url:
        raise APIError("image URL is empty", param=param)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        _check_bytes(_data_url_bytes(url), media, param)
        return decode_data_url(url, max_pixels=media.max_image_pixels)
    if scheme == "file":
        return load_image(_read_file(url, media, param), media.max_image_pixels, name=_short(url))
    if scheme in ("http", "https"):
        return load_image(_download(url, media, param), media.max_image_pixels, name=_short(url))
    raise APIError(
        f"unsupported image URL scheme {scheme or '(none)'!r}; send a base64 data URL (data:image/png;base64,...)",
        param=param,
        code="invalid_image_url",
    )


def _data_url_bytes(url: str) -> int:
    payload = url.partition(",")[2]
    return len(payload) * 3 // 4  # base64 length -> decoded bytes (within padding)


def _check_bytes(n: int, media: MediaConfig, param: str) -> None:
    if n > media.max_image_bytes:
        raise APIError(
            f"image of about {n} bytes exceeds the limit of {media.max_image_bytes} bytes; resize or compress it",
            status=413,
            param=param,
            code="image_too_large",
        )


def _read_file(url: str, media: MediaConfig, param: str) -> bytes:
    """Bytes of a ``file://`` URL whose real path (symlinks resolved) lies inside one of ``file_roots``."""
    if not media.file_roots:
        raise APIError("file:// image URLs are disabled on this server (media.file_roots is empty)", param=param)
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise APIError(f"file URL {_short(url)!r} names a host; use file:///absolute/path", param=param)
    path = Path(unquote(parsed.path))
    if not path.is_absolute():
        raise APIError(f"file URL {_short(url)!r} must hold an absolute path", param=param)
    real = path.resolve()
    if not any(real.is_relative_to(Path(root).resolve()) for root in media.file_roots):
        raise APIError(
            f"file {path} is outside the folders this server may read (media.file_roots)",
            param=param,
            code="file_not_allowed",
        )
    if not real.is_file():
        raise APIError(f"file {path} does not exist", param=param, code="file_not_found")
    _check_bytes(real.stat().st_size, media, param)
    return real.read_bytes()


def _download(url: str, media: MediaConfig, param: str) -> bytes:
    """Fetch an allow-listed ``http(s)`` URL (no redirects, bounded size and time)."""
    if not media.allow_remote:
        raise APIError(
            "remote image URLs are disabled on this server; send the image as a base64 data URL",
            param=param,
            code="remote_images_disabled",
        )
    host = (urlparse(url).hostname or "").lower()
    if host not in {h.lower() for h in media.remote_hosts}:
        raise APIError(f"image host {host!r} is not in media.remote_hosts", param=param, code="host_not_allowed")
    import httpx

    chunks, total = [], 0
    try:
        with httpx.stream("GET", url, timeout=media.remote_timeout_s, follow_redirects=False) as response:
            if response.status_code != 200:
                raise APIError(f"fetching {_short(url)} gave HTTP {response.status_code}", param=param)
            for chunk in response.iter_bytes():
                total += len(chunk)
                _check_bytes(total, media, param)
                chunks.append(chunk)
    except httpx.HTTPError as err:
        raise APIError(f"fetching {_short(url)} failed ({type(err).__name__})", param=param) from None
    return b"".join(chunks)


def _short(url: str) -> str:
    return url if len(url) <= 80 else url[:77] + "..."
