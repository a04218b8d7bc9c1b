"""Generation with the native model: explicit prefill/decode with a KV cache, classifier-free guidance,
constrained decoding and top-k sampling.

    gen = generate(model, ["a red circle at the top left"], "image", guidance=3.0, top_k=64, seed=0)
    gen.outputs[0]                      # a PIL image (None when an unconstrained generation is malformed)

- **Prefill / decode.** ``_Decoder`` feeds the (left-padded) prompts once, then one token per step, reusing
  the HF ``DynamicCache``; tokens forced by the layout (``<boi>``, ``<eol>``, ``<eoi>``, ``<sep>``) are
  queued and fed together with the next sampled step. ``use_cache=False`` recomputes the whole sequence each
  step (the reference path the cache is tested against).
- **Guidance.** Conditional and unconditional rows (the prompt without its caption) run in one batch; the
  logits are mixed as ``u + g * (c - u)`` before any masking, and both rows receive the sampled token.
- **Constraints.** A template lists, for each step of the block, either the token the layout forces or
  "a code": inside an image block only codes can be sampled and rows end with ``<eol>``. Captions may use
  only text tokens and ``<eos>``. With ``constrained=False`` the model writes the layout itself (for the
  valid-image rate).
- **Sampling.** Top-k with temperature from a seeded ``torch.Generator`` (temperature 0: greedy); one draw
  per row per sampled step, so the same seed gives the same samples with or without guidance rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmstack.errors import ConfigError, ImageError
from mmstack.processing.native_tokens import BOS_ID, EOS_ID, PAD_ID, LayoutError, NativeVocab

CODE = -1  # template entry: sample an image code here


@dataclass
class Generation:
    """What ``generate`` returns, one entry per input.

    ``outputs``: strings (text), PIL images (image) or lists of PIL frames (video); None where an
    unconstrained generation does not parse. ``tokens``: the generated ids after the prompt. ``codes``: the
    parsed VQ codes (h, w) or (T, h, w), None for text or malformed output.
    """

    modality: str
    outputs: list[Any]
    tokens: list[torch.Tensor]
    codes: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def valid(self) -> list[bool]:
        """Whether each output follows the layout (always true for constrained generations)."""
        return [o is not None for o in self.outputs]


# ------------------------------------------------------------------------------------------ inputs


def to_pixels(images: Any, size: int) -> torch.Tensor:
    """(B, 3, size, size) floats in [0, 1] from PIL images, paths, uint8 arrays or a tensor in [0, 1]."""
    from PIL import Image

    if isinstance(images, torch.Tensor):
        x = images if images.ndim == 4 else images[None]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if tuple(x.shape[1:]) != (3, size, size):
            raise ImageError(f"image tensors must be (B, 3, {size}, {size}), got {tuple(x.shape)}")
        return x
    if not isinstance(images, (list, tuple)):
        images = [images]
    arrays = []
    for img in images:
        if isinstance(img, (str, Path)):
            from mmstack.data.images import load_image

            img = load_image(img)
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img.astype(np.uint8))
        if not isinstance(img, Image.Image):
            raise ImageError(f"cannot read an image from {type(img).__name__}; pass a PIL image, a path or an array")
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(img, dtype=np.uint8))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)


def to_image(pixels: torch.Tensor):
    """A PIL image of (3, H, W) floats in [0, 1]."""
    from PIL import Image

    arr = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, mode="RGB")


# --------------------------------------------------------------------------------------- templates


def image_template(vocab: NativeVocab) -> list[int]:
    """Forced tokens and code slots of one image block: ``<boi> (code * w <eol>) * h <eoi>``."""
    row = [CODE] * vocab.grid + [vocab.eol]
    return [vocab.boi, *row * vocab.grid, vocab.eoi]


def video_template(vocab: NativeVocab, frames: int) -> list[int]:
    """``<bov> image <sep> image ... <eov>`` with ``frames`` images."""
    out = [vocab.bov]
    for t in range(frames):
        if t:
            out.append(vocab.sep)
        out += image_template(vocab)
    return [*out, vocab.eov]


def text_mask(vocab: NativeVocab) -> torch.Tensor:
    """Ids a caption may use: words (not <pad>/<unk>/<bos>) and <eos>."""
    allowed = torch.zeros(vocab.size, dtype=torch.bool)
    allowed[EOS_ID + 1 : vocab.n_text] = True
    allowed[EOS_ID] = True
    return allowed


# ----------------------------------------------------------------------------------------- decoding


class _Decoder:
    """Runs the model over growing sequences: prefill once, then only the new tokens (or everything each
    step without the cache). Prompts are left-padded so every row's last token is at the same column."""

    def __init__(self, model: Any, prompts: list[torch.Tensor], use_cache: bool) -> None:
        self.model, self.use_cache = model, use_cache
        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        self.ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long, device=device)
        self.mask = torch.zeros_like(self.ids)
        for i, p in enumerate(prompts):
            self.ids[i, width - len(p) :] = p.to(device)
            self.mask[i, width - len(p) :] = 1
        self.cache, self.fed = None, 0  # tokens already in the cache

    def append(self, tokens: torch.Tensor) -> None:
        self.ids = torch.cat([self.ids, tokens[:, None]], 1)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens[:, None])], 1)

    @torch.no_grad()
    def next_logits(self) -> torch.Tensor:
        """Logits (B, V) of the token after the current sequences."""
        from transformers import DynamicCache

        positions = (self.mask.cumsum(1) - 1).clamp_min(0)
        types = self.model.vocab.modality_types(self.ids)
        blocks = self.model.vocab.block_positions(self.ids)
        start = self.fed if self.use_cache else 0
        if self.use_cache and self.cache is None:
            self.cache = DynamicCache()
        out = self.model(
            self.ids[:, start:],
            attention_mask=self.mask,
            position_ids=positions[:, start:],
            past_key_values=self.cache if self.use_cache else None,
            use_cache=self.use_cache,
            modality_types=types[:, start:],
            block_positions=blocks[:, start:],
        )
        if self.use_cache:
            self.cache, self.fed = out.past_key_values, self.ids.shape[1]
        return out.logits[:, -1]


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits, ``u + g * (c - u)``; entries that are -inf in either branch (the
    silent group of per-modality heads) stay -inf."""
    mixed = uncond + scale * (cond - uncond)
    return torch.where(torch.isfinite(cond) & torch.isfinite(uncond), mixed, torch.full_like(mixed, float("-inf")))


def sample(logits: torch.Tensor, top_k: int | None, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row: greedy when ``temperature`` is 0, else top-k sampling at ``temperature``."""
    if temperature <= 0:
        return logits.argmax(-1)
    k = logits.shape[-1] if not top_k else min(top_k, logits.shape[-1])
    values, index = (logits / temperature).topk(k, dim=-1)  # (B, k)
    probs = torch.softmax(values, -1)
    pick = torch.multinomial(probs.cpu(), 1, generator=generator).to(index.device)  # (B, 1)
    return index.gather(-1, pick).squeeze(-1)


