"""Training data of the llava recipe: sources -> tokenised samples -> batches for the shared trainer.

Sources (``kind``) read from a data folder such as the shapes world's:

- ``text``: plain language-model text for stage 0 (every caption, and every conversation rendered
  through the chat template without its image); every token carries loss.
- ``captions``: ``<image>`` + a describe instruction -> a caption (stage 1 alignment).
- ``conversations``: LLaVA-Instruct ``conversations.json`` (stage 2).
- ``clips``: the world's ``clips.jsonl``; ``<video>`` + motion questions over K sampled frames.
- ``text_qa``: text-only instruction data: a scene's full caption + a question about it -> the answer.

Samples are tokenised once (placeholders unexpanded). Pixels are decoded once into uint8 tensors (cached
on disk by T's ``cached_pixels``); a batch resizes them to the current resolution of the progressive
schedule, expands the placeholders to the matching token count and pads on the right.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from mmstack.errors import ConfigError, DataError
from mmstack.processing.bridge_processor import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    BridgeProcessor,
    TemplateIds,
    normalise_turns,
)
from mmstack.processing.image import to_uint8

DESCRIBE = (
    "Describe the image.",
    "What is in this picture?",
    "Give a short description of the image.",
    "What do you see?",
)
SourceKind = Literal["text", "captions", "conversations", "clips", "text_qa"]


@dataclass
class SourceSpec:
    """One data source of a stage's mixture.

    Args:
        kind: see the module docstring.
        path: data folder (or file) relative to the recipe's ``data.train``; empty = ``data.train`` itself.
        factor: repeat factor (stage ``mix_length`` 0) or weight (``mix_length`` > 0).
        limit: use at most this many records (0 = all).
        single_turns: ``conversations`` and ``clips``: one sample per question, each with its image (or
            video) placeholder, so every question is asked the way evaluation and chat ask it (first, and
            with ``processor.image_placement: after_text`` before the visual tokens; BENCHMARKS.md, session 16)
            and a batch of the same token budget shows more distinct images.
    """

    kind: SourceKind = "conversations"
    path: str = ""
    factor: float = 1.0
    limit: int = 0
    single_turns: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("text", "captions", "conversations", "clips", "text_qa"):
            raise ConfigError(
                f"data source kind must be text, captions, conversations, clips or text_qa, got {self.kind!r}"
            )
        if self.factor < 0 or self.limit < 0:
            raise ConfigError("data source factor and limit must be >= 0")
        if self.single_turns and self.kind not in ("conversations", "clips"):
            raise ConfigError(
                f"single_turns splits conversations and clips' questions; a {self.kind!r} source has none to split"
            )


@dataclass
class Sample:
    """A tokenised training sample: template ids, and which cached image / clip it shows (-1: none)."""

    tpl: TemplateIds
    image: int = -1
    clip: int = -1
    name: str = ""


@dataclass
class Visuals:
    """Decoded pixels shared by every source of a folder: images (N, 3, H, W), clips (C, K, 3, H, W), uint8."""

    images: torch.Tensor | None = None
    clips: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------- reading


def read_scenes(folder: Path) -> list[dict[str, Any]]:
    path = folder / "scenes.jsonl"
    if not path.is_file():
        raise DataError(f"{path} not found: captions/text sources need a shapes-world folder (mmstack world generate)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_clips(folder: Path) -> list[dict[str, Any]]:
    path = folder / "clips.jsonl"
    if not path.is_file():
        raise DataError(f"{path} not found: generate the world with --clips K to train on motion")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def clip_turns(record: dict[str, Any]) -> list[dict[str, str]]:
    """A clip's questions as a conversation, ``<video>`` in the first human turn."""
    turns = []
    for j, q in enumerate(record.get("questions", [])):
        prefix = f"{VIDEO_TOKEN}\n" if j == 0 else ""
        turns += [{"from": "human", "value": prefix + q["question"]}, {"from": "gpt", "value": str(q["answer"])}]
    if not turns:
        raise DataError(f"clip {record.get('id')!r} has no questions")
    return turns


def text_corpus(folder: Path, limit: int = 0) -> list[str]:
    """Stage-0 text of a world folder: every caption of every scene and every question/answer pair."""
    texts = []
    for scene in read_scenes(folder)[: limit or None]:
        texts += list(scene.get("captions") or [scene.get("caption", "")])
        texts += [f"{q['question']} {q['answer']}" for q in scene.get("questions", [])]
    return [t for t in texts if t]


def single_turn_pairs(turns: Sequence[Any], placeholder: str | None) -> list[list[Any]]:
    """Each (question, answer) pair of a conversation as a conversation of its own; with a ``placeholder``
    (``<image>`` or ``<video>``), every question starts with it (moved from wherever the first question had it)."""
    from mmstack.data.conversations import Turn

    pairs = normalise_turns(turns)
    out = []
    for j in range(0, len(pairs), 2):
        question = (pairs[j][1].replace(placeholder, "") if placeholder else pairs[j][1]).strip()
        text = f"{placeholder}\n{question}" if placeholder else question
        out.append([Turn(pairs[j][0], text), Turn(*pairs[j + 1])])
    return out


