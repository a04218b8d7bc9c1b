"""Training data of the native model: images and clips tokenized once, sequences built per step.

``read_native_data`` reads a pairs folder (the shapes world, or any layout ``mmstack.data.pairs`` reads) and,
when present, the world's ``scenes.jsonl`` (all captions of a scene) and ``clips.jsonl`` (clips of moving
objects). ``tokenize_visuals`` encodes every image and clip frame with the VQ tokenizer once and caches the
codes (keyed by the files and the tokenizer's weights). ``NativeData`` is the trainer's ``BatchSource``: an
index names a (task, item) of the mixture, and ``batch`` builds the sequences of ``native_tokens`` with a
random prompt caption and condition dropout, padded per group (images and clips apart, so short image
sequences are not padded to clip length). Random draws use the torch global RNG, which the trainer saves
and restores, so a resumed run sees the same batches.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmstack.errors import DataError
from mmstack.processing.native_tokens import PAD_ID, TASKS, NativeVocab
from mmstack.utils.atomic import atomic_write_bytes
from mmstack.utils.progress import console

IMAGE_TASKS, CLIP_TASKS = ("t2i", "i2t"), ("t2v", "v2t")


@dataclass
class NativeRecords:
    """What a data folder holds for the native recipe (paths and captions; no pixels yet).

    ``targets``: the caption a captioning task should write (per image / clip); ``prompts``: the captions a
    generation task may be prompted with.
    """

    images: list[Path]
    targets: list[str]
    prompts: list[list[str]]
    clip_frames: list[list[Path]]
    clip_targets: list[str]
    clip_prompts: list[list[str]]


def read_native_data(data: str | Path, prompts: str = "complete", clip_frames: int = 4) -> NativeRecords:
    """Image paths and captions of ``data`` (+ clips with ``clip_frames`` evenly spaced frames each).

    ``prompts``: ``complete`` (every caption that pins each object's shape, colour, size and cell),
    ``all`` (every caption of the scene) or ``pair`` (the pair's caption). The captioning target is the
    scene's first (canonical) caption, or the pair's caption for data without ``scenes.jsonl``.
    """
    from mmstack.data.pairs import read_pairs

    pairs = read_pairs(data)
    if not pairs:
        raise DataError(f"{data}: no image-text pairs found; pass a folder with pairs.jsonl (mmstack world generate)")
    scenes = _scenes(Path(data)) if Path(data).is_dir() else {}
    images, targets, prompt_lists = [], [], []
    for p in pairs:
        scene = scenes.get(str(p.id))
        images.append(p.image)
        if scene is None:
            targets.append(p.caption)
            prompt_lists.append([p.caption])
            continue
        targets.append(scene["captions"][0])
        prompt_lists.append(_prompts_of(scene, prompts, p.caption))
    frames, clip_targets, clip_prompts = _clips(Path(data), clip_frames) if Path(data).is_dir() else ([], [], [])
    return NativeRecords(images, targets, prompt_lists, frames, clip_targets, clip_prompts)


def _scenes(folder: Path) -> dict[str, dict[str, Any]]:
    path = folder / "scenes.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("captions"):
                out[str(rec.get("id"))] = rec
    return out


def _prompts_of(scene: dict[str, Any], mode: str, pair_caption: str) -> list[str]:
    if mode == "pair":
        return [pair_caption]
    if mode == "all":
        return list(scene["captions"])
    from mmstack.world.language import captions_for
    from mmstack.world.scene import Scene

    return captions_for(Scene.from_dict(scene), complete_only=True)


def _clips(folder: Path, n_frames: int) -> tuple[list[list[Path]], list[str], list[list[str]]]:
    path = folder / "clips.jsonl"
    if not path.is_file() or n_frames < 1:
        return [], [], []
    frames, targets, prompts = [], [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        all_frames = [folder / f for f in rec["frames"]]
        if len(all_frames) < n_frames:
            raise DataError(
                f"{path}: clip {rec.get('id')} has {len(all_frames)} frames, fewer than clip_frames={n_frames}"
            )
        pick = np.round(np.linspace(0, len(all_frames) - 1, n_frames)).astype(int)
        frames.append([all_frames[i] for i in pick])
        targets.append(rec["captions"][0])
        prompts.append(list(rec["captions"]))
    return frames, targets, prompts


# ------------------------------------------------------------------------------------------ codes


def tokenize_visuals(vq: Any, records: NativeRecords, cache_dir: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """VQ codes of every image (N, h, w) and clip (M, T, h, w), from ``cache_dir`` when already computed."""
    from mmstack.train.clip_data import cache_key, decode_all

    flat_frames = [f for clip in records.clip_frames for f in clip]
    paths = [Path(p) for p in records.images] + flat_frames
    key = cache_key(paths, {"vq": vq_fingerprint(vq), "what": "native-codes"})
    cache = Path(cache_dir) / f"codes-{key}.pt" if cache_dir else None
    codes = _load_codes(cache, len(paths)) if cache else None
    if codes is None:
        console.print(f"tokenizing {len(paths)} images with the VQ tokenizer (cached for later runs)")
        size = vq.config.image_size
        pixels = decode_all(paths, lambda p: _to_uint8(p, size))
        codes = encode_all(vq, pixels)
        if cache is not None:
            buf = io.BytesIO()
            torch.save(codes, buf)
            atomic_write_bytes(cache, buf.getvalue())
    n = len(records.images)
    clip_codes = (
        codes[n:].view(len(records.clip_frames), -1, *codes.shape[1:]) if records.clip_frames else codes[:0, None]
    )
    return codes[:n].long(), clip_codes.long()


def encode_all(vq: Any, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Codes (N, h, w) int16 of uint8 pixels (N, 3, H, W)."""
    vq.eval()
    out = [vq.encode(pixels[i : i + batch_size].float() / 255.0) for i in range(0, len(pixels), batch_size)]
    return torch.cat(out).to(torch.int16)


def vq_fingerprint(vq: Any) -> str:
    """A hash of the tokenizer's weights and codebook (the codes change when they do)."""
    h = hashlib.sha256()
    for name, t in sorted(vq.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _load_codes(path: Path, n: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        codes = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged cache is recomputed, never trusted
        return None
    return codes if isinstance(codes, torch.Tensor) and len(codes) == n else None


def _to_uint8(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    from mmstack.data.images import load_image

    img = load_image(path)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


# ------------------------------------------------------------------------------------------ batches


class NativeData:
    """The trainer's ``BatchSource`` over a weighted mixture of tasks.

    Args:
        vocab: the unified vocabulary.
        image_codes: (N, h, w); clip_codes: (M, T, h, w) (M may be 0).
        targets / prompts: caption token ids per image (captioning target; generation prompts).
        clip_targets / clip_prompts: the same per clip.
        mix: items per task as a multiple of the number of images (``{"t2i": 1, "i2t": 1, "v2t": 0.1}``);
            clip tasks cycle over the clips.
        p_uncond: probability that a generation example drops its caption (guidance's unconditional branch).
        train_visual: captioning examples also train their image/clip block (see ``build_sequence``).
    """

    def __init__(
        self,
        vocab: NativeVocab,
        image_codes: torch.Tensor,
        targets: list[torch.Tensor],
        prompts: list[list[torch.Tensor]],
        clip_codes: torch.Tensor,
        clip_targets: list[torch.Tensor],
        clip_prompts: list[list[torch.Tensor]],
        mix: dict[str, float],
        p_uncond: float = 0.1,
        train_visual: bool = False,
    ) -> None:
        self.vocab, self.p_uncond, self.train_visual = vocab, p_uncond, train_visual
        self.image_codes, self.clip_codes = image_codes, clip_codes
        self.targets, self.prompts = targets, prompts
        self.clip_targets, self.clip_prompts = clip_targets, clip_prompts
        n_img, n_clip = len(image_codes), len(clip_codes)
        self.tasks: list[tuple[str, int, int]] = []  # (task, first index, count)
        start = 0
        for task in TASKS:
            weight = float(mix.get(task, 0.0))
            if weight <= 0:
                continue
            if task in CLIP_TASKS and n_clip == 0:
                raise DataError(
                    f"the mixture asks for {task} but the data has no clips (clips.jsonl); set its weight to 0"
                )
            count = max(1, round(weight * n_img))
            self.tasks.append((task, start, count))
            start += count
        if not self.tasks:
            raise DataError("the task mixture is empty: give t2i, i2t, t2v or v2t a weight > 0")
        self.length = start

    def __len__(self) -> int:
        return self.length

    def item(self, index: int) -> tuple[str, int]:
        """(task, item index) of a mixture index."""
        for task, start, count in self.tasks:
            if index < start + count:
                size = len(self.image_codes) if task in IMAGE_TASKS else len(self.clip_codes)
                return task, (index - start) % size
        raise IndexError(index)

    def example(self, task: str, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One (ids, target mask) of ``task`` for item ``i``; draws the prompt and the dropout."""
        visual = self.image_codes[i] if task in IMAGE_TASKS else self.clip_codes[i]
        if task in ("i2t", "v2t"):
            caption = (self.targets if task == "i2t" else self.clip_targets)[i]
            return self.vocab.build_sequence(task, caption, visual, train_visual=self.train_visual)
        options = (self.prompts if task == "t2i" else self.clip_prompts)[i]
        caption = options[int(torch.randint(len(options), (1,)))] if len(options) > 1 else options[0]
        drop = bool(torch.rand(()) < self.p_uncond)
        return self.vocab.build_sequence(task, caption, visual, drop_condition=drop)

    def batch(self, indices: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """``{"image": group, "clip": group}`` (groups present only when non-empty); a group holds right-padded
        ``input_ids``, ``attention_mask`` and ``target_mask`` (B, L)."""
        groups: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"image": [], "clip": []}
        for index in indices.tolist():
            task, i = self.item(index)
            groups["image" if task in IMAGE_TASKS else "clip"].append(self.example(task, i))
        return {name: pad_examples(examples) for name, examples in groups.items() if examples}


def pad_examples(examples: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad (ids, target mask) pairs into (B, L) tensors."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    target = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, (x, t) in enumerate(examples):
        ids[row, : len(x)], attn[row, : len(x)], target[row, : len(x)] = x, 1, t
    return {"input_ids": ids, "attention_mask": attn, "target_mask": target}
