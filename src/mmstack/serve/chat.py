"""``POST /v1/chat/completions`` for bridge VLMs (LLaVA-style), plain or streamed as server-sent events.

A request's messages become the processor's turns (one image per conversation, placed where its
``image_url`` part is). Each request is one batching job. By default jobs are batched continuously
(``run_continuous`` with ``continuous.ContinuousBatchingEngine``): a request joins the running generation
at the next decode step (its prompt is prefilled and its KV cache merged in, ``running_batch``) and
leaves it as soon as it is done, so it never waits for a whole batch; each row samples its own way.
With ``batching.continuous: false`` (``run_batch``) a batch is left-padded and decoded to its end with the
model's KV-cache loop (``bridge_generate.stream_tokens``), and requests batch only with requests that
sample the same way. Either way each row stops on its own (end token, stop string, its ``max_tokens``,
or its client leaving), and streamed rows get their text deltas as they grow.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from PIL import Image

from mmstack.errors import ModelError
from mmstack.serve.batching import log_failure, watch_disconnect
from mmstack.serve.config import MediaConfig, ServeConfig
from mmstack.serve.errors import APIError, ClientDisconnectedError, DeadlineExceededError, as_api_error
from mmstack.serve.media import body_bytes, load_image_url, off_loop
from mmstack.serve.running_batch import RunningBatch, supports_model
from mmstack.serve.schemas import ChatMessage, ChatRequest
from mmstack.serve.state import ServerState, state_of

router = APIRouter()


@dataclass(frozen=True)
class Sampling:
    """How a request samples; only requests with equal settings share a batch."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False

    def group(self) -> tuple:
        if self.temperature == 0:
            return ("greedy", self.ignore_eos)
        if self.seed is not None:  # a seeded request runs alone: its seed gives one answer whatever else is queued
            return ("seeded", uuid.uuid4().hex)
        return ("sample", self.temperature, self.top_p, self.ignore_eos)


@dataclass
class ChatPrompt:
    """One row of a generation batch: its unpadded ids (T,), its image views (V, 3, h, w) or None."""

    input_ids: torch.Tensor
    views: torch.Tensor | None
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    sampling: Sampling = field(default_factory=Sampling)