def decode(
    model: Any,
    prompts: list[torch.Tensor],
    *,
    template: list[int] | None = None,
    allowed: torch.Tensor | None = None,
    max_steps: int = 64,
    stop_ids: Sequence[int] = (EOS_ID,),
    guidance: float | None = None,
    uncond_prompt: torch.Tensor | None = None,
    top_k: int | None = None,
    temperature: float = 1.0,
    use_cache: bool = True,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Generate after each prompt; returns the new ids of each row (up to and including its stop token).

    Args:
        template: the layout (see ``image_template``): forced ids, and ``CODE`` where a code is sampled;
            the block ends with the template. None: free decoding for ``max_steps`` or until a stop id.
        allowed: bool (V,) mask of ids that free decoding may sample (None: any).
        guidance: classifier-free guidance scale (None: no unconditional rows).
        uncond_prompt: the unconditional prompt (required with ``guidance``).
    """
    if guidance is not None and uncond_prompt is None:
        raise ConfigError("guidance needs an unconditional prompt")
    vocab: NativeVocab = model.vocab
    n = len(prompts)
    rows = list(prompts) + ([uncond_prompt] * n if guidance is not None else [])
    dec = _Decoder(model, rows, use_cache)
    device = dec.ids.device
    generator = torch.Generator().manual_seed(seed)
    code_mask = torch.zeros(vocab.size, dtype=torch.bool, device=device)
    code_mask[vocab.code_offset :] = True
    stops = torch.tensor(list(stop_ids), device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    out: list[torch.Tensor] = []
    steps = len(template) if template is not None else max_steps
    for s in range(steps):
        forced = template[s] if template is not None and template[s] != CODE else None
        if forced is not None:
            tok = torch.full((n,), forced, dtype=torch.long, device=device)
        else:
            logits = dec.next_logits()
            if guidance is not None:
                logits = guide(logits[:n], logits[n:], guidance)
            mask = code_mask if template is not None else allowed
            if mask is not None:
                logits = logits.masked_fill(~mask.to(device), float("-inf"))
            tok = sample(logits, top_k, temperature, generator)
        tok = torch.where(done, torch.full_like(tok, PAD_ID), tok)
        out.append(tok)
        done |= torch.isin(tok, stops)
        if bool(done.all()) and template is None:
            break
        dec.append(torch.cat([tok, tok]) if guidance is not None else tok)
    ids = torch.stack(out, 1).cpu()  # (n, steps)
    return [_until_stop(row, stops.cpu()) for row in ids]


def _until_stop(row: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    hits = torch.nonzero(torch.isin(row, stops)).flatten()
    return row[: int(hits[0]) + 1] if len(hits) else row


# --------------------------------------------------------------------------------------- entry point


def generate(
    model: Any,
    inputs: Any,
    output_modality: str = "text",
    *,
    guidance: float | None = 3.0,
    top_k: int | None = 64,
    temperature: float | None = None,
    constrained: bool = True,
    frames: int = 4,
    max_new_tokens: int = 64,
    use_cache: bool = True,
    seed: int = 0,
    batch_size: int = 32,
) -> Generation:
    """Caption images/clips or draw images/clips.

    Args:
        inputs: for ``"image"``/``"video"``: a prompt or a list of prompts. For ``"text"``: an image, a list
            of images (PIL, paths, arrays, or a (B, 3, H, W) tensor), or, for clips, a list of lists of frames.
        output_modality: ``"text"`` (caption), ``"image"`` or ``"video"`` (``frames`` frames).
        guidance: classifier-free guidance scale for images/clips (None or 1.0 without guidance rows: plain
            conditional sampling; 1.0 with rows gives the same samples).
        top_k / temperature: sampling; temperature defaults to 1.0 for images/clips and 0 (greedy) for text.
        constrained: follow the layout (codes only inside image blocks, <eol> where rows end).
        use_cache: KV cache (False: recompute everything each step; same output, slower).
        seed: the sampling seed (each batch of ``batch_size`` inputs draws from ``seed + batch index``).
    """
    if output_modality not in ("text", "image", "video"):
        raise ConfigError(f"output_modality must be 'text', 'image' or 'video', got {output_modality!r}")
    model.eval()
    if output_modality == "text":
        return _caption(model, inputs, max_new_tokens, top_k, temperature or 0.0, use_cache, seed, batch_size)
    prompts = [inputs] if isinstance(inputs, str) else list(inputs)
    if not all(isinstance(p, str) for p in prompts):
        raise ConfigError("image/video generation takes a prompt string or a list of prompt strings")
    if frames < 1:
        raise ConfigError(f"frames must be >= 1, got {frames}")
    gen = Generation(output_modality, [], [], [])
    temp = 1.0 if temperature is None else temperature
    for b in range(0, len(prompts), batch_size):
        chunk = [_prompt(model, p) for p in prompts[b : b + batch_size]]
        ids = _draw(model, chunk, output_modality, frames, guidance, top_k, temp, constrained, use_cache, seed + b)
        for row in ids:
            codes = _parse(model.vocab, row, output_modality)
            gen.tokens.append(row)
            gen.codes.append(codes)
            gen.outputs.append(None if codes is None else _pixels_out(model, codes, output_modality))
    return gen


def _prompt(model: Any, text: str) -> torch.Tensor:
    return torch.cat([torch.tensor([BOS_ID]), model.encode_text(text)])


def _draw(model, prompts, modality, frames, guidance, top_k, temperature, constrained, use_cache, seed):
    vocab: NativeVocab = model.vocab
    template = image_template(vocab) if modality == "image" else video_template(vocab, frames)
    stop = vocab.eoi if modality == "image" else vocab.eov
    return decode(
        model,
        prompts,
        template=template if constrained else None,
        max_steps=len(template) + vocab.grid,
        stop_ids=(stop, EOS_ID),
        guidance=guidance,
        uncond_prompt=torch.tensor([BOS_ID]) if guidance is not None else None,
        top_k=top_k,
        temperature=temperature,
        use_cache=use_cache,
        seed=seed,
    )


def _parse(vocab: NativeVocab, row: torch.Tensor, modality: str) -> torch.Tensor | None:
    try:
        return vocab.parse_image(row) if modality == "image" else vocab.parse_video(row)
    except LayoutError:
        return None


def _pixels_out(model: Any, codes: torch.Tensor, modality: str):
    vq = model.vq
    if modality == "image":
        return to_image(vq.decode(codes[None].to(next(vq.parameters()).device))[0].cpu())
    return [to_image(f.cpu()) for f in vq.decode(codes.to(next(vq.parameters()).device))]


def _caption(model, inputs, max_new_tokens, top_k, temperature, use_cache, seed, batch_size) -> Generation:
    vocab: NativeVocab = model.vocab
    clips = isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], (list, tuple))
    items = list(inputs) if clips else _as_list(inputs)
    gen = Generation("text", [], [], [])
    for b in range(0, len(items), batch_size):
        chunk = items[b : b + batch_size]
        if clips:
            prompts = [vocab.generation_prompt("v2t", visual=model.image_codes(list(frames))) for frames in chunk]
        else:
            codes = model.image_codes(chunk)
            prompts = [vocab.generation_prompt("i2t", visual=c) for c in codes]
        ids = decode(
            model,
            prompts,
            allowed=text_mask(vocab),
            max_steps=max_new_tokens,
            stop_ids=(EOS_ID,),
            top_k=top_k,
            temperature=temperature,
            use_cache=use_cache,
            seed=seed + b,
        )
        for row in ids:
            gen.tokens.append(row)
            gen.codes.append(None)
            gen.outputs.append(model.decode_text(row))
    return gen


def _as_list(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs if inputs.ndim == 4 else inputs[None]
    return list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
