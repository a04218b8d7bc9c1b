"""Where request images are decoded: small data URLs on the event loop, everything else in a worker thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from _serve_models import data_url

pytest.importorskip("fastapi")

from mmstack.errors import ImageError
from mmstack.serve.config import MediaConfig
from mmstack.serve.media import INLINE_BODY_BYTES, body_bytes, is_small_data_url, load_image_url, off_loop


def test_small_data_urls_are_told_apart_by_their_header():
    assert is_small_data_url(data_url(size=40))
    assert not is_small_data_url(data_url(size=400))  # 160,000 pixels: a worker thread decodes it
    assert not is_small_data_url("file:///tmp/x.png")
    assert not is_small_data_url("data:image/png;base64,@@not-base64@@")
    assert not is_small_data_url("data:image/png;base64,aGVsbG8=")  # base64, but not an image
    assert not is_small_data_url(None)


def _where(*urls: str, size: int | None = 1000) -> bool:
    """Whether ``off_loop`` ran its function on the calling (event-loop) thread."""

    async def main() -> bool:
        loop_thread = threading.get_ident()
        return await off_loop(lambda: threading.get_ident() == loop_thread, body_bytes=size, urls=urls)

    return asyncio.run(main())


def test_off_loop_runs_small_requests_inline_and_the_rest_in_a_thread():
    assert _where(data_url(size=40))
    assert _where()  # no image at all (a text-only chat)
    assert not _where(data_url(size=40), data_url(size=400))  # one large image sends the whole call away
    assert not _where(data_url(size=40), size=INLINE_BODY_BYTES + 1)  # a large body
    assert not _where(data_url(size=40), size=None)  # no Content-Length: assume large
    assert not _where("data:image/png;base64,@@")


def test_errors_keep_their_clear_message_on_either_path():
    media = MediaConfig()

    async def load(url: str):
        return await off_loop(load_image_url, url, media, "images", body_bytes=100, urls=[url])

    assert asyncio.run(load(data_url(size=40))).size == (40, 40)
    with pytest.raises(ImageError, match="not a base64 image data URL"):
        asyncio.run(load("data:image/png,rawbytes"))


def test_body_bytes_reads_content_length():
    assert body_bytes({"content-length": "123"}) == 123
    assert body_bytes({"content-length": "12x"}) is None and body_bytes({}) is None
