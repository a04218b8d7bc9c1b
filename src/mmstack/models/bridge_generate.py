"""Generation for the bridge VLM: an explicit prefill/decode loop over a KV cache.

- ``stream_tokens``: yields each step's tokens (B,) as they are chosen (the streaming primitive).
- ``generate``: the whole continuation as a (B, n_new) tensor; finished rows are padded.
- ``generate_text`` / ``stream_text``: prompts and images in, strings out, with stop strings.

Greedy decoding or sampling (temperature, top-k, top-p). Prompts are left-padded (the processor's
``padding_side="left"``) so that every row continues from its last real token; position ids count real
tokens only, so a padded row gives the same tokens as the same prompt alone (tested).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from mmstack.errors import ConfigError

if TYPE_CHECKING:
    from mmstack.models.bridge import BridgeModel, PixelInput


@dataclass
class GenerationConfig:
    """How to continue a prompt.

    Args:
        max_new_tokens: upper bound on generated tokens per row.
        do_sample: sample from the (filtered) distribution instead of taking the argmax.
        temperature, top_k, top_p: sampling filters (top_k=0 and top_p=1 disable them).
        eos_token_ids: tokens that end a row (included in the output, nothing after them).
        pad_token_id: what finished rows emit.
        stop_strings: text that ends a row (``generate_text``/``stream_text`` only; cut from the text).
        seed: seeds the sampling generator (None: torch's global RNG).
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int = 0
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 (use do_sample=false for greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")


def choose(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row from logits (B, V): argmax, or a sample after temperature/top-k/top-p."""
    if not cfg.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already cover top_p (the first token always stays).
        drop = probs.cumsum(-1) - probs > cfg.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def stream_tokens(
    model: BridgeModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: PixelInput = None,
    video_values: PixelInput = None,
    config: GenerationConfig | None = None,
    stop: Any = None,
) -> Iterator[torch.Tensor]:
    """Yield the tokens (B,) chosen at each step; rows that finished yield ``pad_token_id``.

    ``stop(step_tokens) -> BoolTensor (B,)`` may end rows early (stop strings); the loop ends when all
    rows are done or after ``max_new_tokens``.
    """
    cfg = config or GenerationConfig()
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    b, t = input_ids.shape
    logits, cache = model.prefill(input_ids, attention_mask, pixel_values, video_values)
    mask = torch.cat([attention_mask, attention_mask.new_ones(b, cfg.max_new_tokens)], dim=1)
    positions = attention_mask.long().sum(-1) - 1  # (B,) position of each row's last real token
    done = torch.zeros(b, dtype=torch.bool)
    eos = torch.tensor(cfg.eos_token_ids, dtype=torch.long)
    for step in range(cfg.max_new_tokens):
        tokens = choose(logits, cfg, generator).masked_fill(done, cfg.pad_token_id)
        stopped = stop(tokens) if stop is not None else None  # before the yield: consumers see this step's text
        yield tokens
        done = done | torch.isin(tokens, eos)
        if stopped is not None:
            done = done | stopped
        if bool(done.all()) or step + 1 == cfg.max_new_tokens:
            return
        positions = positions + 1
        logits = model.decode(tokens, cache, mask[:, : t + step + 1], positions)


def generate(
    model: BridgeModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: PixelInput = None,
    video_values: PixelInput = None,
    config: GenerationConfig | None = None,
    **overrides: Any,
) -> torch.Tensor:
    """The generated tokens (B, n_new) of left-padded prompts (finished rows padded with ``pad_token_id``)."""
    cfg = replace(config or GenerationConfig(), **overrides)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    steps = list(stream_tokens(model, input_ids, attention_mask, pixel_values, video_values, cfg))
    return torch.stack(steps, dim=1) if steps else input_ids.new_zeros(input_ids.shape[0], 0)


class _StopStrings:
    """Decodes each row as it grows and marks rows whose text contains a stop string."""

    def __init__(self, tokenizer: Any, n: int, stop_strings: Sequence[str], skip_ids: set[int]) -> None:
        self.tokenizer, self.stop_strings, self.skip = tokenizer, list(stop_strings), skip_ids
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.finished = [False] * n

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        for i, tok in enumerate(tokens.tolist()):
            if not self.finished[i]:
                self.ids[i].append(tok)
                if self.stop_strings and any(s in self.text(i) for s in self.stop_strings):
                    self.finished[i] = True
        return torch.tensor(self.finished)

    def text(self, i: int) -> str:
        ids = [t for t in self.ids[i] if t not in self.skip]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((text.find(s) for s in self.stop_strings if s in text), default=-1)
        return text[:cut] if cut >= 0 else text


def _prepare(model: BridgeModel, prompts: Sequence[Any], images: Sequence[Any] | None, videos: Any, cfg):
    proc = model.processor
    if proc is None:
        raise ConfigError("this model has no processor attached; load it from a checkpoint folder")
    batch = proc.prompts(prompts, images=images, videos=videos, padding_side="left")
    cfg = replace(
        cfg or GenerationConfig(),
        eos_token_ids=(cfg.eos_token_ids if cfg and cfg.eos_token_ids else proc.stop_token_ids()),
        pad_token_id=proc.pad_token_id,
    )
    return proc, batch, cfg


def generate_text(
    model: BridgeModel,
    prompts: Sequence[Any],
    images: Sequence[Any] | None = None,
    videos: Sequence[Any] | None = None,
    config: GenerationConfig | None = None,
) -> list[str]:
    """Answer each prompt (a question string or a list of turns) about its image/clip; returns the texts."""
    proc, batch, cfg = _prepare(model, prompts, images, videos, config)
    stopper = _StopStrings(proc.tokenizer, len(prompts), cfg.stop_strings, set(cfg.eos_token_ids))
    for _ in stream_tokens(model, **batch, config=cfg, stop=stopper):
        pass
    return [stopper.text(i).strip() for i in range(len(prompts))]


def stream_text(
    model: BridgeModel,
    prompt: Any,
    image: Any = None,
    video: Any = None,
    config: GenerationConfig | None = None,
) -> Iterator[str]:
    """Yield the answer to one prompt piece by piece (text deltas), as a chat UI shows it."""
    proc, batch, cfg = _prepare(
        model, [prompt], [image] if image is not None else None, [video] if video is not None else None, config
    )
    stopper = _StopStrings(proc.tokenizer, 1, cfg.stop_strings, set(cfg.eos_token_ids))
    shown = ""
    for _ in stream_tokens(model, **batch, config=cfg, stop=stopper):
        text = stopper.text(0).lstrip()
        if len(text) > len(shown) and text.startswith(shown):
            yield text[len(shown) :]
            shown = text
