"""The bridge VLM's processor: chat template, ``<image>``/``<video>`` expansion, labels, padding, pixels.

The template is LLaVA-1.5's (Vicuna v1)::

    [system ]USER: <image>\\nWhat colour is the star? ASSISTANT: red</s>USER: ... ASSISTANT: ...</s>

Labels come from character spans: the whole text is tokenised once with offsets, and a token is an
assistant token when its (whitespace-trimmed) characters lie inside an answer (answer + end token).
A token that straddles an answer's boundary means the template does not tokenise as assumed; that
raises ``DataError`` instead of silently mislabelling (the classic LLaVA/TRL failure). Each placeholder
must be a single token, and is then expanded to exactly the number of visual tokens the model makes for
that image; truncation that would cut an image, or leave a sample with no assistant token, raises too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from mmstack.config import from_dict, to_dict
from mmstack.errors import ConfigError, DataError, ModelError
from mmstack.processing.dynamic_resolution import dynamic_size, num_patches, tile_views
from mmstack.processing.image import ImageProcessingConfig, normalize, stack_uint8, to_uint8
from mmstack.utils.atomic import atomic_write_json

IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
IGNORE_INDEX = -100
CONFIG_FILE = "bridge_processor.json"
ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


@dataclass
class BridgeProcessorConfig:
    """Preprocessing that travels with a bridge checkpoint.

    Args:
        image: base view size, mean/std, resize mode, interpolation (``mmstack.processing.image``).
        image_mode: ``"fixed"`` (every image squashed to ``image.size``), ``"dynamic"`` (aspect kept, sides
            aligned to the patch, ``min_image_tokens..max_image_tokens`` patches) or ``"anyres"`` (a global
            view plus up to ``max_tiles`` base-size tiles, as LLaVA-NeXT).
        patch_size, cls_token, connector_tokens, video_pool: what the model makes of a view, copied from it
            by ``BridgeProcessor.for_model`` (``connector_tokens`` > 0: a resampler's fixed output).
        video_frames: frames sampled from a clip.
        system_prompt: text before the first turn.
        max_length: longest training sequence after expansion.
        image_placement: ``"as_written"`` keeps each placeholder where the text has it (LLaVA puts
            ``<image>\n`` before the question); ``"after_text"`` moves the placeholders a user turn opens with
            behind its text (``question\n<image>``), so in a causal LM the visual tokens can attend to the
            question (``placeholders_after_text``; placeholders inside the text stay).
    """

    image: ImageProcessingConfig = field(
        default_factory=lambda: ImageProcessingConfig(
            size=(64, 64), resize_mode="squash", mean=(0.5,) * 3, std=(0.5,) * 3
        )
    )
    image_mode: Literal["fixed", "dynamic", "anyres"] = "fixed"
    max_image_tokens: int = 256
    min_image_tokens: int = 4
    max_tiles: int = 4
    patch_size: int = 8
    cls_token: bool = False
    connector_tokens: int = 0
    video_frames: int = 4
    video_pool: int = 1
    system_prompt: str = ""
    max_length: int = 512
    image_placement: Literal["as_written", "after_text"] = "as_written"

    def __post_init__(self) -> None:
        if self.image_placement not in ("as_written", "after_text"):
            raise ConfigError(
                f"processor.image_placement must be as_written or after_text, got {self.image_placement!r}"
            )
        if self.image_mode not in ("fixed", "dynamic", "anyres"):
            raise ConfigError(f"image_mode must be fixed, dynamic or anyres, got {self.image_mode!r}")
        for name in ("patch_size", "video_frames", "video_pool", "max_length", "max_tiles", "min_image_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"processor.{name} must be > 0, got {getattr(self, name)}")
        if self.max_image_tokens < self.min_image_tokens:
            raise ConfigError("processor.max_image_tokens must be >= processor.min_image_tokens")
        if any(s % self.patch_size for s in self.image.size):
            raise ConfigError(f"image.size {self.image.size} must be a multiple of patch_size={self.patch_size}")


@dataclass
class TemplateIds:
    """A tokenised conversation before expansion: one id per placeholder, labels -100 outside answers."""

    input_ids: list[int]
    labels: list[int]
    n_images: int
    n_videos: int


class BridgeProcessor:
    """Turns conversations, images and clips into model inputs (see the module docstring).

    Args:
        tokenizer: an HF fast tokenizer holding ``<image>`` and ``<video>`` as single special tokens.
        config: preprocessing and template settings.
    """

    def __init__(self, tokenizer: Any, config: BridgeProcessorConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config or BridgeProcessorConfig()
        self.image_token_id = _single_token_id(tokenizer, IMAGE_TOKEN)
        # Imported HF Llava tokenizers have no <video>; such a processor takes images only.
        self.video_token_id = _single_token_id(tokenizer, VIDEO_TOKEN) if VIDEO_TOKEN in tokenizer.get_vocab() else None
        if tokenizer.eos_token is None:
            raise ConfigError("the tokenizer needs an eos_token: it ends every assistant turn")

    @classmethod
    def for_model(cls, model: Any, tokenizer: Any, **config: Any) -> BridgeProcessor:
        """A processor whose token counts follow ``model`` (patch size, CLS, resampler, video pooling)."""
        from mmstack.models.bridge import vision_has_cls

        mc = model.config
        derived = {
            "patch_size": model.patch_size,
            "cls_token": vision_has_cls(mc.vision) and mc.vision_feature_select_strategy == "full",
            "connector_tokens": mc.connector.num_queries if mc.connector.type == "resampler" else 0,
            "video_pool": mc.video_pool,
        }
        return cls(tokenizer, from_dict(BridgeProcessorConfig, {**config, **derived}, where="processor"))

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def stop_token_ids(self) -> list[int]:
        return [int(self.tokenizer.eos_token_id)]

    # ------------------------------------------------------------------------------------- counting

    def tokens_per_view(self, height: int, width: int) -> int:
        """Visual tokens of one view: patches (+ CLS), or the resampler's fixed count."""
        if self.config.connector_tokens:
            return self.config.connector_tokens
        return num_patches(width, height, self.config.patch_size) + int(self.config.cls_token)

    def tokens_per_frame(self, height: int, width: int) -> int:
        if self.config.connector_tokens:
            return self.config.connector_tokens
        p, pool = self.config.patch_size, self.config.video_pool
        gh, gw = -(-(height // p) // pool), -(-(width // p) // pool)
        return gh * gw + int(self.config.cls_token)

    def image_tokens(self, views: torch.Tensor) -> int:
        """Visual tokens of one image given its views (V, 3, h, w)."""
        return views.shape[0] * self.tokens_per_view(*views.shape[-2:])

    def video_tokens(self, frames: torch.Tensor) -> int:
        """Visual tokens of one clip given its frames (K, 3, h, w)."""
        return frames.shape[0] * self.tokens_per_frame(*frames.shape[-2:])

    # --------------------------------------------------------------------------------------- pixels

    def image_views(self, img: Image.Image) -> torch.Tensor:
        """Normalised views of one image, (V, 3, h, w): one view (fixed/dynamic) or global + tiles (anyres)."""
        cfg = self.config
        if cfg.image_mode == "fixed":
            views = [to_uint8(img, cfg.image)]
        elif cfg.image_mode == "dynamic":
            w, h = dynamic_size(img.width, img.height, cfg.patch_size, cfg.max_image_tokens, cfg.min_image_tokens)
            views = [to_uint8(img, _sized(cfg.image, h, w))]
        else:
            base = cfg.image.size[0]
            tiles = tile_views(img.convert("RGB"), base, cfg.max_tiles, cfg.image.interpolation)
            views = [np.asarray(t, dtype=np.uint8) for t in tiles]
        return normalize(stack_uint8(views), cfg.image)

    def clip_frames(self, frames: Sequence[Image.Image]) -> torch.Tensor:
        """Normalised frames (K, 3, H, W) of a clip; ``frames`` are already the sampled ones."""
        return normalize(stack_uint8([to_uint8(f, self.config.image) for f in frames]), self.config.image)

    # ------------------------------------------------------------------------------------- template

    def render(self, turns: Sequence[Any], add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """The template text of ``turns`` and the character spans of the assistant answers (+ end token)."""
        eos = self.tokenizer.eos_token
        text = f"{self.config.system_prompt} " if self.config.system_prompt else ""
        spans = []
        for role, value in normalise_turns(turns):
            if role == "human":
                if self.config.image_placement == "after_text":
                    value = placeholders_after_text(value)
                text += f"USER: {value} "
            else:
                text += "ASSISTANT: "
                spans.append((len(text), len(text) + len(value) + len(eos)))
                text += value + eos
        if add_generation_prompt:
            text += "ASSISTANT:"
        return text, spans

    def encode_turns(self, turns: Sequence[Any], add_generation_prompt: bool = False, name: str = "") -> TemplateIds:
        """Tokenise a conversation (placeholders unexpanded) and label its assistant tokens."""
        text, spans = self.render(turns, add_generation_prompt)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        labels = [IGNORE_INDEX] * len(ids)
        for i, (start, end) in enumerate(offsets):
            while start < end and text[start].isspace():
                start += 1
            for s, e in spans:
                if start < e and end > s:
                    if not (start >= s and end <= e):
                        raise DataError(
                            f"{_where(name)}the chat template does not tokenize as expected: token "
                            f"{text[start:end]!r} crosses the boundary of the answer {text[s:e]!r}; use a "
                            "tokenizer that splits at spaces or change the template"
                        )
                    labels[i] = ids[i]
        bos = self.tokenizer.bos_token_id
        if bos is not None:
            ids, labels = [bos, *ids], [IGNORE_INDEX, *labels]
        n_img, n_vid = text.count(IMAGE_TOKEN), text.count(VIDEO_TOKEN)
        if n_vid and self.video_token_id is None:
            raise DataError(f"{_where(name)}the text has {VIDEO_TOKEN} but this tokenizer has no video placeholder")
        for token, tid, n in ((IMAGE_TOKEN, self.image_token_id, n_img), (VIDEO_TOKEN, self.video_token_id, n_vid)):
            if n and ids.count(tid) != n:
                raise DataError(
                    f"{_where(name)}the text has {n} {token} placeholders but tokenizes to {ids.count(tid)} "
                    f"{token} tokens; add {token} to the tokenizer as a special token"
                )
        if spans and all(lab == IGNORE_INDEX for lab in labels):
            raise DataError(f"{_where(name)}no token of the assistant answers survived tokenization")
        return TemplateIds(ids, labels, n_img, n_vid)

    def expand(
        self,
        tpl: TemplateIds,
        image_tokens: Sequence[int],
        video_tokens: Sequence[int] = (),
        train: bool = True,
        name: str = "",
    ) -> tuple[list[int], list[int]]:
        """Replace each placeholder by its visual tokens; truncate to ``max_length`` when training.

        Raises ``DataError`` when the counts do not match the placeholders, when truncation would cut
        a visual block, or when no assistant token would be left to learn from.
        """
        if len(image_tokens) != tpl.n_images or len(video_tokens) != tpl.n_videos:
            raise DataError(
                f"{_where(name)}the text has {tpl.n_images} {IMAGE_TOKEN} and {tpl.n_videos} {VIDEO_TOKEN} "
                f"placeholders but {len(image_tokens)} images and {len(video_tokens)} clips were given"
            )
        counts = {self.image_token_id: iter(image_tokens), self.video_token_id: iter(video_tokens)}
        ids: list[int] = []
        labels: list[int] = []
        last_visual = -1
        for tok, lab in zip(tpl.input_ids, tpl.labels, strict=True):
            if tok in counts:
                n = next(counts[tok])
                ids.extend([tok] * n)
                labels.extend([IGNORE_INDEX] * n)
                last_visual = len(ids) - 1
            else:
                ids.append(tok)
                labels.append(lab)
        if train:
            ids, labels = self._truncate(ids, labels, last_visual, name)
        return ids, labels

    def _truncate(self, ids: list[int], labels: list[int], last_visual: int, name: str):
        limit = self.config.max_length
        if len(ids) > limit:
            if last_visual >= limit:
                raise DataError(
                    f"{_where(name)}{len(ids)} tokens exceed max_length={limit} and truncation would cut an "
                    f"image (its visual tokens end at position {last_visual}); raise processor.max_length, "
                    "lower the image resolution, or shorten the conversation"
                )
            ids, labels = ids[:limit], labels[:limit]
        if all(lab == IGNORE_INDEX for lab in labels):
            raise DataError(
                f"{_where(name)}no assistant token is left within max_length={limit} ({len(ids)} tokens); the "
                "sample would train on nothing: raise processor.max_length or shorten the prompt"
            )
        return ids, labels

    # -------------------------------------------------------------------------------------- batches

    def pad(self, rows: Sequence[tuple[list[int], list[int]]], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Pad (ids, labels) rows: right padding for training, left padding for batched generation."""
        if padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, labs) in enumerate(rows):
            sl = slice(width - len(ids), width) if padding_side == "left" else slice(0, len(ids))
            input_ids[i, sl] = torch.tensor(ids, dtype=torch.long)
            labels[i, sl] = torch.tensor(labs, dtype=torch.long)
            mask[i, sl] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def __call__(
        self,
        conversations: Sequence[Sequence[Any]],
        images: Sequence[Image.Image | None] | None = None,
        videos: Sequence[Sequence[Image.Image] | None] | None = None,
        padding_side: str = "right",
        train: bool = True,
        add_generation_prompt: bool = False,
    ) -> dict[str, Any]:
        """A batch for ``BridgeModel``: ids, mask, labels, ``pixel_values``/``video_values`` (or None).

        ``images[i]``/``videos[i]`` belong to ``conversations[i]`` (None for text-only samples).
        """
        n = len(conversations)
        images = list(images) if images is not None else [None] * n
        videos = list(videos) if videos is not None else [None] * n
        if len(images) != n or len(videos) != n:
            raise DataError(f"{n} conversations but {len(images)} images and {len(videos)} clips")
        rows, pixel_list, video_list = [], [], []
        for i, turns in enumerate(conversations):
            tpl = self.encode_turns(turns, add_generation_prompt, name=f"sample {i}")
            img_tok, vid_tok = [], []
            if images[i] is not None and tpl.n_images:
                views = self.image_views(images[i])
                pixel_list.append(views)
                img_tok.append(self.image_tokens(views))
            if videos[i] is not None and tpl.n_videos:
                frames = self.clip_frames(videos[i])
                video_list.append(frames)
                vid_tok.append(self.video_tokens(frames))
            rows.append(self.expand(tpl, img_tok, vid_tok, train=train, name=f"sample {i}"))
        batch: dict[str, Any] = self.pad(rows, padding_side)
        batch["pixel_values"] = _stack_if_uniform(pixel_list)
        batch["video_values"] = video_list or None
        return batch

    def prompts(
        self,
        prompts: Sequence[Any],
        images: Sequence[Image.Image | None] | None = None,
        videos: Sequence[Sequence[Image.Image] | None] | None = None,
        padding_side: str = "left",
    ) -> dict[str, Any]:
        """Generation inputs: each prompt is a question (the placeholder is added when an image or clip is
        given) or a list of turns ending with a human turn."""
        n = len(prompts)
        images = list(images) if images is not None else [None] * n
        videos = list(videos) if videos is not None else [None] * n
        convs = [_as_turns(p, images[i] is not None, videos[i] is not None) for i, p in enumerate(prompts)]
        batch = self(convs, images, videos, padding_side, train=False, add_generation_prompt=True)
        batch.pop("labels")
        return batch

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    # ------------------------------------------------------------------------------------ save/load

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(path))
        atomic_write_json(path / CONFIG_FILE, to_dict(self.config))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> BridgeProcessor:
        from transformers import AutoTokenizer

        path = Path(path)
        cfg_path = path / CONFIG_FILE
        if not cfg_path.is_file():
            raise ModelError(f"{path} has no {CONFIG_FILE}: it is not a bridge checkpoint")
        cfg = from_dict(BridgeProcessorConfig, json.loads(cfg_path.read_text()), where=str(cfg_path))
        return cls(AutoTokenizer.from_pretrained(str(path)), cfg)


# ------------------------------------------------------------------------------------------- helpers


_PLACEHOLDER = f"{re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)}"
_LEADING_PLACEHOLDERS = re.compile(rf"\s*((?:(?:{_PLACEHOLDER})\s*)+)")


def placeholders_after_text(value: str) -> str:
    """``"<image>\nWhat colour?"`` -> ``"What colour?\n<image>"``: the placeholders a turn opens with move behind its
    text; placeholders inside the text (interleaved documents, RAG prompts) stay where they are."""
    lead = _LEADING_PLACEHOLDERS.match(value)
    rest = value[lead.end() :] if lead else value
    if not lead or not rest.strip():
        return value
    marks = re.findall(_PLACEHOLDER, lead.group(1))
    return rest + "".join(f"\n{mark}" for mark in marks)


def normalise_turns(turns: Sequence[Any]) -> list[tuple[str, str]]:
    """(role, text) pairs from ``Turn`` objects or dicts (``from``/``value`` or ``role``/``content``)."""
    out = []
    for j, t in enumerate(turns):
        if isinstance(t, dict):
            role, value = t.get("from", t.get("role")), t.get("value", t.get("content"))
        else:
            role, value = getattr(t, "role", None), getattr(t, "value", None)
        if role not in ROLES or not isinstance(value, str):
            raise DataError(f"turn {j} must have a role (human/gpt or user/assistant) and a text value, got {t!r}")
        out.append((ROLES[role], value))
    for j, (role, _) in enumerate(out):
        if role != ("human" if j % 2 == 0 else "gpt"):
            raise DataError(f"turn {j} is {role!r}; turns must alternate human, gpt, ... starting with human")
    return out


def _as_turns(prompt: Any, has_image: bool, has_video: bool) -> list[Any]:
    if not isinstance(prompt, str):
        turns = list(prompt)
        if normalise_turns(turns)[-1][0] != "human":
            raise DataError("a generation prompt must end with a human turn")
        return turns
    text = prompt
    if has_video and VIDEO_TOKEN not in text:
        text = f"{VIDEO_TOKEN}\n{text}"
    if has_image and IMAGE_TOKEN not in text:
        text = f"{IMAGE_TOKEN}\n{text}"
    return [{"from": "human", "value": text}]


def _single_token_id(tokenizer: Any, token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ConfigError(f"the tokenizer splits {token} into {len(ids)} tokens; add it as a special token")
    return int(ids[0])


def _sized(cfg: ImageProcessingConfig, h: int, w: int) -> ImageProcessingConfig:
    return ImageProcessingConfig(
        size=(h, w), mean=cfg.mean, std=cfg.std, resize_mode="squash", interpolation=cfg.interpolation
    )


def _stack_if_uniform(views: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor] | None:
    """One (B, 3, H, W) tensor when every image is a single view of one size (the fast path), else the list."""
    if not views:
        return None
    if all(v.shape[0] == 1 and v.shape[1:] == views[0].shape[1:] for v in views):
        return torch.cat(views, dim=0)
    return views


def _where(name: str) -> str:
    return f"{name}: " if name else ""


def add_placeholder_tokens(tokenizer: Any) -> Any:
    """Add ``<image>`` and ``<video>`` as special tokens (for a pretrained LM's tokenizer); returns it."""
    missing = [t for t in (IMAGE_TOKEN, VIDEO_TOKEN) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def train_chat_tokenizer(texts: Sequence[str], max_length: int = 512) -> Any:
    """A word-level tokenizer for the shapes world (``train_caption_tokenizer``) with the chat template's
    words and the ``<image>``/``<video>`` placeholders as special tokens."""
    from tokenizers import processors

    from mmstack.processing.tokenizer import train_caption_tokenizer

    template_words = ["USER: ASSISTANT: ? . , : ' yes no"]
    tok = train_caption_tokenizer([*template_words, *texts], kind="wordlevel", max_length=max_length)
    # A causal LM's prompt starts with BOS and must not end with EOS (CLIP's template adds both); this is
    # what HF's LlavaProcessor gets when it tokenizes with add_special_tokens=True.
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.bos_token_id)]
    )
    return add_placeholder_tokens(tok)
