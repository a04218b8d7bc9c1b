"""``POST /v1/embeddings`` for two-tower models (CLIP/SigLIP): texts and images into one space.

Each text and each image is one batching job; texts batch with texts and images with images, across
requests. Images are decoded and resized before their job is queued (in a worker thread, in parallel with the
model, or on the event loop when small: ``media.off_loop``); the batch only stacks, normalises and encodes.
Vectors are L2-normalised, so dot products are cosines.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import numpy as np
import orjson
import torch
from fastapi import APIRouter, Request
from fastapi.responses import Response

from mmstack.errors import ModelError
from mmstack.serve.batching import watch_disconnect
from mmstack.serve.config import MediaConfig, ServeConfig
from mmstack.serve.errors import APIError
from mmstack.serve.media import body_bytes, load_image_url, off_loop
from mmstack.serve.schemas import EmbeddingRequest
from mmstack.serve.state import state_of

router = APIRouter()


class EmbeddingService:
    """Serves a ``TwoTowerModel``: batch ops ``text`` (strings) and ``image`` (uint8 (3, H, W) tensors)."""

    family = "two_tower"
    capabilities = ("embeddings",)

    def __init__(self, name: str, model: Any, config: ServeConfig) -> None:
        if model.processor is None:
            raise ModelError(f"model {name!r} has no processor attached; save the checkpoint with its processor")
        self.name, self.model, self.processor = name, model.eval(), model.processor
        self.dim = int(model.config.embed_dim)
        self.engine: Any = None

    def image_pixels(self, url: str, media: MediaConfig) -> torch.Tensor:
        """Decode and resize one image: uint8 (3, H, W). Blocking; run in a worker thread."""
        return self.processor.images_uint8([load_image_url(url, media, param="images")])[0]

    def run_batch(self, jobs: list[Any]) -> list[tuple[np.ndarray, int]]:
        """(vector, tokens) per job; a batch holds only texts or only images (its op)."""
        with torch.inference_mode():
            if jobs[0].op == "text":
                enc = self.processor.text([j.payload for j in jobs])  # padded to the context, with masks
                vecs = self.model.encode_text(enc["input_ids"], enc["attention_mask"], normalize=True)
                tokens = enc["attention_mask"].sum(-1).tolist()
            else:
                pixels = self.processor.normalize(torch.stack([j.payload for j in jobs]))  # (B, 3, H, W)
                vecs = self.model.encode_image(pixels, normalize=True)
                tokens = [0] * len(jobs)
        return [(v, int(t)) for v, t in zip(vecs.float().numpy(), tokens, strict=True)]


def _texts(req: EmbeddingRequest) -> list[str]:
    if req.input is None:
        return []
    items = [req.input] if isinstance(req.input, str) else list(req.input)
    if any(not isinstance(x, str) for x in items):
        raise APIError("token-id inputs are not supported; send the text itself", param="input")
    return items


def _encode(vec: np.ndarray, fmt: str) -> Any:
    if fmt == "base64":  # what the official client asks for by default: little-endian float32 bytes
        return base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
    # orjson writes each float32 in its shortest form, which reads back exactly
    return np.asarray(vec, dtype=np.float32)


@router.post("/v1/embeddings")
async def create_embeddings(body: EmbeddingRequest, request: Request):
    state = state_of(request)
    svc = state.service(body.model, "embeddings")
    texts, images = _texts(body), list(body.images or [])
    if not texts and not images:
        raise APIError("give 'input' (text) and/or 'images' (image URLs)", param="input")
    if body.dimensions is not None and body.dimensions != svc.dim:
        raise APIError(
            f"model {svc.name!r} makes {svc.dim}-dimensional embeddings, not {body.dimensions}", param="dimensions"
        )
    with svc.engine.admit(len(texts) + len(images)) as ticket:  # 429 here, before any image is decoded
        media = state.config.media
        size = body_bytes(request.headers)
        pixels = await asyncio.gather(
            *(off_loop(svc.image_pixels, url, media, body_bytes=size, urls=[url]) for url in images)
        )
        jobs = [ticket.submit(t, op="text") for t in texts] + [ticket.submit(p, op="image") for p in pixels]
        gone = watch_disconnect(request.receive)
        results = [await job.result(gone) for job in jobs]
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(vec, body.encoding_format)}
        for i, (vec, _) in enumerate(results)
    ]
    n_tokens = sum(t for _, t in results)
    usage = {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
    # orjson straight from the float32 arrays: 20x faster than json.dumps of Python floats, which had cost as
    # much as the text model's share of a batch (BENCHMARKS.md), and half the bytes.
    body = {"object": "list", "data": data, "model": svc.name, "usage": usage, "created": int(time.time())}
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")