@dataclass
class ChatResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class ChatService:
    """Serves a ``BridgeModel`` through its processor and KV-cache generation loop."""

    family = "bridge"
    capabilities = ("chat",)

    def __init__(self, name: str, model: Any, config: ServeConfig) -> None:
        if model.processor is None:
            raise ModelError(f"model {name!r} has no processor attached; save the checkpoint with its processor")
        self.name, self.model, self.processor = name, model.eval(), model.processor
        self.context = int(getattr(model.language_model.config, "max_position_embeddings", 0) or 0)
        self.supports_continuous = supports_model(model)
        self.engine: Any = None

    def prepare(
        self, turns: list[dict], image: Image.Image | None, max_tokens: int, stop: list[str], sampling: Sampling
    ) -> ChatPrompt:
        """Template, tokenize and preprocess one conversation (blocking: see ``media.off_loop``)."""
        batch = self.processor.prompts([turns], images=[image] if image is not None else None, padding_side="left")
        ids = batch["input_ids"][0][batch["attention_mask"][0].bool()]  # (T,)
        pv = batch["pixel_values"]
        views = None if pv is None else (pv if isinstance(pv, torch.Tensor) else pv[0])
        if self.context and len(ids) + max_tokens > self.context:
            raise APIError(
                f"the prompt is {len(ids)} tokens (image included) and max_tokens is {max_tokens}, more than the "
                f"model's context of {self.context}; shorten the conversation or lower max_tokens",
                param="messages",
                code="context_length_exceeded",
            )
        return ChatPrompt(ids, views, max_tokens, stop, sampling)

    def run_batch(self, jobs: list[Any]) -> list[ChatResult]:
        from mmstack.models.bridge_generate import GenerationConfig, stream_tokens

        prompts: list[ChatPrompt] = [j.payload for j in jobs]
        sampling = prompts[0].sampling  # the same for the whole batch (the jobs' group)
        cfg = GenerationConfig(
            max_new_tokens=max(p.max_tokens for p in prompts),
            do_sample=sampling.temperature > 0,
            temperature=sampling.temperature or 1.0,
            top_p=sampling.top_p,
            eos_token_ids=[] if sampling.ignore_eos else self.processor.stop_token_ids(),
            pad_token_id=self.processor.pad_token_id,
            seed=sampling.seed,
        )
        rows = [_Row(job, self.processor.tokenizer, set(cfg.eos_token_ids)) for job in jobs]

        def stop(tokens: torch.Tensor) -> torch.Tensor:
            for row, tok in zip(rows, tokens.tolist(), strict=True):
                row.push(tok)
            return torch.tensor([row.finish is not None for row in rows])

        with torch.inference_mode():
            for _ in stream_tokens(self.model, **self._collate(prompts), config=cfg, stop=stop):
                pass
        return [row.result(len(p.input_ids)) for row, p in zip(rows, prompts, strict=True)]

    def run_continuous(self, feed: Any) -> None:
        """Continuous batching: before each decode step, newcomers from ``feed`` join the running batch;
        finished rows leave at once. Returns when no row is left and nobody waits."""
        batch, rows = RunningBatch(self.model), []
        with torch.inference_mode():
            while not feed.stopping:
                rows += self._join(batch, feed, feed.take(feed.capacity - len(rows)))
                if not rows:
                    return
                rows = self._decode_step(batch, rows, feed)
        for row in rows:
            feed.finish(row.job, APIError("the server is shutting down", status=503, type="server_error"))

    def _decode_step(self, batch: RunningBatch, rows: list[_Row], feed: Any) -> list[_Row]:
        """Choose every row's next token, answer the rows that finished, feed the others' tokens."""
        t0 = time.perf_counter()
        tokens = _choose_per_row(batch.logits, rows)
        for row, token in zip(rows, tokens.tolist(), strict=True):
            row.push(token)
        live = [i for i, row in enumerate(rows) if row.finish is None]
        for row in rows:
            if row.finish is not None:
                feed.finish(row.job, row.outcome(), time.perf_counter() - row.joined_at)
        batch.keep(live)
        if not live:
            return []
        try:
            batch.step(tokens[live])
        except Exception as err:  # a decode step cannot be split by row: its rows fail together
            log_failure(self.name, err)
            for i in live:
                feed.finish(rows[i].job, err)
            batch.keep([])
            return []
        feed.record("chat", len(live), time.perf_counter() - t0)
        return [rows[i] for i in live]

    def _join(self, batch: RunningBatch, feed: Any, jobs: list[Any]) -> list[_Row]:
        """Prefill ``jobs`` together and merge them into ``batch``; a prompt that fails fails alone."""
        if not jobs:
            return []
        t0 = time.perf_counter()
        if not self._prefill(batch, feed, jobs):
            jobs = [job for job in jobs if self._prefill(batch, feed, [job])] if len(jobs) > 1 else []
        if jobs:
            feed.record("prefill", len(jobs), time.perf_counter() - t0)
        stop_ids = set(self.processor.stop_token_ids())
        tokenizer = self.processor.tokenizer
        return [_Row(job, tokenizer, set() if job.payload.sampling.ignore_eos else stop_ids) for job in jobs]

    def _prefill(self, batch: RunningBatch, feed: Any, jobs: list[Any]) -> bool:
        """Add ``jobs`` to ``batch``; False if that failed (a lone job is then answered with the error)."""
        try:
            batch.add(batch.prefill(**self._collate([j.payload for j in jobs])))
            return True
        except Exception as err:
            if len(jobs) == 1:
                log_failure(self.name, err)
                feed.finish(jobs[0], err)
            return False

    def _collate(self, prompts: list[ChatPrompt]) -> dict[str, Any]:
        """Left-pad the rows (generation continues from each row's last real token) and stack the images."""
        width = max(len(p.input_ids) for p in prompts)
        ids = torch.full((len(prompts), width), self.processor.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p.input_ids) :] = p.input_ids
            mask[i, width - len(p.input_ids) :] = 1
        views = [p.views for p in prompts if p.views is not None]
        pixels: Any = None
        if views and all(v.shape[0] == 1 and v.shape[1:] == views[0].shape[1:] for v in views):
            pixels = torch.cat(views)  # (B_img, 3, H, W): one view each, one size
        elif views:
            pixels = views  # dynamic resolution or tiles: one (V, 3, h, w) tensor per image
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


