"""Request bodies of the HTTP API (OpenAI shapes plus a few documented extensions).

Unknown fields are ignored, as the OpenAI API and vLLM do, so newer clients keep working; fields we
cannot honour (several choices, token-id inputs, URL image responses) are refused with a clear 400.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class EmbeddingRequest(_Body):
    """``POST /v1/embeddings``. Extension: ``images``, a list of image URLs (base64 data URLs; ``file://``
    or ``http(s)://`` where the server allows them); their embeddings follow the text ones."""

    model: str
    input: str | list[str] | list[int] | list[list[int]] | None = None
    images: list[str] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class ImageURL(_Body):
    url: str
    detail: str | None = None


class ContentPart(_Body):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ChatRequest(_Body):
    """``POST /v1/chat/completions``. Extension (as vLLM): ``ignore_eos`` generates ``max_tokens`` tokens
    whatever the model says (load tests)."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = False


class ImageGenerationRequest(_Body):
    """``POST /v1/images/generations``. Extensions: ``guidance_scale`` and ``seed``."""

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(default=1, ge=1, le=8)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    guidance_scale: float | None = Field(default=None, ge=0.0, le=20.0)
    seed: int | None = None
    user: str | None = None


class SearchRequest(_Body):
    """``POST /v1/search``: a text query, an image (URL), or both, against a collection.

    ``negative``: texts to steer away from; ``like``: stored item ids to find more like; ``filters``:
    ``path`` (glob), ``source``, ``tags``, ``kind``; ``mode``: ``auto`` (dense + BM25 when there are
    words), ``hybrid``, ``dense`` or ``text``; ``include_images``: a small thumbnail (data URL) per image hit.
    """

    collection: str
    query: str | None = Field(default=None, max_length=2000)
    negative: list[str] | None = None
    image: str | None = None
    like: list[int] | None = None
    top_k: int = Field(default=10, ge=1, le=100)
    filters: dict[str, str | list[str]] | None = None
    mode: Literal["auto", "hybrid", "dense", "text"] = "auto"
    include_images: bool = False


class RagRequest(_Body):
    """``POST /v1/rag``: retrieve from a collection, then answer with a chat model, citing sources.
    ``image``: an image the question is about (URL, as chat images); ``model``: the chat model (optional
    when only one is served)."""

    collection: str
    question: str = Field(min_length=1, max_length=2000)
    image: str | None = None
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