def lm_sample(proc: BridgeProcessor, text: str, name: str) -> Sample:
    """Plain LM text: every token (but BOS) is a label; the end token closes it."""
    ids = proc.tokenizer(text + proc.tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    bos = proc.tokenizer.bos_token_id
    ids = ([bos] if bos is not None else []) + list(ids)
    labels = [IGNORE_INDEX if (bos is not None and i == 0) else t for i, t in enumerate(ids)]
    return Sample(TemplateIds(ids, labels, 0, 0), name=name)


def _text_samples(proc: BridgeProcessor, folder: Path, limit: int) -> list[Sample]:
    out = []
    for scene in read_scenes(folder)[: limit or None]:
        sid = scene["id"]
        for j, caption in enumerate(scene.get("captions") or [scene["caption"]]):
            out.append(lm_sample(proc, caption, f"{folder}/{sid}/caption{j}"))
        turns = []
        for q in scene.get("questions", []):
            turns += [{"from": "human", "value": q["question"]}, {"from": "gpt", "value": str(q["answer"])}]
        if turns:
            text, _ = proc.render(turns)
            out.append(lm_sample(proc, text.removesuffix(proc.tokenizer.eos_token), f"{folder}/{sid}/qa"))
    return out


def _text_qa_samples(proc: BridgeProcessor, folder: Path, limit: int) -> list[Sample]:
    out = []
    for scene in read_scenes(folder)[: limit or None]:
        turns = []
        for j, q in enumerate(scene.get("questions", [])):
            prefix = f"Scene: {scene['caption']}.\n" if j == 0 else ""
            turns += [{"from": "human", "value": prefix + q["question"]}, {"from": "gpt", "value": str(q["answer"])}]
        if turns:
            out.append(Sample(proc.encode_turns(turns, name=f"{folder}/{scene['id']}"), name=scene["id"]))
    return out


# ----------------------------------------------------------------------------------------- sources


class FolderData:
    """The samples of every source kind of one data folder, sharing one decoded-pixel cache."""

    def __init__(self, folder: Path, proc: BridgeProcessor, cache_dir: Path | None, frames: int) -> None:
        self.folder, self.proc, self.cache_dir, self.frames = folder, proc, cache_dir, frames
        self.image_index: dict[Path, int] = {}
        self.image_paths: list[Path] = []
        self.clip_records: list[dict[str, Any]] = []

    def _image(self, path: Path) -> int:
        path = Path(path).resolve()
        if path not in self.image_index:
            self.image_index[path] = len(self.image_paths)
            self.image_paths.append(path)
        return self.image_index[path]

    def samples(self, spec: SourceSpec) -> list[Sample]:
        folder, proc = self.folder, self.proc
        if spec.kind == "text":
            return _text_samples(proc, folder, spec.limit)
        if spec.kind == "text_qa":
            return _text_qa_samples(proc, folder, spec.limit)
        if spec.kind == "captions":
            out = []
            for i, scene in enumerate(read_scenes(folder)[: spec.limit or None]):
                turns = [
                    {"from": "human", "value": f"<image>\n{DESCRIBE[i % len(DESCRIBE)]}"},
                    {"from": "gpt", "value": scene["caption"]},
                ]
                tpl = proc.encode_turns(turns, name=f"{folder}/{scene['id']}")
                out.append(Sample(tpl, image=self._image(folder / scene["image"]), name=scene["id"]))
            return out
        if spec.kind == "conversations":
            return self._conversation_samples(spec)
        out = []
        for record in read_clips(folder)[: spec.limit or None]:
            turns = clip_turns(record)
            for k, part in enumerate(single_turn_pairs(turns, VIDEO_TOKEN) if spec.single_turns else [turns]):
                tpl = proc.encode_turns(part, name=f"{folder}/clips/{record['id']}")
                name = f"clip {record['id']}#{k}" if spec.single_turns else f"clip {record['id']}"
                out.append(Sample(tpl, clip=len(self.clip_records), name=name))
            self.clip_records.append(record)
        return out

    def _conversation_samples(self, spec: SourceSpec) -> list[Sample]:
        from mmstack.data.conversations import read_conversations

        path = self.folder if self.folder.is_file() else self.folder / "conversations.json"
        out = []
        for conv in read_conversations(path)[: spec.limit or None]:
            img = self._image(conv.image) if conv.image is not None else -1
            parts = (
                single_turn_pairs(conv.turns, IMAGE_TOKEN if conv.image is not None else None)
                if spec.single_turns
                else [conv.turns]
            )
            for k, turns in enumerate(parts):
                tpl = self.proc.encode_turns(turns, name=f"{path} id {conv.id}")
                out.append(Sample(tpl, image=img, name=f"{conv.id}#{k}" if spec.single_turns else str(conv.id)))
        return out

    def visuals(self) -> Visuals:
        """Decode every referenced image and clip once (uint8, the processor's base size)."""
        from mmstack.train.clip_data import cached_pixels

        cfg = self.proc.config.image
        spec = {"size": list(cfg.size), "resize_mode": cfg.resize_mode, "interpolation": cfg.interpolation}

        def load(path: Path) -> np.ndarray:
            from mmstack.data.images import load_image

            return to_uint8(load_image(path), cfg)

        images = cached_pixels(self.image_paths, load, spec, self.cache_dir) if self.image_paths else None
        clips = None
        if self.clip_records:
            from mmstack.processing.video import sample_frame_indices

            paths = []
            for rec in self.clip_records:
                frames = rec["frames"]
                paths += [self.folder / frames[i] for i in sample_frame_indices(len(frames), self.frames)]
            flat = cached_pixels(paths, load, {**spec, "frames": self.frames}, self.cache_dir)
            clips = flat.view(len(self.clip_records), self.frames, *flat.shape[1:])  # (C, K, 3, H, W)
        return Visuals(images, clips)


# ------------------------------------------------------------------------------------------ batches


class VlmBatches:
    """A ``BatchSource``: samples (possibly a ``Mixture``) + decoded pixels -> padded model batches.

    ``set_step`` (called by the llava trainer before each step) picks the image size of the progressive
    resolution schedule: ``schedule = [(fraction_of_steps, size), ...]``.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Sample, Visuals]],
        proc: BridgeProcessor,
        schedule: Sequence[tuple[float, int]] = (),
        max_steps: int = 1,
    ) -> None:
        self.samples, self.proc = samples, proc
        self.schedule = sorted((float(f), int(s)) for f, s in schedule)
        self.max_steps = max_steps
        base = proc.config.image
        self.mul = 1.0 / (255.0 * torch.tensor(base.std).view(1, 3, 1, 1))
        self.add = -torch.tensor(base.mean).view(1, 3, 1, 1) / torch.tensor(base.std).view(1, 3, 1, 1)
        self.size = tuple(base.size)

    def __len__(self) -> int:
        return len(self.samples)

    def validate(self, samples: Sequence[tuple[Sample, Visuals]]) -> None:
        """Expand every sample at the largest size of the schedule, so a sample that would be truncated
        into an image or into nothing fails before training starts, not hours into it."""
        sizes = [s for _, s in self.schedule] + [self.proc.config.image.size[0]]
        side = max(sizes)
        per_image, per_clip = self._visual_tokens(side, side)
        for sample, _ in samples:
            img = [per_image] * sample.tpl.n_images
            vid = [per_clip] * sample.tpl.n_videos
            self.proc.expand(sample.tpl, img, vid, train=True, name=sample.name)

    def _visual_tokens(self, height: int, width: int) -> tuple[int, int]:
        """Visual tokens of one image and of one clip at this size."""
        per_clip = self.proc.tokens_per_frame(height, width) * self.proc.config.video_frames
        return self.proc.tokens_per_view(height, width), per_clip

    def lengths(self) -> list[int]:
        """Each sample's expanded length at the processor's base size (``train.group_by_length``)."""
        per_image, per_clip = self._visual_tokens(*self.proc.config.image.size)
        return [
            len(s.tpl.input_ids) + s.tpl.n_images * (per_image - 1) + s.tpl.n_videos * (per_clip - 1)
            for s, _ in self.samples
        ]

    def set_step(self, step: int) -> None:
        size = self.proc.config.image.size
        for fraction, s in self.schedule:
            if step >= fraction * self.max_steps:
                size = (s, s)
        self.size = tuple(size)

    def _pixels(self, raw: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> normalised floats at the current size."""
        x = raw.float()
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        return torch.addcmul(self.add, x, self.mul)

    def batch(self, indices: torch.Tensor) -> dict[str, Any]:
        h, w = self.size
        per_image = self.proc.tokens_per_view(h, w)
        per_frame = self.proc.tokens_per_frame(h, w)
        rows, images, clips = [], [], []
        for i in indices.tolist():
            sample, vis = self.samples[i]
            img_tok, vid_tok = [], []
            if sample.image >= 0 and sample.tpl.n_images:
                images.append(vis.images[sample.image])
                img_tok.append(per_image)
            if sample.clip >= 0 and sample.tpl.n_videos:
                frames = vis.clips[sample.clip]
                clips.append(self._pixels(frames))
                vid_tok.append(per_frame * frames.shape[0])
            rows.append(self.proc.expand(sample.tpl, img_tok, vid_tok, train=True, name=sample.name))
        batch: dict[str, Any] = self.proc.pad(rows, "right")
        batch["pixel_values"] = self._pixels(torch.stack(images)) if images else None
        batch["video_values"] = clips or None
        return batch