class _Row:
    """One row's decoding: its tokens, its text (cut at stop strings) and the deltas it has streamed."""

    def __init__(self, job: Any, tokenizer: Any, eos: set[int]) -> None:
        self.job, self.tokenizer, self.eos = job, tokenizer, eos
        self.prompt: ChatPrompt = job.payload
        self.ids: list[int] = []
        self.text, self.shown = "", ""
        self.finish: str | None = None
        self.streaming = job.streaming
        # Text that might be the start of a stop string is held back until it is known not to be one.
        self.holdback = max((len(s) for s in self.prompt.stop), default=1) - 1
        self.joined_at = time.perf_counter()
        sampling = self.prompt.sampling
        self.sample_config: Any = None
        self.generator: torch.Generator | None = None
        if sampling.temperature > 0:
            from mmstack.models.bridge_generate import GenerationConfig

            self.sample_config = GenerationConfig(
                do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p
            )
            if sampling.seed is not None:
                self.generator = torch.Generator().manual_seed(sampling.seed)

    def push(self, token: int) -> None:
        if self.finish is not None:
            return
        if not self.job.active:
            self.finish = "cancelled"
            return
        if token in self.eos:
            self.finish = "stop"
        else:
            self.ids.append(token)
            # The text is needed as it grows only to stream it or to look for stop strings.
            if self.streaming or self.prompt.stop:
                self._decode()
            if self.finish is None and len(self.ids) >= self.prompt.max_tokens:
                self.finish = "length"
        if self.streaming:
            self._emit()

    def _decode(self) -> None:
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        cut = min((self.text.find(s) for s in self.prompt.stop if s in self.text), default=-1)
        if cut >= 0:
            self.text, self.finish = self.text[:cut], "stop"

    def _emit(self) -> None:
        visible = self.text if self.finish else self.text[: max(len(self.shown), len(self.text) - self.holdback)]
        if len(visible) > len(self.shown) and visible.startswith(self.shown):
            self.job.emit(visible[len(self.shown) :])
            self.shown = visible

    def result(self, prompt_tokens: int) -> ChatResult:
        if not (self.streaming or self.prompt.stop):
            self._decode()
        return ChatResult(self.text.strip(), self.finish or "length", prompt_tokens, len(self.ids))

    def outcome(self) -> ChatResult | Exception:
        """The row's answer, or the error its (already gone) caller was given."""
        if self.finish != "cancelled":
            return self.result(len(self.prompt.input_ids))
        if self.job.cancelled:
            return ClientDisconnectedError("the client disconnected")
        return DeadlineExceededError("the request did not finish before its deadline; retry later")


