"""``POST /v1/images/generations`` for native models (one decoder over text and image tokens).

Each requested image is one batching job; prompts from several requests are drawn in one batch by the
model's own ``generate(prompts, "image", ...)`` (classifier-free guidance rows, constrained decoding, KV
cache, VQ decoder back to pixels). Jobs batch together only when they share the guidance scale; a seeded
request runs alone so that its seed alone decides its images.
"""

from __future__ import annotations

import base64
import io
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mmstack.errors import ModelError
from mmstack.serve.batching import watch_disconnect
from mmstack.serve.config import ServeConfig
from mmstack.serve.errors import APIError
from mmstack.serve.schemas import ImageGenerationRequest
from mmstack.serve.state import state_of

router = APIRouter()
DEFAULT_GUIDANCE = 3.0


@dataclass(frozen=True)
class ImagePrompt:
    prompt: str
    guidance: float
    seed: int | None


class ImageService:
    """Serves a ``NativeModel``: batch op ``image`` (one prompt -> one PNG)."""

    family = "native"
    capabilities = ("images",)

    def __init__(self, name: str, model: Any, config: ServeConfig) -> None:
        if getattr(model, "tokenizer", None) is None or getattr(model, "vq", None) is None:
            raise ModelError(f"model {name!r} has no tokenizer or VQ decoder; load a checkpoint saved by training")
        self.name, self.model = name, model.eval()
        side = int(model.vq.config.image_size)
        self.size = f"{side}x{side}"
        self.engine: Any = None

    def group(self, p: ImagePrompt) -> tuple:
        return ("seeded", uuid.uuid4().hex) if p.seed is not None else ("guidance", p.guidance)

    def run_batch(self, jobs: list[Any]) -> list[Any]:
        first: ImagePrompt = jobs[0].payload
        seed = first.seed if first.seed is not None else random.randrange(2**31)
        with torch.inference_mode():
            gen = self.model.generate(
                [j.payload.prompt for j in jobs], "image", guidance=first.guidance, seed=seed, batch_size=len(jobs)
            )
        out: list[Any] = []
        for image in gen.outputs:
            if image is None:  # only unconstrained decoding can break the layout; kept as a per-item error
                out.append(APIError("the model produced no valid image for this prompt; try again", status=500))
                continue
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return out


def _check(body: ImageGenerationRequest, svc: ImageService) -> None:
    if body.response_format not in (None, "b64_json"):
        raise APIError("only response_format 'b64_json' is served (no image hosting)", param="response_format")
    if body.size not in (None, "auto", svc.size):
        raise APIError(f"model {svc.name!r} draws {svc.size} images; omit size or ask for {svc.size}", param="size")


@router.post("/v1/images/generations")
async def generate_images(body: ImageGenerationRequest, request: Request):
    state = state_of(request)
    svc: ImageService = state.service(body.model, "images")
    _check(body, svc)
    guidance = DEFAULT_GUIDANCE if body.guidance_scale is None else body.guidance_scale
    prompt = ImagePrompt(body.prompt, guidance, body.seed)
    group = svc.group(prompt)  # one group per request: its n images share a batch (and a seed's draws)
    with svc.engine.admit(body.n) as ticket:
        jobs = [ticket.submit(prompt, op="image", group=group) for _ in range(body.n)]
        gone = watch_disconnect(request.receive)
        images = [await job.result(gone) for job in jobs]
    data = [{"b64_json": b64, "revised_prompt": None} for b64 in images]
    return JSONResponse({"created": int(time.time()), "data": data, "model": svc.name, "size": svc.size})