def _choose_per_row(logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
    """Each row's next token from logits (B, V): argmax for greedy rows, a draw with the row's own
    settings and generator for sampling rows (a seeded row's draws depend on its seed alone)."""
    from mmstack.models.bridge_generate import choose

    tokens = logits.argmax(-1)  # (B,)
    for i, row in enumerate(rows):
        if row.sample_config is not None:
            tokens[i] = choose(logits[i : i + 1], row.sample_config, row.generator)[0]
    return tokens


# ------------------------------------------------------------------------------------------- requests


def _prompt(svc: ChatService, messages: list[ChatMessage], media: MediaConfig, *prepare_args: Any) -> Any:
    """The conversation's image decoded and its prompt prepared (blocking: see ``media.off_loop``)."""
    turns, image = conversation(messages, media)
    return svc.prepare(turns, image, *prepare_args)


def image_urls(messages: list[ChatMessage]) -> list[Any]:
    """The image URLs in ``messages``' content parts, in order."""
    urls = []
    for msg in messages:
        for part in msg.content if isinstance(msg.content, list) else []:
            p = part if isinstance(part, dict) else part.model_dump()
            if p.get("type") != "text":
                urls.append((p.get("image_url") or {}).get("url"))
    return urls


def conversation(messages: list[ChatMessage], media: MediaConfig) -> tuple[list[dict], Image.Image | None]:
    """OpenAI messages -> the processor's alternating turns and the conversation's one image.

    System/developer text is put before the first user turn; consecutive messages of one role are
    joined; literal ``<image>``/``<video>`` in the text are removed so users cannot forge placeholders.
    """
    from mmstack.processing.bridge_processor import IMAGE_TOKEN, VIDEO_TOKEN

    system, turns, image = [], [], None
    for i, msg in enumerate(messages):
        parts = [{"type": "text", "text": msg.content}] if isinstance(msg.content, str) else msg.content or []
        text = ""
        for part in parts:
            p = part if isinstance(part, dict) else part.model_dump()
            if p["type"] == "text":
                text += (p.get("text") or "").replace(IMAGE_TOKEN, "").replace(VIDEO_TOKEN, "")
            elif msg.role != "user":
                raise APIError(f"messages[{i}]: only user messages may hold images", param="messages")
            elif image is not None:
                raise APIError("this model takes one image per conversation", param="messages")
            else:
                image = load_image_url(p["image_url"]["url"], media, param=f"messages[{i}].content")
                text += f"{IMAGE_TOKEN}\n"
        if msg.role in ("system", "developer"):
            system.append(text.strip())
            continue
        role = "human" if msg.role == "user" else "gpt"
        if turns and turns[-1]["from"] == role:
            turns[-1]["value"] += "\n" + text.strip()
        else:
            turns.append({"from": role, "value": text.strip()})
    if not turns or turns[0]["from"] != "human" or turns[-1]["from"] != "human":
        raise APIError("the messages must start and end with a user message", param="messages")
    if system:
        turns[0]["value"] = "\n".join([*system, turns[0]["value"]])
    return turns, image


def _limits(body: ChatRequest, state: ServerState) -> tuple[int, list[str], Sampling]:
    if body.n != 1:
        raise APIError("only n=1 is supported", param="n")
    gen = state.config.generation
    max_tokens = body.max_completion_tokens or body.max_tokens or gen.max_tokens
    if max_tokens > gen.max_tokens_limit:
        raise APIError(f"max_tokens must be <= {gen.max_tokens_limit}, got {max_tokens}", param="max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise APIError("stop takes up to 4 non-empty strings", param="stop")
    temperature = gen.temperature if body.temperature is None else body.temperature
    return max_tokens, stop, Sampling(temperature, body.top_p or 1.0, body.seed, body.ignore_eos)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    state = state_of(request)
    svc = state.service(body.model, "chat")
    max_tokens, stop, sampling = _limits(body, state)
    ticket = svc.engine.admit()  # 429 here, before any image is decoded
    try:
        args = (svc, body.messages, state.config.media, max_tokens, stop, sampling)
        prompt = await off_loop(_prompt, *args, body_bytes=body_bytes(request.headers), urls=image_urls(body.messages))
        job = ticket.submit(prompt, op="chat", group=sampling.group(), stream=body.stream)
    except BaseException:
        ticket.release()
        raise
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": svc.name}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _EventStream(_events(job, ticket, request, meta, include_usage), ticket)
    with ticket:
        result: ChatResult = await job.result(watch_disconnect(request.receive))
    message = {"role": "assistant", "content": result.text}
    return {
        **meta,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason, "logprobs": None}],
        "usage": _usage(result),
    }


class _EventStream(StreamingResponse):
    """A server-sent event response that frees its queue slot however it ends: a client that leaves
    before the first byte never starts the event generator, so its ``finally`` alone would not run."""

    def __init__(self, events: AsyncIterator[str], ticket: Any) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.ticket = ticket

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.release()


def _usage(r: ChatResult) -> dict[str, int]:
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.prompt_tokens + r.completion_tokens,
    }


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _events(job: Any, ticket: Any, request: Request, meta: dict, include_usage: bool) -> AsyncIterator[str]:
    """The OpenAI chunk stream: a role chunk, content deltas, a finish chunk, usage (if asked), [DONE]."""

    def chunk(delta: dict, finish: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {**meta, "object": "chat.completion.chunk", "choices": [choice]}

    try:
        yield _sse(chunk({"role": "assistant", "content": ""}))
        async for delta in job.stream(watch_disconnect(request.receive)):
            yield _sse(chunk({"content": delta}))
        result: ChatResult = await job.result()
        yield _sse(chunk({}, result.finish_reason))
        if include_usage:
            yield _sse({**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(result)})
        yield "data: [DONE]\n\n"
    except ClientDisconnectedError:
        return
    except Exception as err:  # headers are sent already: report the error in the stream, as OpenAI does
        yield _sse(as_api_error(err).body())
    finally:
        ticket.release()  # a client that left frees its slot at once; its row stops at the next step
